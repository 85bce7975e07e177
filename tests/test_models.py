"""Tests for ssdjax.models: head channel -> anchor mapping, shapes for every config, parameter counts.

Big models are only traced (jax.eval_shape); real forward passes use hand-built heads on tiny maps
or the ``tiny`` backbone.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssdjax.data.categories import COCO_V1_CLASSES
from tests.helpers import ssd300_coco, ssd300_voc, ssd512_voc, synthetic
from ssdjax import anchors as anchors_lib
from ssdjax import models
from ssdjax.models import backbones, heads

# The rbg generator compiles much faster on CPU than threefry; the values do not matter here.
KEY = jax.random.key(0, impl="rbg")


def _spec(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def _shapes(model, image_size, batch=2):
  """(variables, (loc, logits)) as shape structs, nothing computed."""
  x = _spec(batch, image_size, image_size, 3)
  variables = jax.eval_shape(model.init, KEY, x)
  return variables, jax.eval_shape(model.apply, variables, x)


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- head -> anchor mapping
#
# Every head gets parameters that copy input channel 0 (which holds a code for (batch, level, y, x))
# to all outputs of its location and add a bias that encodes the output's (k, j) by the layout the
# contract defines: conv channels [K, 4] / [K, C], the dense output [H, W, K, 4 + C]. The expected
# value of anchor a is then built from (level, y, x, k) enumerated independently of the reshape.

C = 3
LOGIT_OFFSET = 50  # logit codes 50 + k*C + c never collide with loc codes k*4 + j (< 50)


def _code(b, level, y, x):
  return 100000.0 * b + 10000.0 * level + 1000.0 * y + 100.0 * x


def _features(sizes, cin=2, batch=2):
  """NHWC maps whose channel 0 is _code(b, level, y, x) and whose other channels are noise."""
  rng = np.random.default_rng(0)
  feats = []
  for level, (h, w) in enumerate(sizes):
    f = rng.normal(size=(batch, h, w, cin)).astype(np.float32) * 50
    for b in range(batch):
      for y in range(h):
        for x in range(w):
          f[b, y, x, 0] = _code(b, level, y, x)
    feats.append(jnp.asarray(f))
  return feats


def _loc_bias(k):
  return np.arange(k * 4, dtype=np.float32)  # channel k*4 + j


def _conf_bias(k):
  return LOGIT_OFFSET + np.arange(k * C, dtype=np.float32)  # channel k*C + c


def _copy_kernel(shape, out_channels=None):
  """Conv kernel [kh, kw, cin, cout] whose centre tap copies input channel 0 to the given outputs."""
  w = np.zeros(shape, np.float32)
  w[shape[0] // 2, shape[1] // 2, 0, slice(None) if out_channels is None else out_channels] = 1.0
  return w


def _hand_params(name, params, sizes, ks, cin):
  """Parameters for head ``name`` implementing 'output = code(location) + bias code(k, j)'."""
  p = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), params)
  if name in ("ssd", "conv1x1"):
    for i, k in enumerate(ks):
      p[f"loc_{i}"] = {"kernel": _copy_kernel(p[f"loc_{i}"]["kernel"].shape), "bias": _loc_bias(k)}
      p[f"conf_{i}"] = {"kernel": _copy_kernel(p[f"conf_{i}"]["kernel"].shape), "bias": _conf_bias(k)}
  elif name == "ssdlite":  # norm=False: depthwise identity, then the pointwise copy
    for i, k in enumerate(ks):
      for branch, bias in (("loc", _loc_bias(k)), ("conf", _conf_bias(k))):
        dw = np.zeros(p[f"{branch}_{i}_dw"]["kernel"].shape, np.float32)
        dw[1, 1, 0, :] = 1.0
        p[f"{branch}_{i}_dw"]["kernel"] = dw
        p[f"{branch}_{i}"] = {"kernel": _copy_kernel(p[f"{branch}_{i}"]["kernel"].shape), "bias": bias}
  elif name == "shared":  # channel 0 of the projection and the tower carries the code
    for i in range(len(ks)):
      p[f"proj_{i}"]["kernel"] = _copy_kernel(p[f"proj_{i}"]["kernel"].shape, 0)
    for j in range(sum(key.startswith("tower_") for key in p)):
      p[f"tower_{j}"]["kernel"] = _copy_kernel(p[f"tower_{j}"]["kernel"].shape, 0)
    p["loc"] = {"kernel": _copy_kernel(p["loc"]["kernel"].shape), "bias": _loc_bias(ks[0])}
    p["conf"] = {"kernel": _copy_kernel(p["conf"]["kernel"].shape), "bias": _conf_bias(ks[0])}
  elif name == "dense":  # hidden unit q = channel 0 at location q (row-major NHWC flatten)
    for i, ((h, w), k) in enumerate(zip(sizes, ks)):
      hidden = p[f"dense_{i}_hidden"]["kernel"]
      out_k, out_b = p[f"dense_{i}_out"]["kernel"], p[f"dense_{i}_out"]["bias"]
      for q in range(h * w):
        hidden[q * cin + 0, q] = 1.0
        for kk in range(k):
          base = (q * k + kk) * (4 + C)  # output laid out [H, W, K, 4 + C]
          out_k[q, base:base + 4 + C] = 1.0
          out_b[base:base + 4] = kk * 4 + np.arange(4)
          out_b[base + 4:base + 4 + C] = LOGIT_OFFSET + kk * C + np.arange(C)
  else:
    raise AssertionError(name)
  return p


def _expected(order, batch=2):
  """loc, logits [B, A, n] for anchors listed as (level, y, x, k)."""
  loc = np.array([[[_code(b, lv, y, x) + k * 4 + j for j in range(4)] for lv, y, x, k in order]
                  for b in range(batch)], np.float32)
  logits = np.array([[[_code(b, lv, y, x) + LOGIT_OFFSET + k * C + c for c in range(C)]
                      for lv, y, x, k in order] for b in range(batch)], np.float32)
  return loc, logits


HEAD_KWARGS = {"ssd": {}, "conv1x1": {}, "ssdlite": {"norm": False}, "dense": {},
               "shared": {"depth": 1, "width": 4}}


def _run_hand_head(name, sizes, ks, cin=2):
  kwargs = dict(HEAD_KWARGS[name])
  if name == "dense":
    kwargs["hidden"] = max(h * w for h, w in sizes)  # one hidden unit per location
  head = heads.get(name)(num_classes=C, anchors_per_location=ks, **kwargs)
  feats = _features(sizes, cin)
  shapes = jax.eval_shape(head.init, KEY, feats)
  params = _hand_params(name, shapes["params"], sizes, ks, cin)
  return jax.jit(head.apply)({"params": params}, feats)


@pytest.mark.parametrize("name", ["ssd", "conv1x1", "ssdlite", "dense", "shared"])
def test_head_channel_to_anchor_mapping_formula(name):
  # Non-square 2x3 map catches an H/W swap; K differs per level (except 'shared').
  sizes = [(2, 3), (1, 1)]
  ks = (4, 4) if name == "shared" else (4, 2)
  order = [(lv, y, x, k) for lv, ((h, w), kk) in enumerate(zip(sizes, ks))
           for y in range(h) for x in range(w) for k in range(kk)]
  loc, logits = _run_hand_head(name, sizes, ks)
  want_loc, want_logits = _expected(order)
  assert loc.shape == (2, len(order), 4) and logits.shape == (2, len(order), C)
  np.testing.assert_array_equal(np.asarray(loc), want_loc)
  np.testing.assert_array_equal(np.asarray(logits), want_logits)


@pytest.mark.parametrize("name", ["ssd", "conv1x1", "ssdlite", "dense", "shared"])
def test_head_order_matches_default_boxes(name):
  """Decode (level, y, x, k) of every anchor from ssdjax.anchors.default_boxes' own boxes."""
  image, fs, steps, mins, maxs = 30, (3, 1), (10, 30), (6, 15), (12, 27)
  ars = ((2,), (3,)) if name == "shared" else ((2,), (2, 3))
  boxes = anchors_lib.default_boxes(image, fs, steps, mins, maxs, ars)  # [A, 4] cxcywh
  ks = tuple(anchors_lib.num_anchors_per_location(ars, maxs))
  # Caffe's per-location box list, written out here: min, sqrt(min*max), then ar and 1/ar.
  wh_to_level_k = {}
  for lv in range(len(fs)):
    whs = [(mins[lv], mins[lv]), (math.sqrt(mins[lv] * maxs[lv]),) * 2]
    for ar in ars[lv]:
      whs += [(mins[lv] * math.sqrt(ar), mins[lv] / math.sqrt(ar)),
              (mins[lv] / math.sqrt(ar), mins[lv] * math.sqrt(ar))]
    for k, (w, h) in enumerate(whs):
      wh_to_level_k[(round(w, 3), round(h, 3))] = (lv, k)
  assert len(wh_to_level_k) == sum(ks)  # sizes identify (level, k) uniquely
  order = []
  for cx, cy, w, h in boxes * image:
    lv, k = wh_to_level_k[(round(float(w), 3), round(float(h), 3))]
    order.append((lv, round(cy / steps[lv] - 0.5), round(cx / steps[lv] - 0.5), k))
  loc, logits = _run_hand_head(name, [(f, f) for f in fs], ks)
  want_loc, want_logits = _expected(order)
  np.testing.assert_array_equal(np.asarray(loc), want_loc)
  np.testing.assert_array_equal(np.asarray(logits), want_logits)


