"""Training loop: end to end, multi-device equivalence, exact resume after SIGKILL, NaN guard, configs."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssdjax import train
from tests.helpers import REPO, small_config, subprocess_env



def _env(devices: int = 1) -> dict:
  return subprocess_env(devices=devices)


def test_train_and_evaluate_end_to_end_and_predict(tmp_path):
  from ssdjax import data, predict  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "run")
  config = small_config()
  config.train.checkpoint_every = 2
  config.train.keep_checkpoints = 2
  final = train.train_and_evaluate(config, workdir, progress=False)
  for key in ("voc07/mAP", "voc/mAP", "coco/AP", "coco/AP50", "train/loss"):
    assert key in final and np.isfinite(final[key]), key
  for name in ("config.json", "anchors.npy", "version.json", "metrics.jsonl", "final_metrics.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]  # the last 2 of 2, 4, 6
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
  assert np.array_equal(np.load(os.path.join(workdir, "anchors.npy")), train.anchors_lib.from_config(config))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [2, 4, 6]
  assert all(r["train/images_per_sec"] > 0 for r in train_rows)
  assert any("eval/voc07/mAP" in r for r in rows)
  # Recorded as trained: resolved (augment.on_device from the platform), parts by import path.
  assert train.load_config(workdir).to_dict() == train.prepare_config(config).to_dict()
  assert train.load_config(workdir).augment.on_device is (jax.default_backend() != "cpu")

  # Predict on two validation images written as files.
  source = data.make_source(config, config.data.eval)
  files = []
  for i in range(2):
    path = str(tmp_path / f"img{i}.png")
    from PIL import Image  # pylint: disable=g-import-not-at-top
    Image.fromarray(source[i]["image"]).save(path)
    files.append(path)
  out = str(tmp_path / "pred")
  records = predict.predict_files(workdir, files, out, min_score=0.0)
  assert [r["file"] for r in records] == [os.path.abspath(f) for f in files]
  for f in files:
    assert os.path.exists(os.path.join(out, os.path.basename(f)))
  with open(os.path.join(out, "detections.json")) as fh:
    assert json.load(fh) == json.loads(json.dumps(records))


def test_nonfinite_step_is_not_applied_and_is_reported():
  config = small_config()
  trainer = train.Trainer(config)
  state = trainer.init_state(0)
  params_before = jax.device_get(state["params"])
  s = config.image_size
  batch = {
      "images": np.full((8, s, s, 3), np.nan, np.float32),
      "gt_boxes": np.tile(np.array([[0.1, 0.1, 0.5, 0.5]], np.float32), (8, config.data.max_boxes, 1)),
      "gt_labels": np.ones((8, config.data.max_boxes), np.int32),
      "gt_mask": np.ones((8, config.data.max_boxes), bool),
  }
  state, metrics = trainer.train_step(state, trainer.to_device(batch))
  assert not np.isfinite(float(metrics["loss"]))
  assert int(state["nonfinite"]) == 1 and int(state["first_nonfinite"]) == 0
  chex.assert_trees_all_equal(jax.device_get(state["params"]), params_before)
  with pytest.raises(FloatingPointError, match="step 1 had a NaN"):
    train.check_nonfinite(state, config, "test")


def test_train_step_is_compiled_once():
  config = small_config()
  trainer = train.Trainer(config)
  state = trainer.init_state(0)
  s, g = config.image_size, config.data.max_boxes

  def batch(n):
    return trainer.to_device({
        "images": np.zeros((n, s, s, 3), np.float32), "gt_boxes": np.zeros((n, g, 4), np.float32),
        "gt_labels": np.zeros((n, g), np.int32), "gt_mask": np.zeros((n, g), bool)})

  for _ in range(3):
    state, _ = trainer.train_step(state, batch(8))
  with pytest.raises(AssertionError, match="trace"):
    trainer.train_step(state, batch(16))


def test_config_validation():
  c = small_config()
  with pytest.raises(ValueError, match="multiple of the device count"):
    train.validate_config(c, num_devices=3)
  c = small_config()
  c.class_names = None
  with pytest.raises(ValueError, match="class_names is not resolved"):
    train.validate_config(c, num_devices=1)
  c = small_config()
  c.model.head = "nope"
  with pytest.raises(ValueError, match="ssdlite"):
    train.validate_config(c, num_devices=1)
  c = small_config()
  c.optimizer.name = "lamb"
  with pytest.raises(ValueError, match="sgd"):
    train.make_optimizer(c)


def test_schedules():
  c = small_config()
  c.optimizer.schedule = "piecewise"
  c.optimizer.learning_rate = 1.0
  c.optimizer.warmup_steps = 10
  c.optimizer.boundaries = (50, 80)
  c.optimizer.decay_factor = 0.1
  sched = train.make_schedule(c)
  expected = {0: 0.0, 5: 0.5, 10: 1.0, 49: 1.0, 50: 0.1, 79: 0.1, 80: 0.01, 200: 0.01}
  for step, lr in expected.items():
    assert float(sched(step)) == pytest.approx(lr, rel=1e-5, abs=1e-7), step
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 0
  c.train.num_steps = 100
  sched = train.make_schedule(c)
  assert float(sched(0)) == pytest.approx(1.0)
  assert float(sched(50)) == pytest.approx(0.5, abs=1e-6)
  assert float(sched(100)) == pytest.approx(0.0, abs=1e-7)


def test_weight_decay_skips_biases():
  c = small_config()
  c.optimizer.name = "sgd"
  c.optimizer.weight_decay = 0.5
  c.optimizer.momentum = 0.0
  c.optimizer.schedule = "piecewise"
  c.optimizer.warmup_steps = 0
  c.optimizer.learning_rate = 1.0
  tx = train.make_optimizer(c)
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["kernel"], 0.5)  # 1 - lr * wd * 1
  np.testing.assert_allclose(new["bias"], 1.0)


_CURVE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from tests.helpers import small_config
    from ssdjax import data, train
    config = small_config()
    config.train.batch_size = 16
    trainer = train.Trainer(config)
    state = trainer.init_state(0)
    it = data.make_train_iterator(config, seed=0)
    losses = []
    for _ in range(4):
      state, m = trainer.train_step(state, trainer.to_device(next(it)))
      losses.append(float(m["loss"]))
    leaf = jax.device_get(state["params"]["head"]["conf_0"]["kernel"]).ravel()[:16].tolist()
    print(json.dumps({"devices": jax.device_count(), "losses": losses, "leaf": leaf}))
""")


