"""Numerical parity with torchvision's ``ssd300_vgg16`` (random weights, fixed seed) and ssdjax.convert.

torchvision's model is run through its internals on the same normalized 300x300 batch, bypassing
its ``transform`` (normalize + resize), which the ssdjax input pipeline replaces:
``model.backbone`` -> ``model.head`` -> ``model.anchor_generator``, then ``proposal_matcher`` +
``compute_loss`` and ``postprocess_detections``. Compared with ssdjax on the converted weights:
anchors, raw head outputs, matching and the two loss terms, detections after NMS, and the
parameters after one SGD step. The measured maximum differences are printed (``pytest -s``).
"""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import chex  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top
from torchvision.models.detection import ssd300_vgg16  # pylint: disable=g-import-not-at-top
from torchvision.models.detection.image_list import ImageList  # pylint: disable=g-import-not-at-top
from torchvision.ops import box_iou  # pylint: disable=g-import-not-at-top

from ssdjax.data import categories  # pylint: disable=g-import-not-at-top
from tests.helpers import ssd300_coco_torchvision, synthetic  # pylint: disable=g-import-not-at-top
from ssdjax import anchors as anchors_lib  # pylint: disable=g-import-not-at-top
from ssdjax import boxes as boxes_lib  # pylint: disable=g-import-not-at-top
from ssdjax import convert, losses, matching, models  # pylint: disable=g-import-not-at-top
from ssdjax import postprocess, train  # pylint: disable=g-import-not-at-top
from tests.helpers import REPO, subprocess_env  # pylint: disable=g-import-not-at-top

SIZE = 300
# The random network's logits are large (std ~3.3): damped, the scores spread without saturating
# at 1. The damped regression stays below torchvision's decode clamp (|dw| <= 5 * log(1000 / 16)).
CLS_SCALE, REG_SCALE = 0.5, 0.25
LR, MOMENTUM, WEIGHT_DECAY = 1e-3, 0.9, 5e-4

# Ground truth (normalized xyxy), separated so that no two boxes share a best anchor.
GT_BOXES = [
    [[0.05, 0.10, 0.40, 0.55], [0.55, 0.60, 0.93, 0.97], [0.62, 0.08, 0.71, 0.21]],
    [[0.20, 0.25, 0.85, 0.90], [0.02, 0.70, 0.17, 0.98]],
]
GT_LABELS = [[1, 18, 90], [3, 44]]
MAX_GT = 4


def _report(name, a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  diff = float(np.abs(a - b).max())
  print(f"\n[parity] {name}: max|a-b| = {diff:.3g}, max|b| = {float(np.abs(b).max()):.3g}")
  return diff


@pytest.fixture(scope="module")
def tv():
  """torchvision's model, its outputs and one SGD step on the shared batch."""
  torch.manual_seed(0)
  model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=91).eval()
  with torch.no_grad():
    # torchvision initialises every bias to 0, which would leave the bias mapping untested.
    for name, p in model.named_parameters():
      if name.endswith(".bias"):
        p.normal_(0.0, 0.05)
    for conv in model.head.classification_head.module_list:
      conv.weight.mul_(CLS_SCALE)
    for conv in model.head.regression_head.module_list:
      conv.weight.mul_(REG_SCALE)
  state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}

  rng = np.random.default_rng(0)
  mean = np.asarray(ssd300_coco_torchvision.get_config().data.mean_rgb, np.float32)
  images = (rng.uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32) - mean)  # [B, H, W, 3]
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())  # NCHW
  features = list(model.backbone(x).values())
  head = model.head(features)
  anchors = model.anchor_generator(ImageList(x, [(SIZE, SIZE)] * 2), features)  # pixel xyxy
  targets = [{"boxes": torch.tensor(b, dtype=torch.float32) * SIZE, "labels": torch.tensor(l)}
             for b, l in zip(GT_BOXES, GT_LABELS)]
  matched = [model.proposal_matcher(box_iou(t["boxes"], a)) for t, a in zip(targets, anchors)]
  loss = model.compute_loss(targets, head, anchors, matched)
  with torch.no_grad():
    dets = model.postprocess_detections({k: v.detach() for k, v in head.items()}, anchors,
                                        [(SIZE, SIZE)] * 2)
  opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
  opt.zero_grad()
  (loss["bbox_regression"] + loss["classification"]).backward()
  opt.step()
  names = {id(p): n for n, p in model.named_parameters()}
  # The first step's momentum buffer is grad + weight_decay * param: the update is -lr times it.
  update = {names[id(p)]: -LR * s["momentum_buffer"] for p, s in opt.state.items()}
  return {
      "state_dict": state_dict,
      "stepped": {k: v.detach().clone() for k, v in model.state_dict().items()},
      "update": update,
      "images": images,
      "loc": head["bbox_regression"].detach().numpy(),
      "logits": head["cls_logits"].detach().numpy(),
      "anchors": anchors[0].numpy() / SIZE,
      "matched": np.stack([m.numpy() for m in matched]),
      "loss": {k: float(v.detach()) for k, v in loss.items()},
      "dets": [{k: v.numpy() for k, v in d.items()} for d in dets],
  }


