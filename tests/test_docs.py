"""Every command and code block of README.md and docs/*.md runs, as written, in a sandbox.

The sandbox is a folder laid out like the repository root (``configs/`` and ``experiments/``
linked in) holding small data sets in the formats the docs name (tfds VOC and COCO under
``$TFDS_DATA_DIR``, COCO-JSON folders in three layouts, a VOC devkit, photos). ```bash blocks run
command by command with bash; training commands get overrides appended that shrink them to a
couple of steps (the documented flags still parse and apply, the shrinking ones come last and
win). ```python blocks run in a fresh Python. A block that cannot run here (a download, tensorflow)
carries ``<!-- not run: reason -->`` on the line before it; a new block without a test or a
reason fails :func:`test_every_block_is_run_or_says_why`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from tests import datasets
from tests.helpers import REPO, subprocess_env

# The order the manuals run in: later ones use the workdirs of earlier ones.
ORDER = ("README.md", "docs/training.md", "docs/data.md", "docs/extending.md", "docs/export.md",
         "docs/api.md", "docs/parity.md", "docs/models.md", "docs/multihost.md")
RUNNABLE = ("bash", "python")

_TINY = ["--config.train.num_steps=2", "--config.train.batch_size=2", "--config.eval.batch_size=2",
         "--config.eval.max_images=4", "--config.train.log_every=1",
         "--config.train.checkpoint_every=2", "--config.data.num_workers=0",
         "--config.data.synthetic.num_train=16", "--config.data.synthetic.num_val=4"]

# Assertions appended to python blocks (file, block number among the file's python blocks).
_PYTHON_CHECKS = {
    ("README.md", 0): "assert float(loss) > 0 and dets.boxes.shape == (1, 200, 4)",
    ("docs/api.md", 0): ("import numpy as np\n"
                         "assert np.isfinite(float(loss)) and float(loss) > 0\n"
                         "assert grads[0].shape == (1, 8732, 4) and grads[1].shape == (1, 8732, 21)\n"
                         "assert np.abs(np.asarray(grads[0])).sum() > 0\n"
                         "assert dets.boxes.shape == (1, 200, 4)"),
    ("docs/export.md", 0): "assert out['boxes'].shape[0] == 1 and 0 <= n <= out['boxes'].shape[1]",
}


@dataclasses.dataclass
class Block:
  file: str
  lang: str
  code: str
  line: int
  skip: str | None  # the reason it is not run, from <!-- not run: reason -->


def blocks(path: str) -> list[Block]:
  """The fenced code blocks of a markdown file."""
  lines = open(os.path.join(REPO, path)).read().splitlines()
  out, i = [], 0
  while i < len(lines):
    m = re.match(r"^```(\w*)\s*$", lines[i])
    if not m:
      i += 1
      continue
    start, lang, body = i, m.group(1), []
    i += 1
    while not lines[i].startswith("```"):
      body.append(lines[i])
      i += 1
    prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
    skip = re.match(r"^<!-- not run: (.+\S)\s*-->$", prev.strip())
    out.append(Block(path, lang, "\n".join(body) + "\n", start + 1, skip.group(1) if skip else None))
    i += 1
  return out


def commands(code: str) -> list[str]:
  """The commands of a bash block: continuation lines joined, comments dropped."""
  joined = code.replace("\\\n", " ")
  return [" ".join(shlex.quote(t) for t in shlex.split(line, comments=True))
          for line in joined.splitlines() if shlex.split(line, comments=True)]


def shrink(cmd: str) -> str:
  """``cmd`` with the overrides that make a training command take seconds."""
  if re.search(r"-m ssdjax\.main\b", cmd) and "--mode=eval" not in cmd and "--print_config" not in cmd:
    return cmd + " " + " ".join(_TINY)
  if "experiments/head_ablation.py" in cmd:
    sets = " ".join(f"--set {a[len('--config.'):]}" for a in _TINY if "num_steps" not in a)
    return f"{cmd} --seeds=0 --steps=2 {sets}"
  return cmd


def _photo(path, seed, size=(96, 128)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, size + (3,), np.uint8)).save(path)


def _torchvision_pth(root) -> bool:
  """Random-weight stand-ins for the torchvision checkpoints the docs name (no downloads here)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import torchvision  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  torch.manual_seed(0)
  detection = torchvision.models.detection
  torch.save(detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=91).state_dict(),
             os.path.join(root, "ssd300_vgg16_coco-b556d3b4.pth"))
  torch.save(detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                     num_classes=91).state_dict(),
             os.path.join(root, "ssdlite320_mobilenet_v3_large_coco-a79551df.pth"))
  torch.save(torchvision.models.resnet50().state_dict(), os.path.join(root, "resnet50-0676ba61.pth"))
  return True


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("docs"))
  for name in ("configs", "experiments"):
    os.symlink(os.path.join(REPO, name), os.path.join(root, name))
  data = os.path.join(root, "data")
  tfds_dir = os.path.join(root, "tfds")
  datasets.mock_voc(tfds_dir)
  coco = lambda k: datasets.coco_example(k, [((0.1, 0.2, 0.6, 0.7), 0, False),
                                             ((0.3, 0.3, 0.9, 0.8), 79, False)])
  datasets.prepare_coco(tfds_dir, {"train": [coco(1), coco(2)], "validation": [coco(3), coco(4)]})
  # The README's COCO-JSON recipe: non-contiguous category ids.
  cats = [{"id": 7, "name": "kettle"}, {"id": 3, "name": "cup"}]
  for split in ("train", "val"):
    datasets.coco_json_split(os.path.join(data, "my_coco", "annotations", f"{split}.json"),
                             os.path.join(data, "my_coco", "images", split), cats,
                             seed=len(split))
  for split in ("train2017", "val2017"):
    datasets.coco_json_split(
        os.path.join(data, "coco2017", "annotations", f"instances_{split}.json"),
        os.path.join(data, "coco2017", split), [{"id": 1, "name": "person"},
                                                {"id": 18, "name": "dog"}], num_images=2)
  for split in ("train", "valid"):
    datasets.coco_json_split(os.path.join(data, "exported", split, "_annotations.coco.json"),
                             os.path.join(data, "exported", split), [{"id": 0, "name": "thing"}])
  datasets.voc_devkit(os.path.join(data, "VOCdevkit", "VOC2007"),
                      {"trainval": ["000001", "000002"], "test": ["000003"]})
  for k in range(2):
    _photo(os.path.join(root, "photos", f"p{k}.jpg"), k)
    _photo(os.path.join(root, "more", f"m{k}.png"), 10 + k)
  for name in ("one.png", "image.jpg", "photo.jpg"):
    _photo(os.path.join(root, name), len(name))
  has_torch = _torchvision_pth(root)
  env = subprocess_env(xla_flags="--xla_backend_optimization_level=0")
  env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"]
  env["TFDS_DATA_DIR"] = tfds_dir
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
  env["PYTHONUNBUFFERED"] = "1"
  return {"root": root, "env": env, "torch": has_torch}


