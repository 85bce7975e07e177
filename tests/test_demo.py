"""The Quick start job (`make demo` = `python -m ssdjax.demo`) runs end to end, in miniature."""

import json
import os
import subprocess
import sys

from tests.helpers import REPO, subprocess_env as _env


def test_demo_trains_evaluates_and_draws(tmp_path):
  workdir = tmp_path / "demo"
  out = subprocess.run(
      [sys.executable, "-m", "ssdjax.demo", f"--workdir={workdir}", "--num_images=2",
       "--config.train.num_steps=2", "--config.data.synthetic.num_train=16",
       "--config.data.synthetic.num_val=4", "--config.data.num_workers=0",
       "--config.train.batch_size=4", "--config.eval.batch_size=4", "--config.train.log_every=1"],
      env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "validation mAP@0.5" in out.stdout
  predictions = workdir / "predictions" / "step_2"  # one folder per checkpoint step
  assert sorted(os.listdir(predictions)) == ["detections.json", "val_000.png", "val_001.png"]
  assert str(predictions) in out.stdout
  with open(predictions / "detections.json") as f:
    assert len(json.load(f)) == 2
  with open(workdir / "final_metrics.json") as f:
    assert "voc07/mAP" in json.load(f)