def test_shared_head_shares_parameters_across_levels():
  head = heads.get("shared")(num_classes=5, anchors_per_location=(6, 6, 6), depth=2, width=16)
  feats = [_spec(1, s, s, c) for s, c in ((8, 32), (4, 64), (2, 8))]
  params = jax.eval_shape(head.init, KEY, feats)["params"]
  assert sorted(params) == ["conf", "loc", "proj_0", "proj_1", "proj_2", "tower_0", "tower_1"]
  want = sum(c * 16 + 16 for c in (32, 64, 8)) + 2 * (9 * 16 * 16 + 16) + (9 * 16 * 24 + 24) + (9 * 16 * 30 + 30)
  assert _count(params) == want
  gn = heads.get("shared")(num_classes=5, anchors_per_location=(6, 6, 6), depth=2, width=16, group_norm=True)
  gn_params = jax.eval_shape(gn.init, KEY, feats)["params"]
  assert _count(gn_params) == want + 2 * (16 + 16)  # one GroupNorm scale + bias per tower conv


def test_shared_head_needs_equal_k():
  head = heads.get("shared")(num_classes=3, anchors_per_location=(4, 6))
  with pytest.raises(ValueError, match=r"config\.anchors\.aspect_ratios"):
    jax.eval_shape(head.init, KEY, [_spec(1, 2, 2, 4), _spec(1, 1, 1, 4)])