def _run(cmd: str, sandbox) -> subprocess.CompletedProcess:
  out = subprocess.run(["bash", "-c", cmd], cwd=sandbox["root"], env=sandbox["env"],
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
  return out


def _before(cmd: str, sandbox) -> None:
  """What a reader does between two commands of the docs."""
  root = sandbox["root"]
  if cmd.startswith("python -m ssdjax.predict --workdir=runs/my_coco"):
    # The data folder is gone: predict needs only the workdir (class names, category ids).
    shutil.rmtree(os.path.join(root, "data", "my_coco"))


def _after(path: str, sandbox) -> None:
  """Checks of what a manual's commands produced, beyond their exit status."""
  root = sandbox["root"]
  if path == "docs/data.md":
    with open(os.path.join(root, "runs", "my_coco", "config.json")) as f:
      saved = json.load(f)
    assert saved["class_names"] == ["cup", "kettle"] and saved["data"]["category_ids"] == [3, 7]
    code = ("import json, sys\nfrom ssdjax import predict\n"
            "r = predict.predict_files('runs/my_coco', ['photos/p0.jpg'], 'check', min_score=0.0)\n"
            "print(json.dumps(sorted({d['category_id'] for d in r[0]['detections']})))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=sandbox["env"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert set(json.loads(out.stdout.strip().splitlines()[-1])) <= {3, 7}
    assert json.loads(out.stdout.strip().splitlines()[-1])  # detections at score >= 0 exist
  if path == "docs/models.md" and sandbox["torch"]:
    # The run started from the converted ImageNet trunk (the sandbox's stand-in weights).
    code = ("import numpy as np, torch\n"
            "w = torch.load('resnet50-0676ba61.pth')['layer3.5.conv3.weight'].numpy()\n"
            "z = np.load('weights/resnet50_imagenet.npz')['layer3.5.conv3.weight']\n"
            "assert np.array_equal(w, z)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=sandbox["env"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(root, "runs", "ssd300_resnet50", "config.json")) as f:
      assert json.load(f)["model"]["pretrained"] == "weights/resnet50_imagenet.npz"
  if path == "docs/extending.md":
    with open(os.path.join(root, "runs", "custom_head", "config.json")) as f:
      assert json.load(f)["model"]["head"] == "experiments.custom_head.parts:TwoConvHead"


def test_every_block_is_run_or_says_why():
  found = [os.path.relpath(p, REPO) for p in [os.path.join(REPO, "README.md")] + sorted(
      os.path.join(REPO, "docs", f) for f in os.listdir(os.path.join(REPO, "docs"))
      if f.endswith(".md"))]
  missing = [f for f in found if f not in ORDER]
  assert not missing, f"add {missing} to ORDER in tests/test_docs.py so their blocks run"
  for path in found:
    for block in blocks(path):
      if block.lang in RUNNABLE or block.skip is not None:
        continue
      # Unlabelled fences hold file layouts and sample output, never commands.
      assert not re.search(r"^\s*(python|make|pip|\.venv/)", block.code, re.M), (
          f"{path}:{block.line}: a command in a ``` block without a language; use ```bash")


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in ORDER if os.path.exists(os.path.join(REPO, p))])
def test_manual_runs_as_written(path, sandbox):
  python_index = 0
  for block in blocks(path):
    if block.lang not in RUNNABLE or block.skip is not None:
      continue
    if block.lang == "bash":
      for cmd in commands(block.code):
        if any(k in cmd for k in ("ssd300_vgg16_coco", "tv_ssd300", "tv_coco80", "0676ba61",
                                  "ssdlite")):
          if not sandbox["torch"]:
            pytest.skip("torchvision is not installed (pip install -e '.[convert]')")
        _before(cmd, sandbox)
        _run(shrink(cmd), sandbox)
    else:
      code = block.code + "\n" + _PYTHON_CHECKS.get((path, python_index), "") + "\n"
      python_index += 1
      out = subprocess.run([sys.executable, "-c", code], cwd=sandbox["root"], env=sandbox["env"],
                           capture_output=True, text=True, timeout=600)
      assert out.returncode == 0, f"{path}:{block.line}\n{out.stderr[-4000:]}"
  _after(path, sandbox)


def test_make_targets_run_the_documented_jobs():
  """The Quick start's two commands, dry-run: CI runs `make test` itself (.ci/run) and
  tests/test_demo.py runs the demo's job shrunk; here the targets are checked to be those jobs."""
  (quick,) = [b for b in blocks("README.md") if "make demo" in b.code]
  assert quick.skip is not None and commands(quick.code) == ["make demo", "make test"]
  demo = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True)
  assert "-m ssdjax.demo --workdir=runs/demo" in demo.stdout, demo.stdout
  test = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True)
  assert "-m pytest" in test.stdout and "tests" in test.stdout, test.stdout
  with open(os.path.join(REPO, ".ci", "run")) as f:
    assert "make test" in f.read()
