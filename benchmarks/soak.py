r"""Soak test (not in CI): trains the synthetic config for a long time with periodic evaluation and
records the memory of the trainer and its input workers, to show that it does not grow.

  python benchmarks/soak.py --minutes=60 --workdir=runs/soak

Samples the resident memory (RSS) of the training process and all its children every
``--every`` seconds into ``<workdir>/soak.csv``; at the end stops the run with SIGTERM (which
saves a checkpoint), then prints the RSS after warm-up, at the end, the largest, and the growth
per hour of a least-squares line through the samples after warm-up. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _children(pid: int) -> list[int]:
  out = []
  try:
    for task in os.listdir(f"/proc/{pid}/task"):
      with open(f"/proc/{pid}/task/{task}/children") as f:
        out += [int(c) for c in f.read().split()]
  except OSError:
    return []
  return out + [g for c in out for g in _children(c)]


def _rss_mb(pid: int) -> float:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return 0.0


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--minutes", type=float, default=60.0)
  ap.add_argument("--workdir", default="runs/soak")
  ap.add_argument("--every", type=float, default=10.0, help="seconds between samples")
  ap.add_argument("--warmup_minutes", type=float, default=5.0,
                  help="samples before this are not used for the growth rate")
  ap.add_argument("--eval_every", type=int, default=200)
  args = ap.parse_args()

  os.makedirs(args.workdir, exist_ok=True)
  cmd = [sys.executable, "-m", "ssdjax.main", "--config=configs/synthetic.py",
         f"--workdir={args.workdir}", "--config.train.num_steps=100000000",
         f"--config.train.eval_every={args.eval_every}", "--config.train.checkpoint_every=500",
         "--config.train.log_every=100"]
  log = open(os.path.join(args.workdir, "soak.log"), "w")
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  t0 = time.time()
  rows = []
  with open(os.path.join(args.workdir, "soak.csv"), "w") as csv:
    csv.write("seconds,trainer_mb,children_mb,processes\n")
    while time.time() - t0 < args.minutes * 60 and proc.poll() is None:
      kids = _children(proc.pid)
      row = (time.time() - t0, _rss_mb(proc.pid), sum(_rss_mb(k) for k in kids), 1 + len(kids))
      rows.append(row)
      csv.write("%.0f,%.1f,%.1f,%d\n" % row)
      csv.flush()
      time.sleep(args.every)
  if proc.poll() is None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=600)
  log.close()
  after = [r for r in rows if r[0] >= args.warmup_minutes * 60] or rows
  # Evaluation starts worker processes of its own for a few seconds; the steady state is the
  # samples with the usual number of processes.
  usual = max(set(r[3] for r in after), key=[r[3] for r in after].count)
  steady = [r for r in after if r[3] == usual]
  trainer = [r[1] for r in after]
  total = [r[1] + r[2] for r in steady]
  print(f"ran {rows[-1][0] / 60:.1f} min, exit status {proc.returncode}, {len(rows)} samples "
        f"({len(after)} after warm-up, {len(steady)} of them with the usual {usual} processes)")
  print(f"trainer RSS after warm-up {trainer[0]:.0f} MB, at the end {trainer[-1]:.0f} MB, range "
        f"{min(trainer):.0f}-{max(trainer):.0f} MB, growth {_slope(after, trainer):+.1f} MB/hour")
  print(f"trainer + workers (steady samples) {total[0]:.0f} -> {total[-1]:.0f} MB, range "
        f"{min(total):.0f}-{max(total):.0f} MB, growth {_slope(steady, total):+.1f} MB/hour "
        "(least squares)")


def _slope(rows, values) -> float:
  t = [r[0] / 3600 for r in rows]
  n = len(t)
  if n < 2:
    return 0.0
  mt, mv = sum(t) / n, sum(values) / n
  den = sum((x - mt) ** 2 for x in t)
  return sum((x - mt) * (v - mv) for x, v in zip(t, values)) / den if den else 0.0


if __name__ == "__main__":
  main()
