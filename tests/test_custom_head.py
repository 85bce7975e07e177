"""The worked example of experiments/custom_head/: a head and a loss outside ssdjax, trained by
config alone, then evaluated, predicted and exported through the CLIs from fresh processes, and
run through the head ablation next to built-in heads (tiny sizes)."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.helpers import REPO, subprocess_env

TINY = ["--config.data.synthetic.num_train=16", "--config.data.synthetic.num_val=4",
        "--config.data.num_workers=0", "--config.train.batch_size=4", "--config.eval.batch_size=4",
        "--config.train.num_steps=2", "--config.train.log_every=1",
        "--config.train.checkpoint_every=2"]


def _run(*args, timeout=600):
  env = subprocess_env(xla_flags="--xla_backend_optimization_level=0")
  out = subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def test_custom_head_and_loss_through_every_tool(tmp_path):
  workdir = str(tmp_path / "run")
  _run("-m", "ssdjax.main", "--config=experiments/custom_head/config.py", f"--workdir={workdir}",
       *TINY)
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["model"]["head"] == "experiments.custom_head.parts:TwoConvHead"
  assert saved["loss"]["type"] == "experiments.custom_head.parts:balanced_multibox"
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  logged = [r for r in rows if "train/loss" in r]
  # The loop logs whatever the loss's aux dict holds (no 'loc' / 'conf' here).
  assert all({"train/loss_balanced_l1", "train/loss_ce", "train/loss_positives"} <= set(r)
             for r in logged)
  assert all(np.isfinite(r["train/loss"]) for r in logged)

  out = _run("-m", "ssdjax.main", "--mode=eval", f"--workdir={workdir}")
  assert '"voc07/mAP"' in out.stdout
  image = str(tmp_path / "shapes.png")
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), np.uint8)).save(image)
  out = _run("-m", "ssdjax.predict", f"--workdir={workdir}", "--min_score=0", image)
  with open(os.path.join(workdir, "predictions", "step_2", "detections.json")) as f:
    assert len(json.load(f)[0]["detections"]) > 0
  artifact = str(tmp_path / "detector.jax")
  _run("-m", "ssdjax.export", f"--workdir={workdir}", f"--out={artifact}")
  with open(artifact + ".json") as f:
    assert json.load(f)["model"]["head"] == "experiments.custom_head.parts:TwoConvHead"


def test_custom_head_in_the_head_ablation(tmp_path):
  workdir = str(tmp_path / "heads")
  sets = [a.replace("--config.", "") for a in TINY if "num_steps" not in a]
  # The default config (its head_kwargs are empty, so every head keeps its own defaults).
  args = ["experiments/head_ablation.py", f"--workdir={workdir}", "--seeds=0", "--steps=2",
          "--heads=ssd,experiments.custom_head.parts:TwoConvHead"]
  for s in sets:
    args += ["--set", s]
  out = _run(*args)
  with open(os.path.join(workdir, "results.json")) as f:
    rows = json.load(f)["rows"]
  assert [r["head"] for r in rows] == ["ssd", "experiments.custom_head.parts:TwoConvHead"]
  assert all(r["params"] > 0 and 0 <= r["voc07_map_mean"] <= 1 for r in rows)
  assert "experiments.custom_head.parts:TwoConvHead" in out.stdout
  assert os.path.isdir(os.path.join(workdir, "experiments.custom_head.parts-TwoConvHead", "seed0"))
