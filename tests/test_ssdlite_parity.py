"""Numerical parity with torchvision's ``ssdlite320_mobilenet_v3_large`` and its conversion.

torchvision's model (``weights=None, weights_backbone=None``: reduced MobileNetV3 tail, random
weights, ``torch.manual_seed(0)``) gets BatchNorm statistics calibrated on the batch and then
randomised, and random biases (``tests/test_mobilenet_v3.randomise_batchnorm``), so that every
tensor's mapping shows. It runs through its internals on the same normalized 320x320 batch,
bypassing its resize/normalize ``transform``: ``model.backbone`` -> ``model.head`` ->
``model.anchor_generator`` -> ``postprocess_detections``. ssdjax runs
``configs/ssdlite320_coco_torchvision.py`` on the weights ``convert.from_torchvision_ssdlite``
converts. The measured differences are printed (``pytest -s``).
"""

import copy
import os
import subprocess
import sys
from functools import partial

import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from torchvision.models import mobilenet_v3_large  # pylint: disable=g-import-not-at-top
from torchvision.models.detection import ssdlite  # pylint: disable=g-import-not-at-top
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator  # pylint: disable=g-import-not-at-top
from torchvision.models.detection.image_list import ImageList  # pylint: disable=g-import-not-at-top
from torchvision.models.detection.ssd import SSD  # pylint: disable=g-import-not-at-top

from ssdjax import anchors as anchors_lib  # pylint: disable=g-import-not-at-top
from ssdjax import boxes as boxes_lib  # pylint: disable=g-import-not-at-top
from ssdjax import convert, models, postprocess, train  # pylint: disable=g-import-not-at-top
from ssdjax.data import categories  # pylint: disable=g-import-not-at-top
from tests.helpers import REPO, load_config, subprocess_env  # pylint: disable=g-import-not-at-top
from tests.test_mobilenet_v3 import randomise_batchnorm  # pylint: disable=g-import-not-at-top
from tests.test_torchvision_parity import _coco_json_folder  # pylint: disable=g-import-not-at-top

SIZE = 320
# The random head's logits (std ~0.4) give near-uniform scores; scaled (std ~2.5), the scores
# spread as a trained model's do, without saturating at 1.
CLS_SCALE = 6.0
MIN_MATCHED, MAX_BOX_PX, MAX_SCORE = 0.99, 0.5, 1e-3


def _relative(name, a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (name, a.shape, b.shape)
  rel = float(np.abs(a - b).max() / np.abs(b).max())
  print(f"\n[parity] {name}: max|a-b| / max|b| = {rel:.3g} (max|b| = {np.abs(b).max():.3g})")
  return rel


def _images():
  """[2, 320, 320, 3] float32 in [-1, 1]: images after torchvision's (x - 0.5) / 0.5."""
  return np.random.default_rng(0).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)


def _prepare(model, images):
  """Randomised statistics, spread scores; (NCHW input, state dict, head outputs, features)."""
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())  # NCHW
  run = lambda: model.head(list(model.backbone(x).values()))
  randomise_batchnorm(model, run)
  with torch.no_grad():
    for block in model.head.classification_head.module_list:
      block[1].weight.mul_(CLS_SCALE)
    features = list(model.backbone(x).values())
    head = model.head(features)
  state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
  return x, state_dict, head, features


@pytest.fixture(scope="module")
def tv():
  torch.manual_seed(0)
  model = ssdlite.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                num_classes=91).eval()
  images = _images()
  x, state_dict, head, features = _prepare(model, images)
  with torch.no_grad():
    anchors = model.anchor_generator(ImageList(x, [(SIZE, SIZE)] * 2), features)  # pixel xyxy
    dets = model.postprocess_detections(head, anchors, [(SIZE, SIZE)] * 2)
  return {"model": model, "state_dict": state_dict, "images": images,
          "loc": head["bbox_regression"].numpy(), "logits": head["cls_logits"].numpy(),
          "anchors": anchors[0].numpy() / SIZE,
          "dets": [{k: v.numpy() for k, v in d.items()} for d in dets]}