def test_prior_prob_sets_foreground_class_bias():
  p = 0.01
  names = ("ssd", "conv1x1", "ssdlite", "dense", "shared")
  feats = [jnp.zeros((1, 2, 2, 4))]
  mods = {n: heads.get(n)(num_classes=C, anchors_per_location=(2,), prior_prob=p) for n in names}
  params = jax.jit(lambda: {n: m.init(KEY, feats)["params"] for n, m in mods.items()})()  # one compile
  fg = -math.log((1 - p) / p)
  assert fg == pytest.approx(-4.59512, abs=1e-5)
  for name in names:
    if name == "dense":
      bias = np.asarray(params[name]["dense_0_out"]["bias"]).reshape(2 * 2 * 2, 4 + C)
      np.testing.assert_array_equal(bias[:, :4], 0.0)
      bias = bias[:, 4:]
    else:
      bias = np.asarray(params[name]["conf" if name == "shared" else "conf_0"]["bias"]).reshape(-1, C)
    np.testing.assert_array_equal(bias[:, 0], 0.0, err_msg=name)  # background
    np.testing.assert_allclose(bias[:, 1:], fg, rtol=1e-6, err_msg=name)
  bad = heads.get("ssd")(num_classes=C, anchors_per_location=(2,), prior_prob=1.0)
  with pytest.raises(ValueError, match="prior_prob"):
    jax.eval_shape(bad.init, KEY, feats)


