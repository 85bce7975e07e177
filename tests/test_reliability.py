"""Faults a real run meets: diverging updates, damaged checkpoints, changed configs, signals,
failed writes. Each test reproduces the fault and checks the run's answer to it."""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ssdjax import checkpoints
from ssdjax import train
from ssdjax.errors import UserError
from tests.helpers import REPO, small_config, subprocess_env

_HUGE_LR = {"optimizer.name": "sgd", "optimizer.learning_rate": 1e38,
            "optimizer.warmup_steps": 0}


def _tree_files(root):
  """{relative path: sha256} of every file under root."""
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


# ----------------------------------------------------------------------------------------------
# 1. A finite loss and gradient whose update overflows.


def test_an_update_that_overflows_is_not_applied():
  config = small_config(**_HUGE_LR)
  trainer = train.Trainer(config)
  state = trainer.init_state(0)
  before = jax.device_get(state["params"])
  from ssdjax import data  # pylint: disable=g-import-not-at-top
  batch = next(data.make_train_iterator(config, seed=0))
  state, metrics = trainer.train_step(state, trainer.to_device(batch))
  # The loss and the gradient are finite; only the update is not (the fault as reported).
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert int(state["nonfinite"]) == 1
  chex.assert_trees_all_equal(jax.device_get(state["params"]), before)
  assert checkpoints.all_finite(state)
  with pytest.raises(FloatingPointError, match=r"step 1 had a NaN/inf loss, gradient or update"):
    train.check_nonfinite(state, config, "test")


def test_the_reported_command_stops_naming_the_step_and_checkpoints_nothing_nonfinite(tmp_path):
  workdir = str(tmp_path / "w")
  cmd = [sys.executable, "-m", "ssdjax.main", "--config=configs/synthetic.py", f"--workdir={workdir}",
         "--config.optimizer.name=sgd", "--config.optimizer.learning_rate=1e38",
         "--config.optimizer.warmup_steps=0", "--config.train.checkpoint_every=1",
         "--config.data.synthetic.num_train=16", "--config.data.synthetic.num_val=4",
         "--config.data.num_workers=0", "--config.train.batch_size=4",
         "--config.eval.batch_size=4", "--config.train.num_steps=3"]
  out = subprocess.run(cmd, env=subprocess_env(), cwd=REPO, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 1, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: checkpoint at step 1: step 1 had a NaN/inf"), last
  ckpt = os.path.join(workdir, "checkpoints")
  assert not [d for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else True


def test_skip_mode_goes_on_without_the_step_up_to_its_limit(tmp_path):
  config = small_config(**_HUGE_LR, **{"train.on_nonfinite": "skip", "train.max_skipped_steps": 100,
                                       "train.num_steps": 3, "train.checkpoint_every": 1,
                                       "train.log_every": 1, "train.eval_every": 0})
  workdir = str(tmp_path / "skip")
  train.train_and_evaluate(config, workdir, progress=False)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    skipped = [json.loads(line)["train/skipped_steps"] for line in f if "train/loss" in line]
  assert len(skipped) == 3 and skipped[0] == 1 and skipped == sorted(skipped), skipped
  for step in (1, 2, 3):  # every checkpoint finite, though updates overflowed
    variables = train.restore_for_inference(workdir, step=step)[2]
    assert checkpoints.all_finite(variables)
  # More skipped steps than allowed stop the run.
  config.train.max_skipped_steps = 0
  with pytest.raises(FloatingPointError, match=r"step 1 had .*\(1 such step\(s\) in all"):
    train.train_and_evaluate(config, str(tmp_path / "limit"), progress=False)


def test_save_refuses_a_nonfinite_state(tmp_path):
  mngr = checkpoints.manager(str(tmp_path), 2)
  state = {"w": jax.numpy.array([1.0, np.inf]), "step": jax.numpy.array(3)}
  with pytest.raises(FloatingPointError, match="step 3 holds NaN/inf"):
    checkpoints.save(mngr, 3, {"state": ocp.args.StandardSave(state)}, state=state)
  assert mngr.all_steps() == []
  mngr.close()


# ----------------------------------------------------------------------------------------------
# 2. Damaged checkpoints.


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
  """A workdir with checkpoints at steps 1, 2 and 3 (and its config)."""
  workdir = str(tmp_path_factory.mktemp("ckpt") / "run")
  config = small_config(**{"train.num_steps": 3, "train.checkpoint_every": 1,
                           "train.keep_checkpoints": 3, "eval.metrics": ()})
  train.train_and_evaluate(config, workdir, progress=False)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2", "3"]
  return workdir


def _largest_file(folder):
  files = [os.path.join(d, n) for d, _, ns in os.walk(folder) for n in ns
           if n != checkpoints.CHECKSUMS]
  return max(files, key=os.path.getsize)


def _flip_bit(folder):
  path = _largest_file(folder)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x10]))


def _truncate(folder):
  path = _largest_file(folder)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _delete_state_file(folder):
  os.remove(_largest_file(folder))


