"""Shared by the test files: the repository root, a shrunk default config, subprocess environments."""

import os

from configs import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**overrides):
  """The synthetic config, shrunk so a run takes seconds; overrides as {"section.field": value}."""
  c = synthetic.get_config()
  c.data.synthetic.num_train = 48
  c.data.synthetic.num_val = 8
  c.data.num_workers = 0
  c.train.batch_size = 8
  c.train.num_steps = 6
  c.train.log_every = 2
  c.train.eval_every = 1000
  c.train.checkpoint_every = 3
  c.eval.batch_size = 8
  c.optimizer.warmup_steps = 2
  for k, v in overrides.items():
    section, name = k.split(".")
    c[section][name] = v
  return c


def subprocess_env(*, devices: int | None = None, xla_flags: str | None = None) -> dict:
  """Environment for a child Python: CPU JAX, the repo importable, XLA_FLAGS exactly as given.

  devices: simulate this many CPU devices (--xla_force_host_platform_device_count).
  """
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  flags = [f"--xla_force_host_platform_device_count={devices}"] if devices else []
  flags += [xla_flags] if xla_flags else []
  env.pop("XLA_FLAGS", None)
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  return env