# ----------------------------------------------------------------------------- whole models per config

CONFIGS = {"ssd300_voc": (ssd300_voc, 8732), "ssd512_voc": (ssd512_voc, 24564),
           "ssd300_coco": (ssd300_coco, 8732), "synthetic": (synthetic, 1364)}


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_config_models_output_one_prediction_per_anchor(config_name):
  module, num_anchors = CONFIGS[config_name]
  config = module.get_config()
  variables, (loc, logits) = _shapes(models.from_config(config), config.image_size)
  assert len(anchors_lib.from_config(config)) == num_anchors
  assert loc.shape == (2, num_anchors, 4) and loc.dtype == jnp.float32
  assert logits.shape == (2, num_anchors, len(config.class_names) + 1) and logits.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))


def _ssd300_with(backbone, backbone_kwargs=None, head="ssd"):
  config = ssd300_voc.get_config()
  config.model.backbone = backbone
  config.model.backbone_kwargs = backbone_kwargs or {}
  config.model.head = head
  return config


@pytest.mark.parametrize("backbone,kwargs", [
    ("resnet18", {}), ("resnet34", {}), ("resnet50", {}),
    ("mobilenet_v2", {"first_level_stride": 8, "valid_levels": 1})])
def test_other_backbones_with_ssd300_anchors(backbone, kwargs):
  config = _ssd300_with(backbone, kwargs)
  variables, (loc, logits) = _shapes(models.from_config(config), 300)
  assert loc.shape == (2, 8732, 4) and logits.shape == (2, 8732, 21)
  assert set(variables) == {"params", "batch_stats"}


def test_mobilenet_v2_ssdlite320_maps():
  config = ssd300_voc.get_config()
  config.image_size = 320
  a = config.anchors
  a.feature_sizes = (20, 10, 5, 3, 2, 1)
  a.steps = (16, 32, 64, 107, 160, 320)
  config.model.backbone, config.model.head = "mobilenet_v2", "ssdlite"
  num_anchors = sum(f * f * k for f, k in zip(a.feature_sizes, (4, 6, 6, 6, 4, 4)))
  _, (loc, _) = _shapes(models.from_config(config), 320)
  assert loc.shape == (2, len(anchors_lib.from_config(config)), 4) == (2, num_anchors, 4)


@pytest.mark.parametrize("head", ["conv1x1", "dense", "shared", "ssdlite"])
def test_every_head_on_ssd300(head):
  config = _ssd300_with("vgg16", head=head)
  if head == "shared":  # one K for all levels
    config.anchors.aspect_ratios = ((2, 3),) * 6
  _, (loc, logits) = _shapes(models.from_config(config), 300)
  a = len(anchors_lib.from_config(config))
  assert loc.shape == (2, a, 4) and logits.shape == (2, a, 21)


def test_vgg16_feature_maps_300_and_512():
  def maps(levels, size):
    net = backbones.get("vgg16")(num_levels=levels)
    x = _spec(1, size, size, 3)
    return [f.shape[1:] for f in jax.eval_shape(net.init_with_output, KEY, x)[0]]
  assert maps(6, 300) == [(38, 38, 512), (19, 19, 1024), (10, 10, 512), (5, 5, 256), (3, 3, 256),
                          (1, 1, 256)]
  assert maps(7, 512) == [(64, 64, 512), (32, 32, 1024), (16, 16, 512), (8, 8, 256), (4, 4, 256),
                          (2, 2, 256), (1, 1, 256)]


def test_resnet50_feature_maps_300():
  net = backbones.get("resnet50")(num_levels=6)
  out, _ = jax.eval_shape(net.init_with_output, KEY, _spec(1, 300, 300, 3))
  assert [f.shape[1:] for f in out] == [(38, 38, 1024), (19, 19, 512), (10, 10, 512), (5, 5, 256),
                                        (3, 3, 256), (1, 1, 256)]