def _run_ssdjax(config, variables, images):
  model = models.from_config(config)
  loc, logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  return np.asarray(loc), np.asarray(logits)


@pytest.fixture(scope="module")
def jx(tv):
  config = load_config("ssdlite320_coco_torchvision.py")
  variables = convert.from_torchvision_ssdlite(tv["state_dict"])
  loc, logits = _run_ssdjax(config, variables, tv["images"])
  anchors = anchors_lib.from_config(config)
  dets = jax.device_get(postprocess.detect(loc, logits, anchors, **postprocess.from_config(config)))
  return {"config": config, "variables": variables, "loc": loc, "logits": logits, "dets": dets}


# ----------------------------------------------------------------------------------------------
# The model.


def test_config_matches_torchvision(tv):
  c = load_config("ssdlite320_coco_torchvision.py")
  model = tv["model"]
  np.testing.assert_allclose(np.asarray(c.data.mean_rgb) / 255, model.transform.image_mean)
  np.testing.assert_allclose(np.asarray(c.data.std_rgb) / 255, model.transform.image_std)
  assert c.image_size == model.transform.min_size[0] == model.transform.max_size == SIZE
  p = c.postprocess
  assert (p.score_threshold, p.top_k, p.iou_threshold, p.max_detections) == (
      model.score_thresh, model.topk_candidates, model.nms_thresh, model.detections_per_img)
  assert c.matching.kwargs.iou_threshold == model.proposal_matcher.high_threshold
  assert c.loss.kwargs.neg_pos_ratio == model.neg_to_pos_ratio
  assert tuple(1 / w for w in model.box_coder.weights) == (0.1, 0.1, 0.2, 0.2)
  assert len(c.class_names) + 1 == 91
  # The published COCO checkpoint has torchvision's 3,440,060 parameters: the reduced tail.
  n = sum(x.size for x in jax.tree.leaves(
      convert.expected_ssdlite_variables(num_classes=91, anchors_per_location=(6,) * 6,
                                         reduced_tail=True)["params"]))
  assert n == ssdlite.SSDLite320_MobileNet_V3_Large_Weights.COCO_V1.meta["num_params"] == 3440060
  assert c.model.backbone_kwargs.reduced_tail
  full = load_config("ssdlite320_coco_torchvision.py:full_tail,coco80")
  assert not full.model.backbone_kwargs.reduced_tail and len(full.class_names) == 80


def test_anchors_equal_torchvision_default_boxes(tv):
  got = anchors_lib.from_config(load_config("ssdlite320_coco_torchvision.py"))  # [3234, 4] cxcywh
  want = np.asarray(boxes_lib.xyxy_to_cxcywh(tv["anchors"]))
  assert got.shape == want.shape == (3234, 4)
  diff = float(np.abs(got - want).max())
  print(f"\n[parity] SSDLite anchors (cxcywh / 320): max|a-b| = {diff:.3g}")
  assert diff <= 1e-6


def test_head_outputs_equal(tv, jx):
  """Against torchvision in float32, and in float64: the differences are float32 rounding, the
  size of torch float32 against torch float64."""
  model = copy.deepcopy(tv["model"]).double()
  x = torch.from_numpy(tv["images"].transpose(0, 3, 1, 2).copy()).double()
  with torch.no_grad():
    head64 = model.head(list(model.backbone(x).values()))
  for name, key in (("loc", "bbox_regression"), ("logits", "cls_logits")):
    assert _relative(f"SSDLite head {name} {tv[name].shape}", jx[name], tv[name]) <= 1e-4, name
    want = head64[key].numpy()
    assert _relative(f"SSDLite head {name}, ssdjax vs torch float64", jx[name], want) <= 1e-4
    _relative(f"SSDLite head {name}, torch float32 vs torch float64", tv[name], want)


