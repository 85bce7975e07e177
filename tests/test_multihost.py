"""Several processes, one run: two processes on localhost with 4 simulated CPU devices each (JAX's
distributed runtime, gloo collectives) against one process with 8.

Every child runs under a timeout, so a hang fails the test instead of blocking CI. The children
compile without XLA's optimizations (the same numbers, half the compile time). They share no
persistent compilation cache: on CPU with simulated devices, executables read back from it
broke collectives here (mismatched all-reduces, wrong losses).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ssdjax import distributed
from ssdjax import train
from ssdjax.errors import UserError
from tests.helpers import REPO, subprocess_env

_TIMEOUT_S = 5  # train.process_timeout_s of the children
_STEPS = 10
_ARGS = ["--config=configs/synthetic.py", "--config.data.synthetic.num_train=48",
         "--config.data.synthetic.num_val=12", "--config.data.num_workers=0",
         "--config.train.batch_size=8", "--config.eval.batch_size=8",
         f"--config.train.num_steps={_STEPS}", "--config.train.checkpoint_every=3",
         "--config.train.keep_checkpoints=4", "--config.train.log_every=1",
         "--config.train.eval_every=1000", "--config.optimizer.warmup_steps=2",
         f"--config.train.process_timeout_s={_TIMEOUT_S}"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = subprocess_env(devices=devices, xla_flags="--xla_backend_optimization_level=0")
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _start(cmd, processes: int, logs: str, extra=()):
  """Starts ``cmd`` as ``processes`` processes (1: one process with 8 devices, no jax.distributed);
  their stderr goes to ``logs``.p<i>.err."""
  port = _free_port()
  procs = []
  for i in range(processes):
    flags = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
              f"--process_id={i}"] if processes > 1 else [])
    with open(f"{logs}.p{i}.err", "w") as err:
      procs.append(subprocess.Popen(cmd + flags + list(extra), env=_env(8 // processes),
                                    cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True))
  return procs


def _wait(procs, logs: str, timeout: float = 400):
  """(return codes, stdouts, stderrs) of processes started by :func:`_start`; kills them all and
  fails on a hang."""
  deadline = time.time() + timeout
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=max(deadline - time.time(), 1))[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail(f"the processes hung; logs: {logs}.p*.err")
  errs = [open(f"{logs}.p{i}.err").read() for i in range(len(procs))]
  return [p.returncode for p in procs], outs, errs


def _train(workdir, processes, extra=()):
  cmd = [sys.executable, "-m", "ssdjax.main"] + _ARGS + [f"--workdir={workdir}"]
  return _start(cmd, processes, workdir, extra)


def _check_ok(result):
  codes, _, errs = result
  for code, err in zip(codes, errs):
    assert code == 0, err[-4000:]


def _losses(workdir) -> dict[int, float]:
  """{step: train/loss} of metrics.jsonl, the last row of each step."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def _params(workdir, step):
  _, _, variables, _ = train.restore_for_inference(workdir, step)
  return jax.tree.leaves(jax.device_get(variables))


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def _rel_l2(a, b) -> float:
  """|a - b| / |b| over all parameters."""
  return float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b))
                       / sum(np.sum(y ** 2) for y in b)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same steps trained by 2 processes (4 devices each) and by 1 process (8 devices)."""
  root = tmp_path_factory.mktemp("multihost")
  two, one = str(root / "two"), str(root / "one")
  t0 = time.perf_counter()
  procs = _train(two, 2) + _train(one, 1)
  result_two = _wait(procs[:2], two)
  _check_ok(result_two)
  _check_ok(_wait(procs[2:], one))
  return {"two": two, "one": one, "root": root, "seconds": time.perf_counter() - t0,
          "stdout_two": result_two[1]}


def _resumable_copy(workdir: str, dst: str, step: int) -> str:
  """A copy of ``workdir`` whose newest checkpoint is ``step`` (a run stopped there)."""
  shutil.copytree(workdir, dst)
  for d in os.listdir(os.path.join(dst, "checkpoints")):
    if d.isdigit() and int(d) > step:
      shutil.rmtree(os.path.join(dst, "checkpoints", d))
  os.remove(os.path.join(dst, "final_metrics.json"))
  return dst


@pytest.mark.slow
def test_two_processes_train_like_one_and_only_process_0_writes_records(runs):
  two, one = runs["two"], runs["one"]
  loss_two, loss_one = _losses(two), _losses(one)
  steps = list(range(1, _STEPS + 1))
  assert sorted(loss_two) == sorted(loss_one) == steps  # one row per step: process 0's
  # The same arithmetic up to the order of the cross-device sums (gloo across processes, XLA's
  # own within one): float32 rounding at first. Adam turns the last bit of a near-zero gradient
  # into a step of the learning rate, and the hard negative mining's sort flips near-ties, so
  # the difference grows every step, as between 1 and 8 devices of one process.
  np.testing.assert_allclose([loss_two[s] for s in (1, 2, 3)],
                             [loss_one[s] for s in (1, 2, 3)], rtol=1e-5)
  np.testing.assert_allclose([loss_two[s] for s in steps], [loss_one[s] for s in steps],
                             rtol=5e-2)
  params_two, params_one = _params(two, 3), _params(one, 3)
  diff, rel = _max_diff(params_two, params_one), _rel_l2(params_two, params_one)
  print(f"\n1 vs 2 processes: losses {[loss_one[s] for s in steps]} vs "
        f"{[loss_two[s] for s in steps]}; at step 3 max |param difference| {diff:.3g}, "
        f"relative L2 {rel:.3g}; both runs took {runs['seconds']:.0f} s")
  assert rel < 1e-3 and diff < 1e-2
  # Records, metrics and stdout from process 0 only; each process saved its input position.
  with open(os.path.join(two, "version.json")) as f:
    assert json.load(f)["processes"] == 2
  for name in ("config.json", "anchors.npy", "final_metrics.json"):
    assert os.path.exists(os.path.join(two, name)), name
  stdout = runs["stdout_two"]
  assert json.loads(stdout[0][stdout[0].index("{"):])["voc07/mAP"] >= 0
  assert "{" not in stdout[1]
  last = os.path.join(two, "checkpoints", str(_STEPS))
  assert [d for d in sorted(os.listdir(os.path.join(last, "data"))) if d.startswith("process_")] \
      == ["process_0-of-2.json", "process_1-of-2.json"]
  assert os.path.exists(os.path.join(last, "ssdjax_checksums.json"))


@pytest.mark.slow
def test_a_checkpoint_of_two_processes_resumes_in_one(runs):
  """The input continues at the checkpoint's step of the same global stream, so the resumed
  steps see the batches of the uninterrupted run."""
  workdir = _resumable_copy(runs["two"], str(runs["root"] / "two_then_one"), 3)
  codes, _, errs = _wait(_train(workdir, 1), workdir)
  assert codes == [0], errs[0][-4000:]
  assert "continues at global batch 3" in errs[0], errs[0][-3000:]
  straight, again = _losses(runs["two"]), _losses(workdir)
  later = range(4, _STEPS + 1)
  np.testing.assert_allclose([again[s] for s in later], [straight[s] for s in later], rtol=1e-3)
  a, b = _params(workdir, _STEPS), _params(runs["two"], _STEPS)
  print(f"\n2 processes to step 3, then 1 process, vs 2 processes throughout: at step {_STEPS} "
        f"max |param difference| {_max_diff(a, b):.3g}, relative L2 {_rel_l2(a, b):.3g}")
  assert _rel_l2(a, b) < 1e-2
  with open(os.path.join(workdir, "checkpoints", str(_STEPS), "data", "process_0-of-1.json")) as f:
    assert json.load(f)["ssdjax_start_step"] == 3  # recorded with the position, for a later resume


_EVAL_SCRIPT = """
import json, sys
from ssdjax import distributed, train
workdir, port, count, index = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if count > 1:
  distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=count,
                         process_id=index, timeout_s=30)