def _config():
  c = ssd300_coco_torchvision.get_config()
  c.optimizer.learning_rate = LR
  c.optimizer.momentum = MOMENTUM
  c.optimizer.weight_decay = WEIGHT_DECAY
  return c


def _padded_gt():
  boxes = np.zeros((2, MAX_GT, 4), np.float32)
  labels = np.zeros((2, MAX_GT), np.int32)
  for i, (b, l) in enumerate(zip(GT_BOXES, GT_LABELS)):
    boxes[i, :len(b)], labels[i, :len(l)] = b, l
  return boxes, labels, labels > 0


@pytest.fixture(scope="module")
def jx(tv):
  """ssdjax on the converted weights: outputs, matching, loss and gradients, jitted once."""
  config = _config()
  params = convert.from_torchvision(tv["state_dict"])
  model = models.from_config(config)
  anchors = jnp.asarray(anchors_lib.from_config(config))
  match_kwargs = matching.from_config(config)
  loss_fn = losses.from_config(config)

  @jax.jit
  def run(params, images, gt_boxes, gt_labels, gt_mask):
    matched, _ = matching.batch_match(gt_boxes, gt_labels, gt_mask, anchors,
                                      iou_threshold=match_kwargs["iou_threshold"],
                                      strategy=match_kwargs["strategy"])
    loc_t, cls_t = matching.batch_targets(gt_boxes, gt_labels, gt_mask, anchors, **match_kwargs)

    def objective(p):
      loc, logits = model.apply({"params": p}, images)
      loss, aux = loss_fn(loc, logits, loc_t, cls_t)
      return loss, (loc, logits, aux)

    (_, (loc, logits, aux)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return loc, logits, aux, matched, grads

  loc, logits, aux, matched, grads = jax.device_get(run(params, tv["images"], *_padded_gt()))
  return {"config": config, "params": params, "loc": loc, "logits": logits, "aux": aux,
          "matched": matched, "grads": grads}


# ----------------------------------------------------------------------------------------------
# Forward pass, matching, loss, post-processing.


def test_config_matches_torchvision_metadata():
  from torchvision.models._meta import _COCO_CATEGORIES  # pylint: disable=g-import-not-at-top

  assert list(categories.TORCHVISION_COCO_CATEGORIES) == list(_COCO_CATEGORIES)
  c = ssd300_coco_torchvision.get_config()
  assert len(c.class_names) == 90
  for name, tv_name in zip(c.class_names, _COCO_CATEGORIES[1:]):
    assert name == tv_name or (tv_name == "N/A" and name.startswith("N/A ("))
  model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=91)
  np.testing.assert_allclose(np.asarray(c.data.mean_rgb) / 255, model.transform.image_mean, atol=1e-7)
  np.testing.assert_allclose(np.asarray(c.data.std_rgb) / 255, model.transform.image_std, atol=1e-9)
  p = c.postprocess
  assert (p.score_threshold, p.top_k, p.iou_threshold, p.max_detections) == (
      model.score_thresh, model.topk_candidates, model.nms_thresh, model.detections_per_img)
  assert c.matching.kwargs.iou_threshold == model.proposal_matcher.high_threshold
  assert c.loss.kwargs.neg_pos_ratio == model.neg_to_pos_ratio
  assert tuple(1 / w for w in model.box_coder.weights) == (0.1, 0.1, 0.2, 0.2)


