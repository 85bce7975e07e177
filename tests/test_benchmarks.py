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
  env = dict(os.environ, GPU_SH_DRY="1", GPU_SH_ONLY="input_pipeline synthetic")
  out = subprocess.run(["bash", "benchmarks/gpu.sh"], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  assert "input_pipeline" in out.stdout and "--train" in out.stdout
