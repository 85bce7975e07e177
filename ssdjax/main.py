r"""Trains and evaluates an experiment config.

  python -m ssdjax.main --config=configs/synthetic.py --workdir=runs/synthetic
  python -m ssdjax.main --config=configs/ssd300_voc.py --workdir=runs/voc --config.train.batch_size=64

Any config field can be overridden with ``--config.<field>=<value>``; an unknown field is an error.
Rerunning the same command resumes from the workdir's latest checkpoint. ``--mode=eval`` only
evaluates the latest checkpoint of ``--workdir``.
"""

import json

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and records.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (and evaluate) or eval only.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ssdjax import train  # pylint: disable=g-import-not-at-top

  workdir = _WORKDIR.value
  logging.info("JAX devices: %s", jax.devices())
  if _MODE.value == "eval":
    config, trainer, variables, step = train.restore_for_inference(workdir)
    metrics, _ = train.evaluate(trainer, variables)
  else:
    if _CONFIG.value is None:
      raise app.UsageError("--config is required for --mode=train")
    metrics = train.train_and_evaluate(_CONFIG.value, workdir)
  headline = {k: round(v, 4) for k, v in metrics.items() if "/AP/" not in k}
  print(json.dumps(headline, indent=2, sort_keys=True))


def run():
  flags.mark_flags_as_required(["workdir"])
  app.run(main)


if __name__ == "__main__":
  run()
