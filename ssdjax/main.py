r"""Trains and evaluates an experiment config.

  python -m ssdjax.main --config=configs/synthetic.py --workdir=runs/synthetic
  python -m ssdjax.main --config=configs/ssd300_voc.py --workdir=runs/voc --config.train.batch_size=64
  python -m ssdjax.main --config=configs/synthetic.py --print_config
  python -m ssdjax.main --mode=eval --workdir=runs/synthetic

Any config field can be overridden with ``--config.<field>=<value>``; an unknown field, a value of
the wrong type or a missing config file is an error of one line. ``--print_config`` lists every
field with its value and meaning. Rerunning the same command resumes from the workdir's latest
checkpoint; a changed config is refused (naming the fields) unless only the length and cadence
of the run changed or ``--allow_config_change`` is given. SIGINT/SIGTERM (Ctrl-C) save a
checkpoint at the current step and exit. ``--mode=eval`` evaluates the latest checkpoint of
``--workdir`` with the config it was trained with (overrides of ``eval.*`` and ``data.*`` fields
apply, e.g. another eval split).

Several processes (hosts) run one training when each is started with the same command:
``--coordinator_address``, ``--num_processes`` and ``--process_id``, or a SLURM/Open MPI launch,
or ``--distributed=on`` on a Cloud TPU pod slice (docs/multihost.md).
"""

import json

from absl import flags
from absl import logging
import jax

from ssdjax import cli
from ssdjax import distributed
from ssdjax.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and records.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (and evaluate) or eval only.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir although training fields of the config "
    "changed (learning rate, data, loss, ...); the change is recorded in config_changes.jsonl. "
    "A changed model is never resumed.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False,
                                  "Print every config field with its value and meaning, then exit.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", list(distributed.MODES),
    "Start jax.distributed (one run over several processes): 'auto' when --coordinator_address/"
    "--num_processes/--process_id is given or SLURM/Open MPI started several processes, 'on' "
    "always (Cloud TPU pod slices: JAX reads the rest from the TPU metadata), 'off' never.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, where the processes meet (the same on "
    "every process; a free port on process 0's host). Default: detected by JAX.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "How many processes run the training. Default: detected.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index, 0..num_processes-1. Default: detected.")


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {argv[1:]}")
  from ssdjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from ssdjax import train  # pylint: disable=g-import-not-at-top

  if _MODE.value == "eval" and cli.parsed_spec() is not None:
    raise UserError("--mode=eval evaluates with the config the workdir was trained with; drop "
                    "--config (--config.eval.* and --config.data.* overrides still apply)")
  config = cli.parsed_config()
  if _PRINT_CONFIG.value:
    if config is None:
      if not _WORKDIR.value:
        raise UserError("--print_config needs --config=FILE or --workdir=DIR")
      config = train.load_config(_WORKDIR.value)
    config_lib.validate(config)
    print(config_lib.describe(config))
    return
  if not _WORKDIR.value:
    raise UserError("--workdir is required")
  workdir = _WORKDIR.value
  timeout_s = (config if config is not None else _recorded_config(workdir)).train.process_timeout_s
  distributed.initialize(mode=_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
                         num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                         timeout_s=timeout_s)
  logging.info("JAX devices: %s", jax.devices())
  try:
    if _MODE.value == "eval":
      metrics = train.evaluate_workdir(workdir, cli.parsed_overrides())
    else:
      if config is None:
        raise UserError("--config is required for --mode=train")
      metrics = train.train_and_evaluate(config, workdir,
                                         allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except jax.errors.JaxRuntimeError as e:
    distributed.explain_failure(e)  # a lost process is named (and this one ends) here
    raise
  distributed.finish()
  if distributed.is_main():
    headline = {k: round(v, 4) for k, v in metrics.items() if "/AP/" not in k}
    print(json.dumps(headline, indent=2, sort_keys=True))


def _recorded_config(workdir: str):
  """The workdir's config (--mode=eval), or the defaults where there is none yet."""
  from ssdjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from ssdjax import train  # pylint: disable=g-import-not-at-top
  try:
    return train.load_config(workdir)
  except UserError:
    return config_lib.defaults()  # the run stops later with the message about the workdir


def run():
  cli.run(main)


if __name__ == "__main__":
  run()