def _conv(k, cin, cout):
  return k * k * cin * cout + cout


def test_ssd300_vgg16_parameter_count_matches_paper_and_torchvision():
  vgg = (_conv(3, 3, 64) + _conv(3, 64, 64) + _conv(3, 64, 128) + _conv(3, 128, 128)
         + _conv(3, 128, 256) + 2 * _conv(3, 256, 256) + _conv(3, 256, 512) + 5 * _conv(3, 512, 512))
  fc = _conv(3, 512, 1024) + _conv(1, 1024, 1024)
  l2norm = 512
  extras = (_conv(1, 1024, 256) + _conv(3, 256, 512) + _conv(1, 512, 128) + _conv(3, 128, 256)
            + 2 * (_conv(1, 256, 128) + _conv(3, 128, 256)))
  channels, ks = (512, 1024, 512, 256, 256, 256), (4, 6, 6, 6, 4, 4)
  head = sum(_conv(3, c, k * 4) + _conv(3, c, k * 91) for c, k in zip(channels, ks))
  by_hand = vgg + fc + l2norm + extras + head
  assert vgg == 14_714_688  # VGG16's conv layers

  config = ssd300_coco.get_config()
  config.class_names = COCO_V1_CLASSES  # torchvision's 91 outputs: COCO category ids
  variables, _ = _shapes(models.from_config(config), 300, batch=1)
  n = _count(variables["params"])
  print(f"SSD300-VGG16 (91 classes) params: {n:,}")
  assert n == by_hand == 35_641_826  # torchvision ssd300_vgg16
  assert set(variables["params"]["backbone"]) == (
      {f"conv{s}_{j}" for s, r in zip(range(1, 6), (2, 2, 3, 3, 3)) for j in range(1, r + 1)}
      | {"fc6", "fc7", "l2norm"} | {f"extras_{i}_{j}" for i in range(4) for j in range(2)})