def test_detections_equal(tv, jx):
  """ssdjax end to end (converted model + post-processing) against torchvision's detections."""
  out = jx["dets"]
  total = matched = 0
  box_diffs, score_diffs = [], []
  for i, want in enumerate(tv["dets"]):
    n = int(out.valid[i])
    assert n == len(want["scores"]) == jx["config"].postprocess.max_detections
    scores = want["scores"]
    assert scores.max() > 0.5 and np.diff(scores).max() <= 0  # spread, sorted descending
    boxes_px = out.boxes[i, :n] * SIZE
    for box, score, label in zip(want["boxes"], want["scores"], want["labels"]):
      total += 1
      same = np.flatnonzero(out.classes[i, :n] == label)
      if not len(same):
        continue
      box_diff = np.abs(boxes_px[same] - box).max(axis=1)
      j = same[np.argmin(box_diff)]
      score_diff = abs(float(out.scores[i, j]) - float(score))
      if box_diff.min() <= MAX_BOX_PX and score_diff <= MAX_SCORE:
        matched += 1
        box_diffs.append(float(box_diff.min()))
        score_diffs.append(score_diff)
  print(f"\n[parity] SSDLite detections: {matched}/{total} of torchvision's reproduced "
        f"({100 * matched / total:.2f}%), max box diff {max(box_diffs):.3g} px, max score diff "
        f"{max(score_diffs):.3g}")
  assert matched >= MIN_MATCHED * total


def test_full_tail_model_from_torchvision_pieces():
  """The non-reduced tail (an ImageNet backbone's shape), built as torchvision's builder does."""
  torch.manual_seed(1)
  norm = partial(torch.nn.BatchNorm2d, eps=0.001, momentum=0.03)
  trunk = mobilenet_v3_large(weights=None, norm_layer=norm, reduced_tail=False)
  backbone = ssdlite._mobilenet_extractor(trunk, 6, norm)  # pylint: disable=protected-access
  anchor_generator = DefaultBoxGenerator([[2, 3]] * 6, min_ratio=0.2, max_ratio=0.95)
  channels = [672, 960, 512, 256, 256, 128]
  head = ssdlite.SSDLiteHead(channels, anchor_generator.num_anchors_per_location(), 91, norm)
  model = SSD(backbone, anchor_generator, (SIZE, SIZE), 91, head=head).eval()
  images = _images()
  _, state_dict, head_out, _ = _prepare(model, images)
  assert not convert.ssdlite_reduced_tail(state_dict)
  assert convert.default_config(state_dict).endswith("ssdlite320_coco_torchvision.py:full_tail")
  config = load_config("ssdlite320_coco_torchvision.py:full_tail")
  loc, logits = _run_ssdjax(config, convert.from_torchvision_ssdlite(state_dict), images)
  assert _relative("SSDLite full tail head loc", loc, head_out["bbox_regression"].numpy()) <= 1e-4
  assert _relative("SSDLite full tail head logits", logits, head_out["cls_logits"].numpy()) <= 1e-4


# ----------------------------------------------------------------------------------------------
# The converter.


