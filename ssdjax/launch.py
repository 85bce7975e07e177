r"""Runs one training command as several processes on this machine, as a cluster would.

  python -m ssdjax.launch --processes=2 -- python -m ssdjax.main --config=configs/synthetic.py \
      --workdir=runs/two_processes

Each process gets ``--coordinator_address=127.0.0.1:<free port> --num_processes=N
--process_id=i`` appended to the command; ``--cpu_devices=K`` gives each K simulated CPU devices
(``JAX_PLATFORMS=cpu``, ``--xla_force_host_platform_device_count``). This is for trying a
multi-process run, and the code paths of one, without a cluster (docs/multihost.md); on a
cluster the launcher (SLURM, mpirun, the TPU VM's ssh) starts the processes instead.

The exit status is the first non-zero status of a process (the others stop within
``train.process_timeout_s`` of a lost one), else 0.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from absl import app
from absl import flags

_PROCESSES = flags.DEFINE_integer("processes", 2, "How many processes to start.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "Simulated CPU devices per process (0 = leave JAX's platform alone).")
_PORT = flags.DEFINE_integer("port", 0, "The coordinator's port on 127.0.0.1 (0 = a free one).")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(command: list[str], processes: int, *, cpu_devices: int = 0, port: int = 0) -> int:
  """Runs ``command`` as ``processes`` processes; returns the exit status (module docstring)."""
  if processes < 1 or not command:
    raise ValueError("give --processes >= 1 and a command after --")
  port = port or _free_port()
  env = dict(os.environ)
  if cpu_devices:
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = " ".join(
        [f for f in env.get("XLA_FLAGS", "").split()
         if not f.startswith("--xla_force_host_platform_device_count")]
        + [f"--xla_force_host_platform_device_count={cpu_devices}"])
  procs = [subprocess.Popen(command + [f"--coordinator_address=127.0.0.1:{port}",
                                       f"--num_processes={processes}", f"--process_id={i}"],
                            env=env) for i in range(processes)]
  status = 0
  try:
    while any(p.poll() is None for p in procs):
      time.sleep(0.2)
      status = status or next((p.returncode for p in procs if p.returncode), 0)
  except KeyboardInterrupt:  # Ctrl-C reached the processes too: they save, then exit
    for p in procs:
      p.wait()
  return status or next((p.returncode for p in procs if p.returncode), 0)


def main(argv):
  sys.exit(launch(argv[1:], _PROCESSES.value, cpu_devices=_CPU_DEVICES.value, port=_PORT.value))


if __name__ == "__main__":
  app.run(main)