def _curve(devices: int) -> dict:
  out = subprocess.run([sys.executable, "-c", _CURVE_SCRIPT], env=_env(devices), cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_eight_devices_give_the_same_loss_curve_as_one():
  one, eight = _curve(1), _curve(8)
  assert one["devices"] == 1 and eight["devices"] == 8
  assert len(set(one["losses"])) > 1  # the curve moves
  # Sums over a sharded batch run in another order, and Adam amplifies the last bits a little each
  # step; a wrong sharding (say, per-device normalization or batch statistics) differs by percents.
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(eight["leaf"], one["leaf"], rtol=1e-3, atol=1e-5)


_MAIN_ARGS = ["--config=configs/synthetic.py", "--config.data.synthetic.num_train=48",
              "--config.data.synthetic.num_val=8", "--config.data.num_workers=0",
              "--config.train.batch_size=8", "--config.eval.batch_size=8",
              "--config.train.num_steps=30", "--config.train.checkpoint_every=5",
              "--config.train.log_every=5", "--config.train.eval_every=1000"]


def _final_params(workdir):
  _, _, variables, step = train.restore_for_inference(workdir)
  return jax.device_get(variables), step


@pytest.mark.slow
def test_sigkill_and_rerun_resumes_to_identical_parameters(tmp_path):
  cmd = [sys.executable, "-m", "ssdjax.main"] + _MAIN_ARGS
  killed, straight = str(tmp_path / "killed"), str(tmp_path / "straight")

  proc = subprocess.Popen(cmd + [f"--workdir={killed}"], env=_env(), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = os.path.join(killed, "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline:
    if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
      break
    assert proc.poll() is None, "training exited before its first checkpoint"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps_at_kill = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert steps_at_kill and max(steps_at_kill) < 30, steps_at_kill
  assert not os.path.exists(os.path.join(killed, "final_metrics.json"))

  for workdir in (killed, straight):
    out = subprocess.run(cmd + [f"--workdir={workdir}"], env=_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
  resumed, step_a = _final_params(killed)
  reference, step_b = _final_params(straight)
  assert step_a == step_b == 30
  chex.assert_trees_all_equal(resumed, reference)  # bitwise


def test_unknown_config_field_is_an_error(tmp_path):
  out = subprocess.run([sys.executable, "-m", "ssdjax.main", "--config=configs/synthetic.py",
                        "--config.train.not_a_field=3", f"--workdir={tmp_path}"],
                       env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "not_a_field" in out.stderr


def test_two_trainers_in_one_process_each_compile_once():
  config = small_config()
  s, g = config.image_size, config.data.max_boxes
  for _ in range(2):
    trainer = train.Trainer(config)
    state = trainer.init_state(0)
    batch = trainer.to_device({
        "images": np.zeros((8, s, s, 3), np.float32), "gt_boxes": np.zeros((8, g, 4), np.float32),
        "gt_labels": np.zeros((8, g), np.int32), "gt_mask": np.zeros((8, g), bool)})
    trainer.train_step(state, batch)


def _batch(config, n, *, boxes: bool):
  s, g = config.image_size, config.data.max_boxes
  rng = np.random.default_rng(0)
  gt_mask = np.zeros((n, g), bool)
  if boxes:
    gt_mask[:, :2] = True
  return {
      "images": rng.normal(size=(n, s, s, 3)).astype(np.float32),
      "gt_boxes": np.where(gt_mask[..., None], np.array([0.2, 0.2, 0.6, 0.7], np.float32), 0.0),
      "gt_labels": np.where(gt_mask, 1, 0).astype(np.int32), "gt_mask": gt_mask}


def test_batch_without_any_box_trains_finite():
  config = small_config()
  trainer = train.Trainer(config)
  state = trainer.init_state(0)
  state, metrics = trainer.train_step(state, trainer.to_device(_batch(config, 8, boxes=False)))
  assert float(metrics["loss"]) == 0.0 and float(metrics["loss_num_pos"]) == 0.0
  assert int(state["nonfinite"]) == 0
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state["params"])))


def test_bfloat16_compute_keeps_float32_params():
  config = small_config(**{"model.compute_dtype": "bfloat16"})
  trainer = train.Trainer(config)
  state = trainer.init_state(0)
  state, metrics = trainer.train_step(state, trainer.to_device(_batch(config, 8, boxes=True)))
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss_num_pos"]) > 0
  assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}


def test_load_config_fills_fields_added_after_the_run(tmp_path):
  config = small_config()
  raw = json.loads(config.to_json_best_effort())
  del raw["optimizer"]["grad_clip_norm"]  # as if written before the field existed
  raw["train"]["num_steps"] = 7
  (tmp_path / "config.json").write_text(json.dumps(raw))
  loaded = train.load_config(str(tmp_path))
  assert loaded.optimizer.grad_clip_norm == 0.0  # the default of configs/ssd300_voc.py
  assert loaded.train.num_steps == 7 and loaded.image_size == config.image_size
  assert loaded.anchors.aspect_ratios == config.anchors.aspect_ratios


def test_fields_without_default_are_settable_from_the_command_line(tmp_path):
  missing = str(tmp_path / "no_such_folder")
  out = subprocess.run([sys.executable, "-m", "ssdjax.main", "--config=configs/synthetic.py",
                        "--config.data.source=coco_json", f"--config.data.data_dir={missing}",
                        f"--workdir={tmp_path / 'run'}"],
                       env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert f"{missing}/annotations/train.json not found" in out.stderr  # the value reached the source


def test_evaluate_uses_only_the_first_max_images():
  config = small_config(**{"eval.max_images": 3})
  trainer = train.Trainer(config)
  state = trainer.init_state(0)
  metrics, dets = train.evaluate(trainer, trainer.variables(state))
  from ssdjax import data  # pylint: disable=g-import-not-at-top
  first = [g["image_id"] for g in data.eval_ground_truth(small_config())[:3]]
  assert [d["image_id"] for d in dets] == first
  assert "voc07/mAP" in metrics


def test_zero_periods_mean_only_at_the_end(tmp_path):
  workdir = str(tmp_path / "run")
  config = small_config(**{"train.num_steps": 4, "train.log_every": 0, "train.eval_every": 0,
                           "train.checkpoint_every": 0})
  final = train.train_and_evaluate(config, workdir, progress=False)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "train/loss" in r] == [4]
  assert [r["step"] for r in rows if "eval/voc07/mAP" in r] == [4]
  assert "voc07/mAP" in final
  # eval.metrics=() evaluates nothing at all.
  config = small_config(**{"train.num_steps": 2, "eval.metrics": ()})
  final = train.train_and_evaluate(config, str(tmp_path / "noeval"), progress=False)
  assert set(final) == {"train/loss"}


def test_evaluation_is_scored_beside_training(tmp_path, monkeypatch):
  """With eval.overlap, scoring the step-2 evaluation runs in another thread while steps 3.. train:
  the patched scorer waits until the loop has written step 4's training metrics, which it could
  never do if the loop waited for it. The metrics equal those scored in the loop's own thread."""
  real_score = train.score
  seen = []

  def score_after_training_moved_on(config, gt, dets):
    path = os.path.join(str(tmp_path / "overlap"), "metrics.jsonl")
    deadline = time.time() + 120
    moved_on = False
    while time.time() < deadline and not moved_on:
      with open(path) as f:
        moved_on = any(json.loads(line).get("step", 0) >= 4 for line in f)
      time.sleep(0.05)
    seen.append((threading.current_thread().name, moved_on))
    return real_score(config, gt, dets)

  def eval_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [r for r in map(json.loads, f) if "eval/voc07/mAP" in r]

  overrides = {"train.num_steps": 6, "train.log_every": 1, "train.eval_every": 2,
               "train.checkpoint_every": 0}
  monkeypatch.setattr(train, "score", score_after_training_moved_on)
  train.train_and_evaluate(small_config(**overrides), str(tmp_path / "overlap"), progress=False)
  monkeypatch.setattr(train, "score", real_score)
  # Step 2's and step 4's scoring ran in the background thread after the loop moved on; the
  # final (step 6) evaluation was scored in the loop's thread.
  assert seen[0] == ("ssdjax-eval-scoring_0", True), seen
  assert seen[-1][0] == threading.current_thread().name, seen
  overlapped = eval_rows(str(tmp_path / "overlap"))
  assert [r["step"] for r in overlapped] == [2, 4, 6]

  overrides["eval.overlap"] = False
  train.train_and_evaluate(small_config(**overrides), str(tmp_path / "inline"), progress=False)
  assert overlapped == eval_rows(str(tmp_path / "inline"))


def test_an_evaluation_being_scored_is_written_when_the_run_stops(tmp_path, monkeypatch):
  """The input fails right after step 3, while step 2's evaluation is still being scored in the
  background: the run raises, and step 2's metrics are written first, not lost."""
  real_score, real_next = train.score, train.DevicePrefetch.__next__
  calls = []

  def slow_score(config, gt, dets):
    time.sleep(3)
    return real_score(config, gt, dets)

  def failing_next(self):
    calls.append(1)
    if len(calls) == 4:
      raise RuntimeError("input failed")
    return real_next(self)

  monkeypatch.setattr(train, "score", slow_score)
  monkeypatch.setattr(train.DevicePrefetch, "__next__", failing_next)
  workdir = str(tmp_path / "run")
  config = small_config(**{"train.num_steps": 6, "train.log_every": 1, "train.eval_every": 2,
                           "train.checkpoint_every": 0})
  with pytest.raises(RuntimeError, match="input failed"):
    train.train_and_evaluate(config, workdir, progress=False)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
  assert [r["step"] for r in rows if "eval/voc07/mAP" in r] == [2]