def test_converter_errors_name_the_key(tv):
  sd = {k: v.numpy() for k, v in tv["state_dict"].items()}
  assert convert.is_ssdlite(sd) and convert.ssdlite_reduced_tail(sd)
  missing = dict(sd)
  del missing["backbone.features.1.0.2.fc1.bias"]
  with pytest.raises(ValueError, match=r"missing key 'backbone\.features\.1\.0\.2\.fc1\.bias'"):
    convert.from_torchvision_ssdlite(missing)
  missing = dict(sd)
  del missing["backbone.extra.2.1.1.running_var"]
  with pytest.raises(ValueError, match=r"missing key 'backbone\.extra\.2\.1\.1\.running_var'"):
    convert.from_torchvision_ssdlite(missing)
  unused = dict(sd, **{"backbone.extra.4.0.0.weight": np.zeros((64, 128, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"'backbone\.extra\.4\.0\.0\.weight' is not used"):
    convert.from_torchvision_ssdlite(unused)
  bias = dict(sd, **{"backbone.extra.0.0.0.bias": np.zeros(256, np.float32)})
  with pytest.raises(ValueError, match=r"'backbone\.extra\.0\.0\.0\.bias' maps to .*lacks"):
    convert.from_torchvision_ssdlite(bias)
  wrong = dict(sd, **{"backbone.features.0.7.block.1.1.running_mean": np.zeros(7, np.float32)})
  with pytest.raises(ValueError, match=r"'backbone\.features\.0\.7\.block\.1\.1\.running_mean' "
                                       r"has shape \(7,\).*expected \(240,\)"):
    convert.from_torchvision_ssdlite(wrong)
  wrong = dict(sd, **{"head.regression_head.module_list.3.0.0.weight":
                      np.zeros((256, 1, 5, 5), np.float32)})
  with pytest.raises(ValueError, match=r"'head\.regression_head\.module_list\.3\.0\.0\.weight'"):
    convert.from_torchvision_ssdlite(wrong)
  nan = dict(sd, **{"head.classification_head.module_list.5.1.bias": np.full(546, np.nan,
                                                                             np.float32)})
  with pytest.raises(ValueError, match=r"'head\.classification_head\.module_list\.5\.1\.bias'.*NaN"):
    convert.from_torchvision_ssdlite(nan)
  tail = dict(sd, **{"backbone.features.1.3.0.weight": np.zeros((500, 80, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"'backbone\.features\.1\.3\.0\.weight' has 500 output"):
    convert.from_torchvision_ssdlite(tail)


def test_converter_selects_coco80_columns(tv, jx):
  config = load_config("ssdlite320_coco_torchvision.py:coco80")
  index = convert.class_index_for(config, 91, categories.COCO_V1_CLASSES)
  variables = convert.from_torchvision_ssdlite(tv["state_dict"], class_index=index)
  for level in range(6):
    full = jx["variables"]["params"]["head"][f"conf_{level}"]
    got = variables["params"]["head"][f"conf_{level}"]
    want = full["kernel"].reshape(1, 1, -1, 6, 91)[..., list(index)].reshape(got["kernel"].shape)
    np.testing.assert_array_equal(got["kernel"], want)
    np.testing.assert_array_equal(got["bias"], full["bias"].reshape(6, 91)[:, list(index)].ravel())
  assert convert.default_config(tv["state_dict"]).endswith("ssdlite320_coco_torchvision.py")


def test_cli_converts_ssdlite_and_eval_restores(tv, tmp_path):
  """The CLI recognises the SSDLite layout and writes a workdir (params and BatchNorm statistics)
  that ``--mode=eval`` restores; the config is a user's file on the SSDLite config, as in
  test_torchvision_parity (without --config the CLI takes ``convert.default_config``)."""
  pth, workdir = str(tmp_path / "ssdlite.pth"), str(tmp_path / "run")
  torch.save(tv["state_dict"], pth)
  data_dir = _coco_json_folder(str(tmp_path / "coco"))
  cfg = tmp_path / "config.py"
  cfg.write_text(
      "from ssdjax import config as config_lib\n\n"
      "def get_config():\n"
      f"  c = config_lib.load_file({os.path.join(REPO, 'configs', 'ssdlite320_coco_torchvision.py')!r})\n"
      f"  c.data.source, c.data.eval, c.data.data_dir = 'coco_json', 'val', {data_dir!r}\n"
      "  c.data.coco_json.annotation_file, c.data.coco_json.image_dir = 'annotations.json', 'images'\n"
      "  c.data.num_workers, c.eval.batch_size = 0, 2\n"
      "  return c\n")
  out = subprocess.run([sys.executable, "-m", "ssdjax.convert", f"--torchvision={pth}",
                        f"--workdir={workdir}", f"--config={cfg}"],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  config, _, variables, step = train.restore_for_inference(workdir)
  assert step == 0 and config.model.backbone == "mobilenet_v3_large"
  assert config.model.backbone_kwargs.reduced_tail and config.image_size == SIZE
  want = convert.from_torchvision_ssdlite(tv["state_dict"])
  assert set(variables) == set(want) == {"params", "batch_stats"}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), want)

  out = subprocess.run([sys.executable, "-m", "ssdjax.main", "--mode=eval", f"--workdir={workdir}"],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert '"coco/AP"' in out.stdout