config = train.load_config(workdir)
config.eval.max_images = 11  # 6 + 5 images over 2 processes: both pad their last batch
_, trainer, variables, _ = train.restore_for_inference(workdir, config=config)
metrics, dets = train.evaluate(trainer, variables)
distributed.finish()
print(json.dumps({"metrics": metrics, "image_ids": [d["image_id"] for d in dets],
                  "boxes": sum(len(d["scores"]) for d in dets)}))
"""


@pytest.mark.slow
def test_evaluation_over_two_processes_equals_one(runs):
  results = {}
  started = {}
  for count in (2, 1):
    port = _free_port()
    logs = str(runs["root"] / f"eval{count}")
    procs = []
    for i in range(count):
      with open(f"{logs}.p{i}.err", "w") as err:
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _EVAL_SCRIPT, runs["two"], str(port), str(count), str(i)],
            env=_env(8 // count), cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True))
    started[count] = (procs, logs)
  for count, (procs, logs) in started.items():
    codes, outs, errs = _wait(procs, logs)
    assert codes == [0] * count, errs[0][-4000:]
    results[count] = [json.loads(o.strip().splitlines()[-1]) for o in outs]
  one, two = results[1][0], results[2]
  assert two[0] == two[1]  # every process scores all detections
  assert len(one["image_ids"]) == len(set(one["image_ids"])) == 11
  assert two[0]["image_ids"] == one["image_ids"]  # each image once, in source order
  assert two[0]["boxes"] == one["boxes"] > 0
  assert two[0]["metrics"] == one["metrics"]  # exactly
  print(f"\neval over 2 processes == over 1: {len(one['metrics'])} metrics, max difference 0")


@pytest.mark.slow
def test_one_to_two_processes_then_one_is_lost_then_both_are_preempted(runs):
  """A checkpoint of one process continues in two; killing one of them ends the other with an
  error naming it; the rerun resumes, and a SIGTERM to one process saves the same step in both."""
  workdir = _resumable_copy(runs["one"], str(runs["root"] / "one_then_two"), 3)
  ckpt = os.path.join(workdir, "checkpoints")
  procs = _train(workdir, 2, ["--config.train.checkpoint_every=1"])
  deadline = time.time() + 300
  while not os.path.exists(os.path.join(ckpt, "4", "ssdjax_checksums.json")):
    assert all(p.poll() is None for p in procs), open(f"{workdir}.p0.err").read()[-3000:]
    assert time.time() < deadline, "no checkpoint within 300 s"
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGKILL)
  t_kill = time.perf_counter()
  codes, _, errs = _wait(procs, workdir, timeout=120)
  seconds = time.perf_counter() - t_kill
  assert codes[0] == 1, errs[0][-3000:]
  last = errs[0].strip().splitlines()[-1]
  assert last.startswith("error: process 1 of 2 is lost:"), last
  assert f"train.process_timeout_s={_TIMEOUT_S}" in last and "resumes" in last
  assert seconds < _TIMEOUT_S + 15, seconds
  print(f"\nprocess 0 exited {seconds:.1f} s after process 1 was killed: {last}")
  assert "continues at global batch 3" in errs[0]
  np.testing.assert_allclose(_losses(workdir)[4], _losses(runs["one"])[4], rtol=1e-3)

  # The rerun resumes from the newest complete checkpoint; SIGTERM reaches process 1 only.
  procs = _train(workdir, 2, ["--config.train.checkpoint_every=0"])
  while "resumed from" not in open(f"{workdir}.p0.err").read():
    assert all(p.poll() is None for p in procs) and time.time() < deadline
    time.sleep(0.05)
  before = {int(d) for d in os.listdir(ckpt) if d.isdigit()}
  procs[1].send_signal(signal.SIGTERM)
  codes, _, errs = _wait(procs, workdir, timeout=200)
  assert codes == [143, 143], errs[0][-3000:]
  (saved,) = {int(d) for d in os.listdir(ckpt) if d.isdigit()} - before
  assert max(before) < saved < _STEPS
  assert all(f"checkpoint at step {saved} saved" in e for e in errs)
  assert os.path.exists(os.path.join(ckpt, str(saved), "ssdjax_checksums.json"))


# ----------------------------------------------------------------------------------------------
# In process: when jax.distributed starts.


def test_a_single_process_does_not_start_jax_distributed(monkeypatch):
  for var in ("SLURM_NTASKS", "SLURM_STEP_NODELIST", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  assert distributed.launch_environment() is None
  assert distributed.initialize(timeout_s=5) is False
  assert distributed.initialize(mode="off", timeout_s=5) is False
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node1")
  assert distributed.launch_environment() is None  # a one-task SLURM step
  monkeypatch.setenv("SLURM_NTASKS", "16")
  assert distributed.launch_environment() == "SLURM (16 tasks)"
  monkeypatch.delenv("SLURM_NTASKS")
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
  assert distributed.launch_environment() == "Open MPI (4 ranks)"
  assert distributed.is_main()
  distributed.barrier("alone")  # no-ops with one process
  assert distributed.agree(7) == 7 and distributed.any_process(True)


def test_bad_launch_flags_are_one_line_errors():
  with pytest.raises(UserError, match="--num_processes given with --distributed=off"):
    distributed.initialize(mode="off", num_processes=2, timeout_s=5)
  with pytest.raises(UserError, match=r"--process_id=2 must be in 0..1"):
    distributed.initialize(num_processes=2, process_id=2, timeout_s=5)
  with pytest.raises(UserError, match="--distributed='maybe'"):
    distributed.initialize(mode="maybe", timeout_s=5)