def test_anchors_equal_torchvision_default_boxes(tv):
  got = anchors_lib.from_config(_config())  # [8732, 4] cxcywh
  want = np.asarray(boxes_lib.xyxy_to_cxcywh(tv["anchors"]))
  assert got.shape == want.shape == (8732, 4)
  assert _report("anchors (cxcywh / 300)", got, want) <= 1e-6
  # The Caffe corner clip and no clip at all both differ from torchvision's box generator.
  for clip in ("none", "corners"):
    c = _config()
    c.anchors.clip = clip
    assert np.abs(anchors_lib.from_config(c) - want).max() > 0.01


def test_head_outputs_equal(tv, jx):
  for name in ("loc", "logits"):
    assert jx[name].shape == tv[name].shape
    diff = _report(f"head {name}", jx[name], tv[name])
    assert diff / np.abs(tv[name]).max() <= 1e-4, name


def test_matching_and_loss_equal(tv, jx):
  np.testing.assert_array_equal(jx["matched"], tv["matched"])
  num_pos = (tv["matched"] >= 0).sum(axis=1)
  print(f"\n[parity] matching: identical, positives per image {num_pos.tolist()}")
  assert (num_pos > 5).all()
  for ours, theirs in (("loc", "bbox_regression"), ("conf", "classification")):
    diff = _report(f"loss {theirs}", jx["aux"][ours], tv["loss"][theirs])
    assert diff <= 1e-5 * abs(tv["loss"][theirs]), theirs


def test_detections_equal(tv):
  """Both post-processings on torchvision's head outputs (so only the post-processing differs)."""
  config = _config()
  out = jax.device_get(postprocess.detect(
      tv["loc"], tv["logits"], anchors_lib.from_config(config), **postprocess.from_config(config)))
  for i, want in enumerate(tv["dets"]):
    n = int(out.valid[i])
    assert n == len(want["scores"]) == config.postprocess.max_detections
    scores = want["scores"]
    assert scores.max() > 0.5 and np.diff(scores).max() <= 0  # spread, sorted descending
    d = max(_report(f"image {i} detection scores", out.scores[i, :n], scores),
            _report(f"image {i} detection boxes / 300", out.boxes[i, :n], want["boxes"] / SIZE))
    assert d <= 1e-4
    np.testing.assert_array_equal(out.classes[i, :n], want["labels"])


# ----------------------------------------------------------------------------------------------
# One SGD step.


def _sgd_step(config, params, grads):
  tx = train.make_optimizer(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates, optax.apply_updates(params, updates)


@pytest.mark.parametrize("decay_biases", [True, False])
def test_one_sgd_step_equals_torch_sgd(tv, jx, decay_biases):
  """torch.optim.SGD(weight_decay) decays every parameter: ssdjax matches with decay_biases=True.

  Compared per tensor: the update u = -lr * (grad + wd * param), max|u_jax - u_torch| <=
  5e-3 * max|u_torch|; and the new parameters. The head and extras agree to ~1e-6; the VGG trunk's
  float32 gradients are only good to ~1e-3 in either framework (torch float32 vs torch float64
  differs by up to 2.7e-3, on fc6's kernel, for this batch).
  """
  config = jx["config"]
  config.optimizer.decay_biases = decay_biases
  updates, new = jax.device_get(_sgd_step(config, jx["params"], jx["grads"]))
  want_updates = convert.from_torchvision(tv["update"])
  err = jax.tree.map(lambda a, b: np.abs(a - b).max() / np.abs(b).max(), updates, want_updates)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(err)[0]}
  worst = max(flat, key=flat.get)
  print(f"\n[parity] SGD step, decay_biases={decay_biases}: worst update {worst} "
        f"max|a-b| / max|b| = {flat[worst]:.3g}")
  if decay_biases:
    assert flat[worst] <= 5e-3, worst
    want = convert.from_torchvision(tv["stepped"])
    diff = jax.tree.map(lambda a, b: np.abs(a - b).max(), new, want)
    print(f"[parity] SGD step: new parameters max|a-b| = {max(jax.tree.leaves(diff)):.3g}")
    # The update's tolerance plus float32 rounding of the parameter.
    bound = jax.tree.map(lambda u, p: 5e-3 * np.abs(u).max() + 1e-6 * np.abs(p).max(),
                         want_updates, want)
    assert all(jax.tree.leaves(jax.tree.map(lambda d, b: d <= b, diff, bound)))
  else:
    # Without bias decay the biases and the L2Norm scale miss lr * wd * p; kernels still agree.
    scale = flat["['backbone']['l2norm']['scale']"]
    print(f"[parity] SGD step, decay_biases=False: L2Norm scale update max|a-b| / max|b| = {scale:.3g}")
    assert scale > 0.1
    assert all(v <= 5e-3 for k, v in flat.items() if "kernel" in k)