def _garble_metadata(folder):
  path = os.path.join(folder, "_CHECKPOINT_METADATA")
  with open(path, "r+b") as f:
    f.write(b"#")  # same size, no longer JSON


def _delete_state_item(folder):
  shutil.rmtree(os.path.join(folder, "state"))


def _delete_checksums(folder):
  os.remove(os.path.join(folder, checkpoints.CHECKSUMS))


DAMAGE = {"bit_flip": (_flip_bit, "does not match its checksum"),
          "truncated": (_truncate, "bytes,"),
          "deleted_file": (_delete_state_file, "is missing"),
          "garbled_metadata": (_garble_metadata, "does not match its checksum"),
          "deleted_item": (_delete_state_item, "is missing"),
          "deleted_checksums": (_delete_checksums, "was not finished")}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(damage, three_checkpoints,
                                                                    tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(three_checkpoints, workdir)
  latest = os.path.join(workdir, "checkpoints", "3")
  damage_fn, message = DAMAGE[damage]
  damage_fn(latest)
  reference = jax.device_get(train.restore_for_inference(three_checkpoints, step=2)[2])

  config = train.load_config(workdir)
  trainer = train.Trainer(config)
  args = ocp.args.Composite(state=ocp.args.StandardRestore(trainer.restore_target()))
  for move_bad in (False, True):
    # Read-only users (eval, predict, export) skip it, naming it, and leave it in place; training
    # moves it aside (never deletes it). Both go on with step 2.
    reports = []
    mngr = checkpoints.manager(workdir, 3, read_only=not move_bad)
    items, step = checkpoints.restore_newest_good(mngr, lambda s: mngr.restore(s, args=args),
                                                  move_bad=move_bad, report=reports.append)
    assert step == 2 and len(reports) == 1
    assert latest in reports[0] and message in reports[0], reports
    chex.assert_trees_all_equal(jax.device_get(trainer.variables(items["state"])), reference)
    assert mngr.all_steps() == ([1, 2] if move_bad else [1, 2, 3])
    mngr.close()
  bad = os.listdir(os.path.join(workdir, checkpoints.BAD_DIR))
  assert len(bad) == 1 and bad[0].startswith("3-"), bad
  assert _tree_files(os.path.join(workdir, checkpoints.BAD_DIR, bad[0])) != {}


def test_training_resumes_from_the_newest_good_checkpoint(three_checkpoints, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(three_checkpoints, workdir)
  _flip_bit(os.path.join(workdir, "checkpoints", "3"))
  config = train.load_config(workdir)
  config.train.num_steps = 4
  train.train_and_evaluate(config, workdir, progress=False)
  bad = os.listdir(os.path.join(workdir, checkpoints.BAD_DIR))
  assert len(bad) == 1 and bad[0].startswith("3-"), bad
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3", "4"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if "train/loss" in line]
  assert steps[-2:] == [3, 4]  # steps 3 and 4 were trained again after the fall-back


def test_when_every_checkpoint_is_damaged_training_starts_afresh(three_checkpoints, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(three_checkpoints, workdir)
  for step in (1, 2, 3):
    _flip_bit(os.path.join(workdir, "checkpoints", str(step)))
  config = train.load_config(workdir)
  config.train.num_steps = 3
  train.train_and_evaluate(config, workdir, progress=False)
  assert len(os.listdir(os.path.join(workdir, checkpoints.BAD_DIR))) == 3
  # The fresh start trains exactly as the original run did: same input, same parameters.
  chex.assert_trees_all_equal(jax.device_get(train.restore_for_inference(workdir)[2]),
                              jax.device_get(train.restore_for_inference(three_checkpoints)[2]))


def test_a_checkpoint_with_nonfinite_values_is_not_restored(three_checkpoints, tmp_path):
  """Intact files but NaN values (as a bit flip in an exponent can give, with checksums
  rewritten): the restored state is checked too."""
  workdir = str(tmp_path / "run")
  shutil.copytree(three_checkpoints, workdir)
  config = train.load_config(workdir)
  trainer = train.Trainer(config)
  mngr = checkpoints.manager(workdir, 3)
  args = ocp.args.Composite(state=ocp.args.StandardRestore(trainer.restore_target()))
  state = mngr.restore(3, args=args)["state"]
  state["params"] = jax.tree.map(lambda x: x * np.nan, state["params"])
  shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
  mngr.reload()
  mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  mngr.wait_until_finished()
  checkpoints.write_checksums(checkpoints.step_dir(mngr, 3))
  reports = []
  _, step = checkpoints.restore_newest_good(mngr, lambda s: mngr.restore(s, args=args),
                                            move_bad=True, report=reports.append)
  mngr.close()
  assert step == 2 and "NaN/inf" in reports[0] and "moved to" in reports[0]


def test_inference_names_a_damaged_requested_step(three_checkpoints, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(three_checkpoints, workdir)
  _flip_bit(os.path.join(workdir, "checkpoints", "2"))
  with pytest.raises(UserError, match=r"checkpoints/2 is damaged: .* does not match"):
    train.restore_for_inference(workdir, step=2)
  assert train.restore_for_inference(workdir)[3] == 3


# ----------------------------------------------------------------------------------------------
# 3. Resuming with a changed config.


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("resume") / "run")
  config = small_config(**{"train.num_steps": 2, "train.checkpoint_every": 2, "eval.metrics": ()})
  train.train_and_evaluate(config, workdir, progress=False)
  return workdir


@pytest.mark.parametrize("field,value", [("optimizer.learning_rate", 0.5),
                                         ("matching.strategy", "per_gt_best"),
                                         ("seed", 7),
                                         ("data.synthetic.seed", 3),
                                         ("model.head", "shared")])
def test_a_changed_config_is_refused_before_anything_is_written(field, value, two_steps, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(two_steps, workdir)
  before = _tree_files(workdir)
  config = small_config(**{"train.num_steps": 4, "train.checkpoint_every": 2, "eval.metrics": ()})
  section, _, name = field.rpartition(".")
  node = config
  for part in section.split(".") if section else []:
    node = node[part]
  node[name] = value
  with pytest.raises(UserError, match=rf"changed: .*{field}: "):
    train.train_and_evaluate(config, workdir, progress=False)
  assert _tree_files(workdir) == before
  if field.startswith("model."):  # a changed model is refused even when asked for
    with pytest.raises(UserError, match="new --workdir"):
      train.train_and_evaluate(config, workdir, progress=False, allow_config_change=True)
    assert _tree_files(workdir) == before


def test_safe_and_allowed_changes_resume_and_are_recorded(two_steps, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(two_steps, workdir)
  config = small_config(**{"train.num_steps": 3, "train.checkpoint_every": 2, "eval.metrics": ()})
  train.train_and_evaluate(config, workdir, progress=False)
  config = small_config(**{"train.num_steps": 4, "train.checkpoint_every": 2, "eval.metrics": (),
                           "optimizer.learning_rate": 0.002})
  train.train_and_evaluate(config, workdir, progress=False, allow_config_change=True)
  with open(os.path.join(workdir, "config_changes.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [2, 3]
  assert rows[0]["changed"] == {"train.num_steps": {"old": 2, "new": 3}}
  assert rows[1]["changed"]["optimizer.learning_rate"]["new"] == 0.002
  assert train.load_config(workdir).optimizer.learning_rate == 0.002


# ----------------------------------------------------------------------------------------------
# 5. Signals and write failures.


@pytest.mark.slow
@pytest.mark.parametrize("sig,workers", [(signal.SIGTERM, 0), (signal.SIGINT, 2)])
def test_a_signal_saves_the_current_step_then_exits(sig, workers, tmp_path):
  """SIGTERM to the trainer (a scheduler), SIGINT to its whole process group with input workers
  (Ctrl-C in a terminal)."""
  workdir = str(tmp_path / "run")
  args = [sys.executable, "-m", "ssdjax.main", "--config=configs/synthetic.py",
          f"--workdir={workdir}", "--config.data.synthetic.num_train=64",
          "--config.data.synthetic.num_val=4", f"--config.data.num_workers={workers}",
          "--config.train.batch_size=4", "--config.eval.batch_size=4",
          "--config.train.num_steps=100000", "--config.train.checkpoint_every=100000",
          "--config.train.log_every=1", "--config.train.eval_every=0"]
  proc = subprocess.Popen(args, env=subprocess_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline:
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3:
      break
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    time.sleep(0.1)
  if workers:
    os.killpg(proc.pid, sig)
  else:
    proc.send_signal(sig)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + sig, err[-3000:]
  steps = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert len(steps) == 1 and 3 <= steps[0] < 100000, steps
  assert f"checkpoint at step {steps[0]} saved" in err
  # The checkpoint is complete and the rerun resumes from it.
  assert checkpoints.verify_checksums(os.path.join(workdir, "checkpoints", str(steps[0]))) is None
  resume = args[:-4] + ["--config.train.log_every=1", "--config.train.eval_every=0",
                        f"--config.train.num_steps={steps[0] + 1}",
                        "--config.train.checkpoint_every=100000"]
  out = subprocess.run(resume, env=subprocess_env(), cwd=REPO, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"at step {steps[0]}" in out.stderr


def test_a_failed_write_stops_the_run_at_its_step(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  real_save = ocp.CheckpointManager.save

  def full_disk_at_step_2(self, step, *a, **kw):
    if step == 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(self, step, *a, **kw)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk_at_step_2)
  config = small_config(**{"train.num_steps": 5, "train.checkpoint_every": 1,
                           "train.log_every": 1, "eval.metrics": ()})
  with pytest.raises(OSError, match=r"checkpoint at step 2 could not be written to .*checkpoints/2"):
    train.train_and_evaluate(config, workdir, progress=False)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]
