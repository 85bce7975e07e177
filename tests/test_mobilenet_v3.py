"""The mobilenet_v3_large backbone against torchvision's ``mobilenet_v3_large`` (random weights).

torchvision's trunk gets randomised BatchNorm statistics (calibrated on a batch, then scaled) and
random biases, so that a wrong mapping of any tensor shows; its state dict is converted with
``torchvision_layer_map`` + ``params_from_torchvision`` and both nets run on the same input. The
relative differences (max|a - b| / max|b|) are printed (``pytest -s``).
"""

import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from torchvision.models import mobilenet_v3_large  # pylint: disable=g-import-not-at-top
from torchvision.models.detection.ssdlite import _mobilenet_extractor  # pylint: disable=g-import-not-at-top

from ssdjax.models import backbones, mobilenet_v3  # pylint: disable=g-import-not-at-top

SIZE = 320
KEY = jax.random.key(0)


def randomise_batchnorm(model, run):
  """Random BatchNorm statistics and affine parameters and random conv biases, at the scale of
  the batch ``run()`` feeds through ``model``: every tensor matters for the output.

  In one eval-mode pass, each BatchNorm's running mean and variance are set, just before it runs,
  from its actual input (so the shifts below do not compound through the depth of the net), then
  shifted at random per channel: mean + 0.1 std N(0, 1), variance x U(0.5, 2). Scales are
  U(0.5, 1.5), biases N(0, 0.1). A second pass would see the first pass's shifts, so call it once.
  """
  bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]

  def calibrate(bn, inputs):
    x = inputs[0]
    var = x.var(dim=(0, 2, 3), unbiased=False)
    # Small maps (SSDLite's 1x1 level: 2 values per channel) give near-zero variances, which
    # would amplify float32 rounding; floored at a tenth of the layer's mean.
    var = torch.maximum(var, 0.1 * var.mean())
    bn.running_mean.copy_(x.mean(dim=(0, 2, 3)) + 0.1 * var.sqrt() * torch.randn_like(var))
    bn.running_var.copy_(var * torch.empty_like(var).uniform_(0.5, 2.0))

  model.eval()
  with torch.no_grad():
    for bn in bns:
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.normal_(0.0, 0.1)
    for m in model.modules():
      if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
        m.bias.normal_(0.0, 0.1)
    hooks = [bn.register_forward_pre_hook(calibrate) for bn in bns]
    try:
      run()
    finally:
      for hook in hooks:
        hook.remove()


def relative_diff(name, a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (name, a.shape, b.shape)
  rel = float(np.abs(a - b).max() / np.abs(b).max())
  print(f"\n[parity] {name}: max|a-b| / max|b| = {rel:.3g} (max|b| = {np.abs(b).max():.3g})")
  return rel


@pytest.fixture(scope="module", params=[False, True], ids=["full_tail", "reduced_tail"])
def pair(request):
  reduced = request.param
  torch.manual_seed(0)
  model = mobilenet_v3_large(weights=None, reduced_tail=reduced)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)  # [B, H, W, 3]
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  randomise_batchnorm(model, lambda: model(x))
  with torch.no_grad():
    c4 = mobilenet_v3.C4_INDEX
    level1 = model.features[c4].block[0](model.features[:c4](x))
    level2 = model.features(x)
  state_dict = model.state_dict()
  layer_map = mobilenet_v3.torchvision_layer_map(list(state_dict))
  variables = mobilenet_v3.params_from_torchvision(state_dict, layer_map)
  net = mobilenet_v3.MobileNetV3Large(num_levels=2, reduced_tail=reduced)
  feats = jax.jit(lambda v, x: net.apply(v, x, train=False))(variables, images)
  return {"reduced": reduced, "net": net, "state_dict": state_dict, "layer_map": layer_map,
          "variables": variables, "images": images,
          "torch": [t.numpy().transpose(0, 2, 3, 1) for t in (level1, level2)],
          "jax": [np.asarray(f) for f in feats]}


def test_feature_maps_equal_torchvision(pair):
  tail = "reduced tail" if pair["reduced"] else "full tail"
  channels = (672, 480 if pair["reduced"] else 960)
  for level, (got, want) in enumerate(zip(pair["jax"], pair["torch"]), start=1):
    side = SIZE // (16 if level == 1 else 32)
    assert got.shape == (2, side, side, channels[level - 1])
    assert relative_diff(f"mobilenet_v3_large {tail} level {level} {got.shape[1:]}", got,
                         want) <= 1e-4