# ----------------------------------------------------------------------------------------------
# from_torchvision: errors and class selection.


def test_from_torchvision_fills_every_leaf_and_rejects_bad_dicts(tv):
  sd = {k: v.numpy() for k, v in tv["state_dict"].items()}
  params = convert.from_torchvision(sd)
  want = convert.expected_params(num_classes=91, anchors_per_location=(4, 6, 6, 6, 4, 4))
  assert jax.tree.structure(params) == jax.tree.structure(want)
  assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)))
  np.testing.assert_array_equal(params["backbone"]["conv1_1"]["kernel"],
                                sd["backbone.features.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["backbone"]["fc7"]["bias"], sd["backbone.extra.0.7.3.bias"])

  missing = dict(sd)
  del missing["backbone.extra.2.2.weight"]
  with pytest.raises(ValueError, match=r"backbone\.extra\.2\.2\.weight"):
    convert.from_torchvision(missing)
  wrong = dict(sd, **{"backbone.features.5.bias": np.zeros(127, np.float32)})
  with pytest.raises(ValueError, match=r"backbone\.features\.5\.bias.*\(127,\)"):
    convert.from_torchvision(wrong)
  wrong = dict(sd, **{"backbone.extra.0.7.1.weight": np.zeros((1024, 512, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"backbone\.extra\.0\.7\.1\.weight"):
    convert.from_torchvision(wrong)
  extra = dict(sd, **{"backbone.features.3.weight": np.zeros((64, 64, 3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"backbone\.features\.3\.weight"):
    convert.from_torchvision(extra)
  nan = dict(sd, **{"backbone.scale_weight": np.full(512, np.nan, np.float32)})
  with pytest.raises(ValueError, match=r"backbone\.scale_weight.*NaN"):
    convert.from_torchvision(nan)


def test_class_index_selects_head_columns(tv, jx):
  """The coco80 variant keeps torchvision's logits of the 80 real classes, column for column."""
  config = ssd300_coco_torchvision.get_config("coco80")
  index = convert.class_index_for(config, 91, categories.COCO_V1_CLASSES)
  assert len(index) == 81 and index[:4] == (0, 1, 2, 3) and index[-1] == 90 and 12 not in index
  assert convert.class_index_for(_config(), 91, categories.COCO_V1_CLASSES) is None
  params = convert.from_torchvision(tv["state_dict"], class_index=index)
  for level, k in enumerate((4, 6, 6, 6, 4, 4)):
    full = jx["params"]["head"][f"conf_{level}"]
    got = params["head"][f"conf_{level}"]
    assert got["kernel"].shape[-1] == k * 81
    want = full["kernel"].reshape(3, 3, -1, k, 91)[..., list(index)].reshape(got["kernel"].shape)
    np.testing.assert_array_equal(got["kernel"], want)
  with pytest.raises(ValueError, match="class_index"):
    convert.from_torchvision(tv["state_dict"], class_index=(1, 2, 3))
  bad = ssd300_coco_torchvision.get_config("coco80")
  bad.class_names = ("person", "unicorn") + bad.class_names[2:]
  with pytest.raises(ValueError, match="unicorn"):
    convert.class_index_for(bad, 91, categories.COCO_V1_CLASSES)


def test_import_does_not_load_torch():
  code = "import sys, ssdjax.convert; assert 'torch' not in sys.modules, 'torch imported'"
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=subprocess_env())


# ----------------------------------------------------------------------------------------------
# The CLI and the workdir it writes.


def _coco_json_folder(root) -> str:
  """A 2-image COCO-JSON folder whose categories are torchvision's 90 ids (labels = category ids)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  os.makedirs(os.path.join(root, "images"))
  rng = np.random.default_rng(1)
  images, annotations = [], []
  for i in range(2):
    name = f"{i}.png"
    Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(
        os.path.join(root, "images", name))
    images.append({"id": i + 1, "file_name": name, "width": 320, "height": 240})
    annotations.append({"id": i + 1, "image_id": i + 1, "category_id": [1, 90][i],
                        "bbox": [20.0, 30.0, 150.0, 120.0], "area": 18000.0, "iscrowd": 0})
  cats = [{"id": i + 1, "name": n} for i, n in enumerate(categories.COCO_V1_CLASSES)]
  with open(os.path.join(root, "annotations.json"), "w") as f:
    json.dump({"images": images, "annotations": annotations, "categories": cats}, f)
  return root


def test_cli_writes_a_workdir_that_restores_and_evaluates(tv, tmp_path):
  pth, workdir = str(tmp_path / "ssd300.pth"), str(tmp_path / "run")
  torch.save(tv["state_dict"], pth)
  # A tiny COCO-JSON eval set stands in for COCO, set by a config file of the user's.
  data_dir = _coco_json_folder(str(tmp_path / "coco"))
  cfg = tmp_path / "config.py"
  cfg.write_text(
      "from ssdjax import config as config_lib\n\n"
      "def get_config():\n"
      f"  c = config_lib.load_file({os.path.join(REPO, 'configs', 'ssd300_coco_torchvision.py')!r})\n"
      f"  c.data.source, c.data.eval, c.data.data_dir = 'coco_json', 'val', {data_dir!r}\n"
      "  c.data.coco_json.annotation_file, c.data.coco_json.image_dir = 'annotations.json', 'images'\n"
      "  c.data.num_workers, c.eval.batch_size = 0, 2\n"
      "  return c\n")
  out = subprocess.run([sys.executable, "-m", "ssdjax.convert", f"--torchvision={pth}",
                        f"--workdir={workdir}", f"--config={cfg}"],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  for name in ("config.json", "anchors.npy", "version.json"):
    assert os.path.exists(os.path.join(workdir, name)), name

  config, _, variables, step = train.restore_for_inference(workdir)
  assert step == 0 and config.anchors.clip == "wh" and len(config.class_names) == 90
  want = convert.from_torchvision(tv["state_dict"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables["params"]), want)

  # A second conversion into the same workdir is refused.
  again = subprocess.run([sys.executable, "-m", "ssdjax.convert", f"--torchvision={pth}",
                          f"--workdir={workdir}"], cwd=REPO, env=subprocess_env(), capture_output=True,
                         text=True, timeout=300)
  assert again.returncode != 0 and "already holds checkpoints" in again.stderr

  out = subprocess.run([sys.executable, "-m", "ssdjax.main", "--mode=eval", f"--workdir={workdir}"],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert '"coco/AP"' in out.stdout


def test_training_resumes_from_a_converted_checkpoint(tmp_path):
  """train.py restores a checkpoint without the input-position item and trains on from it.

  Uses the tiny synthetic model: the resumed run's first step must start from the written params.
  """
  from ssdjax import data  # pylint: disable=g-import-not-at-top

  c = synthetic.get_config()
  c.data.synthetic.num_train, c.data.synthetic.num_val, c.data.num_workers = 8, 4, 0
  c.train.batch_size = c.eval.batch_size = 4
  c.train.num_steps, c.train.log_every, c.train.checkpoint_every = 1, 1, 1
  c.optimizer.warmup_steps = 0
  c.eval.metrics = ("coco",)
  trainer = train.Trainer(c)
  params = jax.device_get(trainer.init_state(123)["params"])  # not the seed the run would use
  workdir = str(tmp_path / "run")
  convert.write_workdir(c, params, workdir)

  train.train_and_evaluate(c, workdir, progress=False)
  _, _, variables, step = train.restore_for_inference(workdir)
  assert step == 1
  state = trainer.init_state(c.seed)
  state["params"] = jax.device_put(params, trainer.replicated)
  batch = next(data.make_train_iterator(c, seed=c.seed))
  chex.clear_trace_counter()  # the run above compiled the same step function
  expected, _ = trainer.train_step(state, trainer.to_device(batch))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.device_get(variables["params"]), jax.device_get(expected["params"]))