def test_l2norm_against_numpy():
  x = np.random.default_rng(1).normal(size=(2, 3, 3, 8)).astype(np.float32)
  x[0, 0, 0] = 0.0  # eps keeps an all-zero vector finite
  mod = backbones.L2Norm()
  variables = mod.init(KEY, x)
  np.testing.assert_array_equal(variables["params"]["scale"], np.full(8, 20.0, np.float32))
  want = 20.0 * x / np.sqrt((x.astype(np.float64) ** 2).sum(-1, keepdims=True) + 1e-10)
  np.testing.assert_allclose(mod.apply(variables, x), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- errors at the edge


def test_wrong_feature_sizes_names_both_lists_and_fields():
  config = synthetic.get_config()
  config.image_size = 96  # tiny gives 12, 6, 3, 2, 1
  with pytest.raises(ValueError) as err:
    _shapes(models.from_config(config), 96)
  msg = str(err.value)
  for part in ("(12, 6, 3, 2, 1)", "(16, 8, 4, 2, 1)", "config.anchors.feature_sizes", "config.image_size"):
    assert part in msg


def test_too_small_image_for_unpadded_extras():
  net = backbones.get("vgg16")(num_levels=6)
  with pytest.raises(ValueError, match=r"unpadded 3x3 conv .* got 2x2.*config\.image_size"):
    jax.eval_shape(net.init, KEY, _spec(1, 128, 128, 3))
  with pytest.raises(ValueError, match=r"vgg16.*gives 2 to 7 feature maps.*asks for 8"):
    jax.eval_shape(backbones.get("vgg16")(num_levels=8).init, KEY, _spec(1, 300, 300, 3))


@pytest.mark.parametrize("registry,field", [(backbones, "backbone"), (heads, "head")])
def test_unknown_names_list_valid_names(registry, field):
  assert "vgg16" in backbones.names() and "tiny" in backbones.names()
  assert set(heads.names()) == {"ssd", "conv1x1", "dense", "shared", "ssdlite"}
  with pytest.raises(ValueError) as err:
    registry.get("nope")
  assert f"config.model.{field}" in str(err.value)
  assert all(n in str(err.value) for n in registry.names())
  config = synthetic.get_config()
  setattr(config.model, field, "nope")
  with pytest.raises(ValueError, match="valid names"):
    models.from_config(config)


def test_unknown_kwargs_name_the_field_and_accepted_keys():
  config = synthetic.get_config()
  config.model.head = "shared"
  config.model.head_kwargs = {"widht": 64}
  with pytest.raises(ValueError) as err:
    models.from_config(config)
  msg = str(err.value)
  assert "config.model.head_kwargs" in msg and "widht" in msg
  assert all(f in msg for f in ("depth", "width", "group_norm", "prior_prob"))
  config = synthetic.get_config()
  config.model.backbone_kwargs = {"num_levels": 3}  # set by SSD, not by the config
  with pytest.raises(ValueError, match=r"config\.model\.backbone_kwargs.*num_levels.*width"):
    models.from_config(config)
  config = synthetic.get_config()
  config.model.compute_dtype = "float16"
  with pytest.raises(ValueError, match="config.model.compute_dtype"):
    models.from_config(config)


# ----------------------------------------------------------------------------- tiny model, real runs


@pytest.fixture(scope="module")
def tiny():
  config = synthetic.get_config()
  model = models.from_config(config)
  images = jax.random.normal(jax.random.key(1), (2, 128, 128, 3))
  return model, images, jax.jit(model.init)(KEY, images), jax.jit(model.apply)


def test_tiny_forward_under_jit_is_finite(tiny):
  model, images, variables, forward = tiny
  loc, logits = forward(variables, images)
  assert loc.shape == (2, 1364, 4) and logits.shape == (2, 1364, 5)
  assert np.isfinite(loc).all() and np.isfinite(logits).all()
  assert np.abs(loc).max() > 0 and np.abs(logits).max() > 0
  n = _count(variables["params"])
  print(f"tiny SSD (synthetic config) params: {n:,}")
  assert 100_000 <= n <= 500_000


def test_tiny_batch_stats_update_in_training_only(tiny):
  model, images, variables, forward = tiny
  assert set(variables) == {"params", "batch_stats"}
  train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  (loc, _), updates = train(variables, images)
  before = jax.tree.leaves(variables["batch_stats"])
  after = jax.tree.leaves(updates["batch_stats"])
  assert len(before) == len(after) > 0
  assert all(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(after, before))
  assert np.isfinite(loc).all()
  # Evaluation uses the running statistics, so an image's output does not depend on its batch
  # mates; in training it does.
  other = images.at[1].set(3.0 * images[1] + 1.0)
  np.testing.assert_allclose(forward(variables, images)[0][0], forward(variables, other)[0][0],
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(loc[0], train(variables, other)[0][0][0], atol=1e-3)


def test_ssd_module_is_hashable_for_static_jit_arguments(tiny):
  _, images, variables, _ = tiny
  model = models.SSD(num_classes=5, anchors_per_location=[4] * 5, feature_sizes=[16, 8, 4, 2, 1],
                     backbone="tiny", head="ssd", backbone_kwargs={"width": 32}, head_kwargs={})
  apply = jax.jit(lambda m, v, x: m.apply(v, x), static_argnums=0)
  out = jax.eval_shape(apply, model, variables, images)
  assert out[0].shape == (2, 1364, 4)


def test_bfloat16_compute_keeps_float32_params_and_outputs(tiny):
  model32, images, variables, forward = tiny
  config = synthetic.get_config()
  config.model.compute_dtype = "bfloat16"
  model = models.from_config(config)
  shapes = jax.eval_shape(model.init, KEY, images)
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
  assert "bf16" in str(jax.make_jaxpr(model.apply)(variables, images))
  loc, logits = jax.jit(model.apply)(variables, images)
  assert loc.dtype == logits.dtype == jnp.float32
  loc32, logits32 = forward(variables, images)
  np.testing.assert_allclose(loc, loc32, atol=0.05 * float(np.abs(loc32).max()))
  np.testing.assert_allclose(logits, logits32, atol=0.05 * float(np.abs(logits32).max()))