def test_converted_variables_fill_the_model_exactly(pair):
  want = jax.eval_shape(pair["net"].init, KEY, jnp.zeros((1, SIZE, SIZE, 3)))
  got = pair["variables"]
  assert set(got) == set(want) == {"params", "batch_stats"}
  for col in want:
    assert jax.tree.structure(got[col]) == jax.tree.structure(want[col]), col
    for a, b in zip(jax.tree.leaves(got[col]), jax.tree.leaves(want[col])):
      assert a.shape == b.shape
  # Everything but the ImageNet classifier (and BatchNorm's step counters) is used.
  unused = mobilenet_v3.unmapped_keys(list(pair["state_dict"]), pair["layer_map"])
  assert all(k.startswith("classifier.") for k in unused) and unused
  assert all(k.rsplit(".", 1)[0] in pair["layer_map"] for k in pair["state_dict"]
             if not k.startswith("classifier."))


def test_layer_map_names():
  m = mobilenet_v3.torchvision_layer_map(["features.0.0.weight"])
  assert m["features.0.0"] == ("features_0", "conv") and m["features.0.1"] == ("features_0", "bn")
  assert m["features.1.block.0.0"] == ("features_1", "dw", "conv")  # block 1 has no expansion
  assert m["features.4.block.2.fc1"] == ("features_4", "se", "fc1")
  assert m["features.13.block.0.1"] == ("features_13", "expand", "bn")
  assert m["features.13.block.3.0"] == ("features_13", "project", "conv")
  assert m["features.16.1"] == ("features_16", "bn")
  assert not any(k.startswith("classifier") for k in m)
  with pytest.raises(ValueError, match=r"no 'features\.\*' keys.*'fc\.weight'"):
    mobilenet_v3.torchvision_layer_map(["fc.weight"])


def test_params_from_torchvision_errors_name_the_key(pair):
  sd = dict(pair["state_dict"])
  del sd["features.5.block.2.fc2.weight"]
  with pytest.raises(ValueError, match=r"missing key 'features\.5\.block\.2\.fc2\.weight'"):
    mobilenet_v3.params_from_torchvision(sd, pair["layer_map"])
  sd = dict(pair["state_dict"], **{"features.0.0.weight": torch.zeros(16, 27)})
  with pytest.raises(ValueError, match=r"'features\.0\.0\.weight' has shape \(16, 27\)"):
    mobilenet_v3.params_from_torchvision(sd, pair["layer_map"])


def test_stages_freeze_what_torchvision_freezes():
  """torchvision_frozen(t) == the features whose parameters torchvision's _mobilenet_extractor
  sets to requires_grad=False."""
  stages = mobilenet_v3.torchvision_stages()
  assert [len(s) for s in stages] == [2, 2, 3, 6, 3, 1]
  assert stages[0] == ("features_0", "features_1") and stages[-1] == ("features_16",)
  for t in range(7):
    model = mobilenet_v3_large(weights=None)
    _mobilenet_extractor(model, t, torch.nn.BatchNorm2d)
    want = tuple(f"features_{i}" for i, block in enumerate(model.features)
                 if not any(p.requires_grad for p in block.parameters()))
    assert mobilenet_v3.torchvision_frozen(t) == want, t
  assert mobilenet_v3.torchvision_frozen(6) == ()
  assert len(mobilenet_v3.torchvision_frozen(0)) == 17
  with pytest.raises(ValueError, match=r"trainable_backbone_layers.*0\.\.6.*got 7"):
    mobilenet_v3.torchvision_frozen(7)


def test_registered_and_levels():
  assert backbones.get("mobilenet_v3_large") is mobilenet_v3.MobileNetV3Large
  assert "mobilenet_v3_large" in backbones.REGISTRY.builtin_names()
  net = mobilenet_v3.MobileNetV3Large(num_levels=7)
  out, _ = jax.eval_shape(net.init_with_output, KEY, jnp.zeros((1, SIZE, SIZE, 3)))
  assert [f.shape[1:] for f in out] == [(20, 20, 672), (10, 10, 960), (5, 5, 512), (3, 3, 256),
                                        (2, 2, 256), (1, 1, 128), (1, 1, 128)]
  half = mobilenet_v3.MobileNetV3Large(num_levels=2, width_mult=0.5)
  out, _ = jax.eval_shape(half.init_with_output, KEY, jnp.zeros((1, SIZE, SIZE, 3)))
  assert [f.shape[-1] for f in out] == [336, 480]
  with pytest.raises(ValueError, match=r"mobilenet_v3_large.*at least 2.*asks for 1"):
    jax.eval_shape(mobilenet_v3.MobileNetV3Large(num_levels=1).init, KEY,
                   jnp.zeros((1, SIZE, SIZE, 3)))


def test_width_mult_matches_torchvision_shapes():
  model = mobilenet_v3_large(weights=None, width_mult=0.75)
  layer_map = mobilenet_v3.torchvision_layer_map(list(model.state_dict()))
  variables = mobilenet_v3.params_from_torchvision(model.state_dict(), layer_map)
  net = mobilenet_v3.MobileNetV3Large(num_levels=2, width_mult=0.75)
  want = jax.eval_shape(net.init, KEY, jnp.zeros((1, 64, 64, 3)))
  shapes = lambda t: jax.tree.map(lambda a: a.shape, t)
  assert shapes(variables) == shapes(want)
