"""The experiment scripts, run as a user runs them: head ablation (and its reuse), anchor stats."""

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

from ssdjax import anchors as anchors_lib
from ssdjax import data
from ssdjax.models import heads
from tests.helpers import REPO, subprocess_env, synthetic


TINY = ["--seeds", "0", "--steps", "2"] + [
    arg for s in ("data.synthetic.num_train=32", "data.synthetic.num_val=8", "train.batch_size=8",
                  "eval.batch_size=8", "data.num_workers=0", "train.log_every=1",
                  "train.checkpoint_every=2", "train.eval_every=100")
    for arg in ("--set", s)]


def _env() -> dict:
  # Two-step runs of five models are all compilation; unoptimized CPU code halves that.
  return subprocess_env(xla_flags="--xla_backend_optimization_level=0")


def _run(script: str, args: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, os.path.join("experiments", script)] + args, env=_env(),
                        cwd=REPO, capture_output=True, text=True, timeout=600)


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_head_ablation_trains_every_head_then_reuses_the_runs(tmp_path):
  workdir = str(tmp_path / "heads")
  t0 = time.perf_counter()
  first = _run("head_ablation.py", ["--workdir", workdir] + TINY)
  first_s = time.perf_counter() - t0
  assert first.returncode == 0, first.stderr[-3000:]
  names = list(heads.REGISTRY.builtin_names())
  assert first.stdout.count(": trained in ") == len(names)

  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  rows = results["rows"]
  assert [r["head"] for r in rows] == names
  for r in rows:
    assert r["num_seeds"] == 1 and r["voc07_map_std"] is None and r["coco_ap_std"] is None
    assert isinstance(r["params"], int) and r["params"] > 0
    assert 0.0 <= r["voc07_map_mean"] <= 1.0 and 0.0 <= r["coco_ap_mean"] <= 1.0
    assert _finite(r["images_per_sec_mean"]) and r["images_per_sec_mean"] > 0
    run_dir = os.path.join(workdir, r["head"], "seed0")
    with open(os.path.join(run_dir, "final_metrics.json")) as f:
      final = json.load(f)
    assert r["voc07_map_mean"] == final["voc07/mAP"] and r["coco_ap_mean"] == final["coco/AP"]
    with open(os.path.join(run_dir, "config.json")) as f:
      run_config = json.load(f)
    assert run_config["model"]["head"] == r["head"] and run_config["train"]["num_steps"] == 2
  # A fully connected head over all feature maps is much larger than any convolutional one.
  params = {r["head"]: r["params"] for r in rows}
  assert params["dense"] > 5 * max(v for k, v in params.items() if k != "dense")

  with open(os.path.join(workdir, "results.md")) as f:
    table = f.read()
  assert first.stdout.endswith(table.split("\n\n", 1)[1])  # the printed table is the written one
  table_rows = [line for line in table.splitlines() if line.startswith("| ") and
                line.split("|")[1].strip() in names]
  assert [line.split("|")[1].strip() for line in table_rows] == names
  for line, r in zip(table_rows, rows):
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[1] == f"{r['params']:,}" and float(cells[2]) == round(r["voc07_map_mean"], 4)
    assert all(math.isfinite(float(c.replace(",", ""))) for c in cells[1:])

  finals = {n: os.path.getmtime(os.path.join(workdir, n, "seed0", "final_metrics.json"))
            for n in names}
  t0 = time.perf_counter()
  second = _run("head_ablation.py", ["--workdir", workdir] + TINY)
  second_s = time.perf_counter() - t0
  assert second.returncode == 0, second.stderr[-3000:]
  assert second.stdout.count(": reused in ") == len(names) and ": trained in " not in second.stdout
  assert second_s < first_s / 2, (second_s, first_s)
  for n in names:
    assert os.path.getmtime(os.path.join(workdir, n, "seed0", "final_metrics.json")) == finals[n]
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == results


def test_head_ablation_rejects_an_unknown_field(tmp_path):
  out = _run("head_ablation.py", ["--workdir", str(tmp_path), "--set", "train.not_a_field=3"])
  assert out.returncode != 0
  assert "not_a_field" in out.stderr and "batch_size" in out.stderr  # names the valid fields
  assert not os.path.exists(os.path.join(tmp_path, "results.json"))


def _iou(a, b):
  """a: [N, 4], b: [M, 4] xyxy -> [N, M], float64."""
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=-1)
  return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def test_anchor_stats_on_synthetic(tmp_path):
  out_json, draw_dir = str(tmp_path / "stats.json"), str(tmp_path / "png")
  out = _run("anchor_stats.py", ["--config", "configs/synthetic.py", "--num_images", "16",
                                 "--no_augment", "--draw", "1", "--draw_dir", draw_dir,
                                 "--out", out_json, "--set", "data.synthetic.num_train=16",
                                 "--set", "data.num_workers=0"])
  assert out.returncode == 0, out.stderr[-3000:]
  with open(out_json) as f:
    stats = json.load(f)
  strategies = stats["strategies"]
  assert set(strategies) == {"bipartite", "per_gt_best"}
  for s in strategies.values():
    assert 0.0 <= s["matched_gt_fraction"] <= 1.0
    assert s["positives_per_gt"] >= s["matched_gt_fraction"]  # a matched gt has >= 1 positive
  # Bipartite matching gives every gt that overlaps any anchor an anchor of its own.
  bipartite, per_gt_best = strategies["bipartite"], strategies["per_gt_best"]
  assert bipartite["matched_gt_fraction"] >= per_gt_best["matched_gt_fraction"]
  hist = stats["best_iou"]["histogram"]
  assert list(hist) == ["0.0-0.3", "0.3-0.5", "0.5-0.7", "0.7-1.0"]
  assert all(0.0 <= v <= 1.0 for v in hist.values()) and math.isclose(sum(hist.values()), 1.0)
  assert 0.0 <= stats["best_iou"]["mean"] <= 1.0

  # 16 unaugmented images from a 16-image split are that split, shuffled: recompute from the source.
  config = synthetic.get_config()
  config.data.synthetic.num_train = 16
  source = data.make_source(config, "train")
  gt = np.concatenate([source[i]["boxes"] for i in range(len(source))]).astype(np.float64)
  cxcywh = anchors_lib.from_config(config).astype(np.float64)
  anchors_xyxy = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2,
                                 cxcywh[:, :2] + cxcywh[:, 2:] / 2], axis=1)
  best = _iou(gt, anchors_xyxy).max(axis=1)  # [N]
  assert stats["num_gt"] == len(gt) and stats["num_anchors"] == len(anchors_xyxy)
  counts, _ = np.histogram(best, bins=[0.0, 0.3, 0.5, 0.7, 1.0])
  np.testing.assert_allclose(list(hist.values()), counts / len(gt), atol=1e-9)
  np.testing.assert_allclose(stats["best_iou"]["mean"], best.mean(), rtol=1e-5)
  np.testing.assert_allclose(bipartite["matched_gt_fraction"], np.mean(best > 1e-6))

  assert stats["drawn"] == [os.path.join(draw_dir, "anchors_000.png")]
  with Image.open(stats["drawn"][0]) as img:
    assert img.size[0] >= config.image_size and img.mode == "RGB"
  assert "bipartite" in out.stdout and "per_gt_best" in out.stdout
