"""What the command-line programs share: ``--config`` parsing and one-line user errors.

``--config=FILE[:variant]`` loads a config file (:func:`ssdjax.config.load_file`) and every
``--config.FIELD=VALUE`` (or ``--config.FIELD VALUE``) overrides a field, parsed by the field's
type (:func:`ssdjax.config.apply_overrides`). The arguments are taken out of ``argv`` before absl
parses the rest, so an unknown field, a wrong type or a missing file is a
:class:`ssdjax.errors.UserError` with a clear message instead of a flag-parsing traceback.

:func:`run` runs an absl ``main`` and prints a :class:`~ssdjax.errors.UserError` as one line
(``error: ...`` on stderr, exit status 2).
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import app
from absl import flags

from ssdjax.errors import UserError

_PARSED: dict = {"spec": None, "overrides": []}


def split_config_args(argv: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
  """(config file spec, ["field=value", ...], the other arguments) of a command line."""
  spec, overrides, rest = None, [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg == "--config" or arg.startswith("--config=") or arg.startswith("--config."):
      name, sep, value = arg[2:].partition("=")
      if not sep:  # "--config FILE" / "--config.x VALUE"
        if i + 1 >= len(args):
          raise UserError(f"{arg} needs a value")
        value, i = args[i + 1], i + 1
      if name == "config":
        spec = value
      else:
        overrides.append(f"{name[len('config.'):]}={value}")
    else:
      rest.append(arg)
    i += 1
  return spec, overrides, rest


def load_config(spec: str | None, overrides: Sequence[str] = (), *, default: str | None = None):
  """The config of ``--config`` (or ``default``) with the overrides applied and every field
  checked (types, ranges, unknown names); class names are resolved later, from the data."""
  from ssdjax import config as config_lib  # pylint: disable=g-import-not-at-top

  spec = spec or default
  if spec is None:
    if overrides:
      raise UserError(f"--config.{overrides[0]} needs --config=FILE to override")
    return None
  config = config_lib.load_file(spec)
  config_lib.apply_overrides(config, overrides)
  config_lib.check_fields(config)
  return config


def parsed_config(default: str | None = None):
  """The config of the command line parsed by :func:`run` (None without ``--config``)."""
  return load_config(_PARSED["spec"], _PARSED["overrides"], default=default)


def parsed_overrides() -> list[str]:
  """The ``--config.FIELD=VALUE`` overrides of the command line, as ``"FIELD=VALUE"``."""
  return list(_PARSED["overrides"])


def parsed_spec() -> str | None:
  """The ``--config`` file spec of the command line (None without it)."""
  return _PARSED["spec"]


def _flags_parser(argv: Sequence[str]) -> list[str]:
  try:
    spec, overrides, rest = split_config_args(argv)
  except UserError as e:
    _fail(e)
  _PARSED.update(spec=spec, overrides=overrides)
  try:
    return flags.FLAGS(rest)
  except flags.Error as e:
    _fail(e)


def _fail(error: BaseException, status: int = 2):
  print(f"error: {error}", file=sys.stderr)
  sys.exit(status)


def run(main: Callable[[list[str]], None], argv: Sequence[str] | None = None) -> None:
  """``absl.app.run(main)`` with ``--config`` parsing; a :class:`UserError` (status 2) or a
  diverged run's ``FloatingPointError`` (status 1) is printed as one line."""

  def guarded(args):
    try:
      return main(args)
    except UserError as e:
      _fail(e)
    except app.UsageError as e:
      _fail(e)
    except FloatingPointError as e:  # a diverged run: the message names the step and the fix
      _fail(e, status=1)

  app.run(guarded, argv=list(argv) if argv is not None else None, flags_parser=_flags_parser)
