"""The benchmark scripts still run (tiny sizes; their figures are in BENCHMARKS.md, not checked here)."""

import os
import re
import subprocess
import sys

from tests.helpers import REPO, subprocess_env


def test_input_pipeline_benchmark_runs_both_paths():
  out = subprocess.run([sys.executable, "benchmarks/input_pipeline.py", "--batch_size=2",
                        "--batches=1", "--runs=1"], env=subprocess_env(), cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r"host CPU ratio host/device: [\d.]+x", out.stdout), out.stdout
  assert re.search(r"device augmentation \(cpu, .*: [\d.]+ ms/image", out.stdout), out.stdout


def test_gpu_script_dry_run_lists_its_steps():
  env = dict(os.environ, GPU_SH_DRY="1", GPU_SH_ONLY="input_pipeline synthetic suite_bf16")
  out = subprocess.run(["bash", "benchmarks/gpu.sh"], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  assert "input_pipeline" in out.stdout and "--train" in out.stdout
  assert "benchmarks/suite.py --device=cuda --dtype=bfloat16" in out.stdout


def _suite():
  import runpy  # pylint: disable=g-import-not-at-top
  return runpy.run_path(os.path.join(REPO, "benchmarks", "suite.py"))


def test_suite_background_shift_leaves_the_asked_number_of_candidates():
  import numpy as np  # pylint: disable=g-import-not-at-top
  suite = _suite()
  logits = np.random.default_rng(0).normal(0, 2, (4, 3000, 21)).astype(np.float32)
  shift = suite["background_shift"](logits, 0.01, 40)
  raised = logits.copy()
  raised[..., 0] += shift
  e = np.exp(raised - raised.max(-1, keepdims=True))
  probs = e / e.sum(-1, keepdims=True)
  per_image = (probs[..., 1:] > 0.01).sum() / 4
  assert 35 <= per_image <= 45, per_image


def test_suite_writes_its_section_once(tmp_path):
  suite = _suite()
  path = str(tmp_path / "B.md")
  with open(path, "w") as f:
    f.write("# Benchmarks\n\nintro\n\n## older\n\nold table\n")
  suite["write_section"](path, "cpu-float32", "## new\n\n| a |")
  suite["write_section"](path, "cpu-float32", "## newer\n\n| b |")
  doc = open(path).read()
  assert doc.count("<!-- suite:cpu-float32 -->") == 1 and "| b |" in doc and "| a |" not in doc
  assert doc.index("## newer") < doc.index("## older") and "old table" in doc


def test_suite_runs_interleaved_and_reports_every_row():
  """`make bench` runs benchmarks/suite.py --write=BENCHMARKS.md; here at the smallest size."""
  out = subprocess.run([sys.executable, "benchmarks/suite.py", "--device=cpu", "--batch_size=1",
                        "--large_batch=2", "--pairs=1", "--no_memory"],
                       env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stderr[-3000:]
  for row in ("network forward", "matching + loss", "post-processing", "inference, batch 1",
              "inference, batch 2", "train step", "compile (ssdjax only)"):
    assert re.search(rf"\| {re.escape(row)}[^|]*\|.*\|", out.stdout), (row, out.stdout[-3000:])
  assert re.search(r"load average before: [\d.]+", out.stdout)
  assert re.search(r"\*\*[\d.]+x\*\* \[[\d.]+, [\d.]+\]", out.stdout)
  make = subprocess.run(["make", "-n", "bench"], cwd=REPO, capture_output=True, text=True)
  assert "benchmarks/suite.py --write=BENCHMARKS.md" in make.stdout, make.stdout
