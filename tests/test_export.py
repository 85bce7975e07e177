"""Export: the serialized artifact runs with plain JAX and reproduces trainer.predict's detections."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

pytest.importorskip("flatbuffers", reason="jax.export serialization needs the flatbuffers package")

import ssdjax  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.helpers import SHAPE_CLASSES  # pylint: disable=wrong-import-position
from ssdjax import export  # pylint: disable=wrong-import-position
from ssdjax import train  # pylint: disable=wrong-import-position
from tests.helpers import REPO, small_config, subprocess_env  # pylint: disable=wrong-import-position

FIELDS = ("boxes", "scores", "classes", "valid")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("export") / "run")
  config = small_config(**{"train.num_steps": 2, "train.checkpoint_every": 2})
  train.train_and_evaluate(config, workdir, progress=False)
  _, trainer, variables, _ = train.restore_for_inference(workdir)

  def reference(images) -> dict:
    out = jax.device_get(trainer.predict(variables, trainer.shard(images)))
    return {k: np.asarray(getattr(out, k)) for k in FIELDS}

  return workdir, config, reference


@pytest.fixture(scope="module")
def artifacts(run, tmp_path_factory):
  """A polymorphic artifact from the CLI and a fixed-batch (2), two-platform one from the library."""
  workdir = run[0]
  out = tmp_path_factory.mktemp("artifacts")
  poly, fixed = str(out / "poly.jax"), str(out / "fixed" / "b2.jax")
  # The CLI (polymorphic by default) runs in a subprocess while the library export runs here.
  cli = subprocess.Popen([sys.executable, "-m", "ssdjax.export", f"--workdir={workdir}",
                          f"--out={poly}"], env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
  try:
    export.export_to_file(workdir, fixed, batch_size=2, platforms=("cpu", "cuda"))
    stdout, stderr = cli.communicate(timeout=300)
  finally:
    if cli.poll() is None:
      cli.kill()
      cli.wait()
  assert cli.returncode == 0, stderr[-3000:]
  assert poly in stdout
  return poly, fixed


def _images(n: int, size: int, seed: int) -> np.ndarray:
  """Preprocessed-looking input: float32 [n, S, S, 3], roughly zero mean and unit variance."""
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _assert_same(got: dict, want: dict, where: str) -> None:
  np.testing.assert_allclose(got["boxes"], want["boxes"], atol=1e-5, err_msg=where)
  np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-5, err_msg=where)
  np.testing.assert_array_equal(got["classes"], want["classes"], err_msg=where)
  np.testing.assert_array_equal(got["valid"], want["valid"], err_msg=where)


# Runs in a fresh interpreter where ssdjax and flax cannot be imported at all (a None entry in
# sys.modules makes `import` fail), so the artifact provably needs neither. Afterwards the same
# process uses ssdjax.export.load_exported, which must still not need flax or the model code.
_PLAIN_JAX = textwrap.dedent("""
    import json, sys
    sys.modules["ssdjax"] = None
    sys.modules["flax"] = None
    import jax
    import numpy as np

    jobs, out_path = json.loads(sys.argv[1]), sys.argv[2]
    results = {}
    for name, (artifact, inputs) in jobs.items():
      with open(artifact, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
      with open(artifact + ".json") as f:
        names = json.load(f)["output_names"]
      out = exported.call(np.load(inputs))
      for k in names:
        results[name + "/" + k] = np.asarray(out[k])
    assert not [m for m in sys.modules if m.startswith(("ssdjax.", "flax.")) and sys.modules[m]]

    del sys.modules["ssdjax"]
    from ssdjax import export
    for name, (artifact, inputs) in jobs.items():
      detect, meta = export.load_exported(artifact)
      dets = detect(np.load(inputs))
      for k in meta["output_names"]:
        results["load_exported/" + name + "/" + k] = np.asarray(getattr(dets, k))
    model_code = [m for m in sys.modules if m in ("ssdjax.models", "ssdjax.train", "ssdjax.data")]
    assert not model_code, model_code
    np.savez(out_path, **results)
""")


def test_artifact_runs_without_ssdjax_and_matches_predict(run, artifacts, tmp_path):
  _, config, reference = run
  poly, fixed = artifacts
  size = config.image_size
  inputs = {"poly3": _images(3, size, 0), "poly1": _images(1, size, 1), "fixed2": _images(2, size, 2)}
  jobs = {}
  for name, x in inputs.items():
    np.save(tmp_path / f"{name}.npy", x)
    jobs[name] = (fixed if name.startswith("fixed") else poly, str(tmp_path / f"{name}.npy"))
  out_path = str(tmp_path / "out.npz")
  proc = subprocess.run([sys.executable, "-c", _PLAIN_JAX, json.dumps(jobs), out_path], env=subprocess_env(),
                        cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(out_path)
  for name, x in inputs.items():
    want = reference(x)
    assert want["boxes"].shape == (len(x), config.postprocess.max_detections, 4)
    _assert_same({k: got[f"{name}/{k}"] for k in FIELDS}, want, name)
    _assert_same({k: got[f"load_exported/{name}/{k}"] for k in FIELDS}, want, "load_exported " + name)


def test_metadata(run, artifacts):
  config = run[1]
  d = config.postprocess.max_detections
  for path, batch, dim, platforms in ((artifacts[0], "polymorphic", "b", ["cpu"]),
                                      (artifacts[1], 2, 2, ["cpu", "cuda"])):
    with open(path + ".json") as f:
      meta = json.load(f)
    assert meta["batch_size"] == batch
    assert meta["platforms"] == platforms
    assert meta["input"]["name"] == "images" and meta["input"]["dtype"] == "float32"
    assert meta["input"]["shape"] == [dim, 128, 128, 3]
    assert meta["output_names"] == ["boxes", "scores", "classes", "valid"]
    assert meta["outputs"]["boxes"]["shape"] == [dim, d, 4]
    assert meta["outputs"]["scores"]["shape"] == [dim, d]
    assert meta["outputs"]["classes"]["shape"] == [dim, d]
    assert meta["outputs"]["valid"]["shape"] == [dim]
    assert [meta["outputs"][k]["dtype"] for k in FIELDS] == ["float32", "float32", "int32", "int32"]
    assert meta["image_size"] == 128
    assert meta["mean_rgb"] == [127.5] * 3 and meta["std_rgb"] == [64.0] * 3
    assert meta["class_names"] == list(SHAPE_CLASSES)
    assert meta["num_classes"] == len(SHAPE_CLASSES) + 1
    assert meta["category_ids"] == [1, 2, 3, 4]  # synthetic labels are their own ids
    assert meta["checkpoint_step"] == 2
    assert meta["ssdjax_version"] == ssdjax.__version__
    assert meta["size_bytes"] == os.path.getsize(path)


def test_load_exported_checks_its_input(run, artifacts, tmp_path):
  _, config, reference = run
  detect, meta = export.load_exported(artifacts[1])
  assert meta["batch_size"] == 2
  size = config.image_size
  x = _images(2, size, 5)
  dets = detect(jax.numpy.asarray(x))  # a device array works as well as numpy
  _assert_same({k: np.asarray(getattr(dets, k)) for k in FIELDS}, reference(x), "jax input")
  with pytest.raises(ValueError, match=r"\[B, 128, 128, 3\] with B = 2"):
    detect(_images(3, size, 0))
  with pytest.raises(ValueError, match="128, 128, 3"):
    detect(_images(2, 64, 0))
  with pytest.raises(ValueError, match="float32"):
    detect(x.astype(np.float64))
  with pytest.raises(FileNotFoundError, match="missing.jax"):
    export.load_exported(str(tmp_path / "missing.jax"))


def test_bad_arguments_are_rejected_before_restoring(tmp_path):
  missing = str(tmp_path / "nothing_here")  # never read: the arguments fail first
  with pytest.raises(ValueError, match="cuda"):
    export.export_inference(missing, platforms=("gpu",))
  with pytest.raises(ValueError, match="batch_size"):
    export.export_inference(missing, batch_size=0)
  with pytest.raises(ValueError, match="config.json"):
    export.export_inference(missing)
