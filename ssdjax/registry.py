"""Named registries of replaceable parts (backbones, heads, losses, matchers).

A registry maps names to objects. A config field that names a part (``model.backbone``,
``model.head``, ``loss.type``, ``matching.strategy``) accepts either a registered name or an
import path ``"package.module:Name"`` (``Name`` may be dotted, ``"pkg.mod:Outer.Inner"``), so a
part written in a researcher's own package needs no registration at all. The built-in parts are
registered through the same :meth:`Registry.register` an outside package uses.

A workdir records each part by a name that a fresh process can rebuild: built-in names stay as
they are, anything else is recorded as its import path (:meth:`Registry.import_path`), so eval,
predict, export and the experiments only need the part's module to be importable.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Iterable, Sequence, TypeVar

from ssdjax.errors import UserError

T = TypeVar("T")


def _import_object(path: str, field: str) -> Any:
  module_name, _, attr = path.partition(":")
  if not module_name or not attr:
    raise UserError(f"{field}={path!r}: an import path must look like 'package.module:Name'")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise UserError(
        f"{field}={path!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}); make "
        "it importable: install its package (pip install -e <its folder>) or add the folder that "
        "holds it to PYTHONPATH") from e
  obj = module
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise UserError(f"{field}={path!r}: module {module_name!r} has no attribute "
                      f"{attr!r}")
    obj = getattr(obj, part)
  return obj


class Registry:
  """Names -> parts of one kind, with import paths as a fallback.

  Args:
    kind: what is registered, for messages ("head").
    field: the config field that names it, for messages ("config.model.head").
    check: optional ``check(name, obj)`` raising UserError when ``obj`` is not a valid part.
  """

  def __init__(self, kind: str, field: str, check: Callable[[str, Any], None] | None = None):
    self.kind, self.field = kind, field
    self._check = check
    self._entries: dict[str, Any] = {}
    self._builtin: set[str] = set()

  def register(self, name: str, obj: Any = None, *, overwrite: bool = False, _builtin=False):
    """Registers ``obj`` as ``name``; without ``obj``, returns a decorator.

    ``name`` must not contain ':' (that marks an import path). Registering another object under
    a taken name raises unless ``overwrite``; registering the same object again is a no-op.
    """
    if obj is None:
      return lambda o: self.register(name, o, overwrite=overwrite, _builtin=_builtin)
    if not isinstance(name, str) or not name or ":" in name:
      raise UserError(f"{self.kind} name {name!r} must be a non-empty string without ':'")
    if self._check is not None:
      self._check(name, obj)
    old = self._entries.get(name)
    if old is not None and old is not obj and not overwrite:
      raise UserError(f"a {self.kind} named {name!r} is already registered ({_describe(old)}); "
                      "pass overwrite=True to replace it, or choose another name")
    if name in self._builtin and old is not obj:
      self._builtin.discard(name)
    self._entries[name] = obj
    if _builtin:
      self._builtin.add(name)
    return obj

  def names(self) -> tuple[str, ...]:
    """The registered names, sorted."""
    return tuple(sorted(self._entries))

  def builtin_names(self) -> tuple[str, ...]:
    return tuple(sorted(self._builtin))

  def get(self, name: str) -> Any:
    """The part registered as ``name``, or imported from ``"package.module:Name"``."""
    if isinstance(name, str) and ":" in name:
      obj = _import_object(name, self.field)
      if self._check is not None:
        self._check(name, obj)
      return obj
    if name not in self._entries:
      raise UserError(f"unknown {self.kind} {name!r} ({self.field}); valid names: "
                      f"{', '.join(self.names())}, or an import path 'package.module:Name'")
    return self._entries[name]

  def import_path(self, name: str) -> str:
    """How a workdir records ``name``: built-in names as they are, others as an import path.

    Raises:
      UserError: the part lives in ``__main__`` or a local scope, which no other process can
        import; move it into a module.
    """
    if isinstance(name, str) and ":" in name:
      self.get(name)  # fails now, with the fix, rather than in the next process
      return name
    obj = self.get(name)
    if name in self._builtin:
      return name
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<locals>" in qualname:
      raise UserError(
          f"{self.field}={name!r} is registered from {module or 'an unknown module'}, which a "
          "fresh process (eval, predict, export) cannot import; define it in a module of an "
          "importable package and name it by registration or as 'package.module:Name'")
    path = f"{module}:{qualname}"
    if _import_object(path, self.field) is not obj:
      raise UserError(f"{self.field}={name!r}: {path} does not lead back to the registered "
                      f"{self.kind}; register a module-level object")
    return path

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterable[str]:
    return iter(self.names())


def must_be_function(kind: str, contract: str) -> Callable[[str, Any], None]:
  """A :class:`Registry` check: the part is callable (``contract`` describes its signature)."""

  def check(name, obj):
    if not callable(obj):
      raise UserError(f"{kind} {name!r} must be a function {contract}; got {obj!r}")
  return check


def must_be_module(kind: str, fields: Sequence[str], hint: str) -> Callable[[str, Any], None]:
  """A :class:`Registry` check: the part is a ``flax.linen.Module`` class with ``fields``."""

  def check(name, obj):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top  (the core stays flax-free)
    have = getattr(obj, "__dataclass_fields__", {})
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)) or any(
        f not in have for f in fields):
      raise UserError(f"{kind} {name!r} must be a flax.linen.Module class with the fields "
                      f"{', '.join(fields)} ({hint}); got {obj!r}")
  return check


def check_kwargs(fn, kwargs: dict, *, field: str, name: str, positional: int) -> None:
  """``kwargs`` fit ``fn``'s signature after its first ``positional`` arguments.

  Raises:
    UserError: an unknown keyword (with the accepted ones) or a required one missing.
  """
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return  # a builtin or C function: nothing to check against
  params = list(sig.parameters.values())[positional:]
  if any(p.kind is p.VAR_KEYWORD for p in params):
    accepted = None
  else:
    accepted = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
  if accepted is not None:
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
      raise UserError(f"{field} has {unknown}, which {name!r} does not accept; accepted keys: "
                      f"{', '.join(accepted) or 'none'}")
  missing = [p.name for p in params if p.default is p.empty and p.name not in kwargs
             and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
  if missing:
    raise UserError(f"{field} lacks {missing}, which {name!r} requires")


def _describe(obj) -> str:
  return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"
