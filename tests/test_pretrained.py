"""ImageNet backbones from torchvision checkpoints (ssdjax.pretrained) and freezing (ssdjax.freeze).

Parity: a random-initialised torchvision classification network (BatchNorm statistics and affine
parameters randomised too, so a wrong mapping shows) and the converted ssdjax backbone give the
same feature maps on the same input; the references are computed from torchvision's modules.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssdjax import pretrained
from ssdjax import train
from ssdjax.errors import UserError
from ssdjax.models import backbones
from tests.helpers import REPO, load_config, small_config, subprocess_env

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
nn = torch.nn

RTOL = 1e-4


def _randomise_batchnorm(model, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        n = m.num_features
        m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        m.weight.copy_(torch.rand(n, generator=g) + 0.5)
        m.bias.copy_(torch.randn(n, generator=g) * 0.1)
  return model.eval()


def _ssdjax_maps(name, state_dict, images, num_levels=2, **kwargs):
  module = backbones.get(name)(num_levels=num_levels, **kwargs)
  x = jnp.asarray(images.permute(0, 2, 3, 1).numpy())
  variables = jax.jit(lambda: module.init(jax.random.key(0), x, train=False))()
  converted = pretrained.convert(state_dict, name, variables, kwargs)
  variables, count = pretrained.fill({c: {"backbone": v} for c, v in variables.items()},
                                     converted)
  assert count == len(jax.tree.leaves(converted))
  variables = {c: v["backbone"] for c, v in variables.items() if "backbone" in v}
  return [np.asarray(f) for f in module.apply(variables, x, train=False)]


def _rel(ours, ref_nchw) -> float:
  ref = ref_nchw.detach().permute(0, 2, 3, 1).numpy()
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _images(size, seed=0):
  return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_vgg16_feature_maps_equal_torchvision_with_reduced_fc():
  torch.manual_seed(0)
  vgg = torchvision.models.vgg16().eval()
  vgg.features[16].ceil_mode = True  # torchvision's ssd300_vgg16 sets pool3 to ceil mode
  images = _images(150)
  ours = _ssdjax_maps("vgg16", vgg.state_dict(), images)
  with torch.no_grad():
    conv4_3 = vgg.features[:23](images)  # through relu4_3
    ref0 = 20.0 * conv4_3 / torch.sqrt((conv4_3 ** 2).sum(1, keepdim=True) + 1e-10)
    x = nn.functional.max_pool2d(vgg.features[23:30](conv4_3), 3, 1, 1)  # conv5_x, pool5
    # The paper's reduced fc6/fc7: every 4th filter and input channel, every 3rd tap of 7x7.
    idx = lambda n, s: torch.arange(0, n, s)
    w6 = vgg.classifier[0].weight.view(4096, 512, 7, 7).index_select(0, idx(4096, 4))
    w6 = w6.index_select(2, idx(7, 3)).index_select(3, idx(7, 3))
    b6 = vgg.classifier[0].bias.index_select(0, idx(4096, 4))
    w7 = vgg.classifier[3].weight.index_select(0, idx(4096, 4)).index_select(1, idx(4096, 4))
    b7 = vgg.classifier[3].bias.index_select(0, idx(4096, 4))
    x = torch.relu(nn.functional.conv2d(x, w6, b6, padding=6, dilation=6))
    ref1 = torch.relu(nn.functional.conv2d(x, w7[:, :, None, None], b7))
  rel = [_rel(ours[0], ref0), _rel(ours[1], ref1)]
  print(f"vgg16: conv4_3 (L2Norm) relative difference {rel[0]:.2e}, fc7 {rel[1]:.2e}")
  assert max(rel) <= RTOL


def test_vgg16_features_checkpoint_keeps_fc_initialisation():
  torch.manual_seed(0)
  vgg = torchvision.models.vgg16()
  state = vgg.state_dict()
  for k in state:  # IMAGENET1K_FEATURES ships a NaN classifier
    if k.startswith("classifier."):
      state[k] = torch.full_like(state[k], float("nan"))
  converted = pretrained.convert(state, "vgg16", pretrained.abstract_backbone("vgg16"))
  assert "fc6" not in converted["params"] and len(converted["params"]) == 13


def _nvidia_resnet(builder, seed=0):
  """torchvision ResNet with NVIDIA SSD300's change: layer3 (conv4_x) at stride 1."""
  torch.manual_seed(seed)
  net = builder()
  block = net.layer3[0]
  for conv in (block.conv1, block.conv2, block.downsample[0]):
    conv.stride = (1, 1)
  return _randomise_batchnorm(net, seed)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_resnet_feature_map_equals_torchvision(name):
  net = _nvidia_resnet(getattr(torchvision.models, name))
  images = _images(160)
  ours = _ssdjax_maps(name, net.state_dict(), images)
  with torch.no_grad():
    x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
    ref = net.layer3(net.layer2(net.layer1(x)))
  rel = _rel(ours[0], ref)
  print(f"{name}: layer3 (conv4_x, stride 8) relative difference {rel:.2e}")
  assert rel <= RTOL


def test_mobilenet_v2_feature_maps_equal_torchvision():
  torch.manual_seed(0)
  net = _randomise_batchnorm(torchvision.models.mobilenet_v2())
  images = _images(160)
  ours = _ssdjax_maps("mobilenet_v2", net.state_dict(), images, bn_epsilon=1e-5)
  with torch.no_grad():
    ref0 = net.features[14].conv[0](net.features[:14](images))  # first stride-32 block's expansion
    ref1 = net.features(images)
  rel = [_rel(ours[0], ref0), _rel(ours[1], ref1)]
  print(f"mobilenet_v2: expansion of block 14 relative difference {rel[0]:.2e}, last conv {rel[1]:.2e}")
  assert max(rel) <= RTOL


def test_mobilenet_v3_large_feature_maps_equal_torchvision():
  torch.manual_seed(0)
  net = _randomise_batchnorm(torchvision.models.mobilenet_v3_large())
  images = _images(160)
  ours = _ssdjax_maps("mobilenet_v3_large", net.state_dict(), images)
  with torch.no_grad():
    ref0 = net.features[13].block[0](net.features[:13](images))  # the C4 block's expansion
    ref1 = net.features(images)
  rel = [_rel(ours[0], ref0), _rel(ours[1], ref1)]
  print(f"mobilenet_v3_large: C4 expansion relative difference {rel[0]:.2e}, last conv {rel[1]:.2e}")
  assert max(rel) <= RTOL


def test_bad_checkpoints_stop_with_the_key():
  state = {k: v.numpy() for k, v in torchvision.models.resnet18().state_dict().items()}
  abstract = pretrained.abstract_backbone("resnet18")
  missing = {k: v for k, v in state.items() if k != "layer2.1.bn2.running_var"}
  with pytest.raises(ValueError, match=r"missing key 'layer2\.1\.bn2\.running_var'"):
    pretrained.convert(missing, "resnet18", abstract)
  with pytest.raises(ValueError, match=r"'extra\.weight' is not used"):
    pretrained.convert({**state, "extra.weight": np.zeros(3)}, "resnet18", abstract)
  wrong = dict(state, **{"layer1.0.conv1.weight": np.zeros((64, 64, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"'layer1\.0\.conv1\.weight' has shape \(64, 64, 1, 1\)"):
    pretrained.convert(wrong, "resnet18", abstract)
  # A ResNet-50 checkpoint for a ResNet-18 backbone: the first differing key is named.
  r50 = {k: v.numpy() for k, v in torchvision.models.resnet50().state_dict().items()}
  with pytest.raises(ValueError, match=r"state dict key '\S+' "):
    pretrained.convert(r50, "resnet18", abstract)
  with pytest.raises(UserError, match="no pretrained-weight layout"):
    pretrained.convert(state, "tiny", abstract)


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
  folder = tmp_path_factory.mktemp("weights")
  torch.manual_seed(1)
  net = _randomise_batchnorm(torchvision.models.resnet18(), 1)
  pth = str(folder / "resnet18-f37072fd.pth")
  torch.save(net.state_dict(), pth)
  npz = str(folder / "resnet18.npz")
  out = subprocess.run([sys.executable, "-m", "ssdjax.pretrained", f"--torchvision={pth}",
                        "--backbone=resnet18", f"--out={npz}"], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "--config.model.pretrained=" in out.stdout
  return {"pth": pth, "npz": npz, "state": {k: v.numpy() for k, v in net.state_dict().items()}}


def _resnet18_config(**overrides):
  # ResNet-18 at 128: layer3 16x16, then 8, 4, 2, 1 with padded stride-2 extras.
  return small_config(**{"model.backbone": "resnet18", "model.backbone_kwargs": {"valid_levels": 0},
                         **overrides})


@pytest.mark.parametrize("kind", ["npz", "pth"])
def test_training_starts_from_the_pretrained_trunk(resnet18_files, kind):
  config = _resnet18_config(**{"model.pretrained": resnet18_files[kind]})
  state = jax.device_get(train.Trainer(config).init_state(0))
  ref = resnet18_files["state"]
  bb, stats = state["params"]["backbone"], state["batch_stats"]["backbone"]
  np.testing.assert_array_equal(bb["layer2_1"]["conv2"]["conv"]["kernel"],
                                ref["layer2.1.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(stats["conv1"]["bn"]["var"], ref["bn1.running_var"])
  np.testing.assert_array_equal(bb["layer3_0"]["downsample"]["bn"]["scale"],
                                ref["layer3.0.downsample.1.weight"])
  fresh = jax.device_get(train.Trainer(_resnet18_config()).init_state(0))
  # The extra levels and the head keep their initialisation.
  np.testing.assert_array_equal(bb["extras_0_1"]["conv"]["kernel"],
                                fresh["params"]["backbone"]["extras_0_1"]["conv"]["kernel"])
  np.testing.assert_array_equal(state["params"]["head"]["conf_0"]["kernel"],
                                fresh["params"]["head"]["conf_0"]["kernel"])


def test_a_checkpoint_of_another_network_is_refused(tmp_path):
  path = str(tmp_path / "mobilenet_v2.pth")
  torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
  with pytest.raises(UserError, match=r"config\.model\.pretrained=.*mobilenet_v2\.pth: state dict"):
    train.Trainer(_resnet18_config(**{"model.pretrained": path})).init_state(0)
  with pytest.raises(UserError, match="is not a file"):
    train.Trainer(_resnet18_config(**{"model.pretrained": str(tmp_path / "none.pth")})).init_state(0)


def _batch(config, n, seed):
  rng = np.random.default_rng(seed)
  s, g = config.image_size, config.data.max_boxes
  xy = rng.uniform(0, 0.5, (n, g, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(0.2, 0.5, (n, g, 2))], -1).astype(np.float32)
  mask = np.arange(g)[None] < 3
  return {"images": rng.normal(size=(n, s, s, 3)).astype(np.float32), "gt_boxes": boxes,
          "gt_labels": np.broadcast_to(np.where(mask, 1 + np.arange(g) % 4, 0), (n, g)).astype(np.int32),
          "gt_mask": np.broadcast_to(mask, (n, g)).copy()}


def _train(config, steps=3):
  trainer = train.Trainer(config)
  state = trainer.init_state(0)
  before = jax.device_get(state)
  for i in range(steps):
    state, _ = trainer.train_step(state, trainer.to_device(_batch(config, 8, i)))
  return before, jax.device_get(state)


def _conv(params, name):
  """The first conv of a trunk module or extra level."""
  return params[name]["conv1"]["conv"] if name.startswith("layer") else params[name]["conv"]


def _bn(params, name):
  return params[name]["conv1"]["bn"] if name.startswith("layer") else params[name]["bn"]


def _same(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_frozen_stages_and_statistics_stay_bitwise_while_the_rest_trains():
  # torchvision's trainable_backbone_layers=2 on ResNet: conv1 and layer1 frozen.
  before, after = _train(_resnet18_config(**{"model.trainable_backbone_layers": 2,
                                             "optimizer.learning_rate": 0.05}))
  p0, p1 = before["params"]["backbone"], after["params"]["backbone"]
  s0, s1 = before["batch_stats"]["backbone"], after["batch_stats"]["backbone"]
  for name in ("conv1", "layer1_0", "layer1_1"):
    assert _same(p0[name], p1[name]), name
    assert _same(s0[name], s1[name]), name  # frozen BatchNorm: running statistics, not updated
  for name in ("layer2_0", "layer3_1", "extras_0_0"):
    assert not _same(_conv(p0, name), _conv(p1, name)), name
    assert not _same(s0[name], s1[name]), name
  assert not _same(before["params"]["head"], after["params"]["head"])


def test_frozen_batchnorm_everywhere_in_the_trunk():
  before, after = _train(_resnet18_config(**{"model.freeze_backbone_bn": True,
                                             "optimizer.learning_rate": 0.05}))
  p0, p1 = before["params"]["backbone"], after["params"]["backbone"]
  s0, s1 = before["batch_stats"]["backbone"], after["batch_stats"]["backbone"]
  for name in ("conv1", "layer1_0", "layer2_1", "layer3_1"):
    assert _same(s0[name], s1[name]), name
    assert _same(_bn(p0, name), _bn(p1, name)), name  # affine parameters fixed too
    assert not _same(_conv(p0, name), _conv(p1, name)), name  # the convolutions train
  assert not _same(s0["extras_0_0"], s1["extras_0_0"])  # the extras' BatchNorms are not frozen


def test_trainable_layers_out_of_range_is_a_user_error():
  with pytest.raises(UserError, match=r"has 4 trunk stages; give 0\.\.4"):
    train.Trainer(_resnet18_config(**{"model.trainable_backbone_layers": 5}))


def test_stages_follow_torchvision():
  names = list(pretrained.abstract_backbone("mobilenet_v2")["params"])
  stages = pretrained.layout("mobilenet_v2").stages(names)
  assert stages[0] == ("features_0", "features_1") and stages[-1] == ("features_18",)
  assert [len(s) for s in stages] == [2, 2, 3, 7, 4, 1]
  vgg = pretrained.layout("vgg16").stages(list(pretrained.abstract_backbone("vgg16")["params"]))
  assert vgg[0] == ("conv1_1", "conv1_2") and vgg[4] == ("conv5_1", "conv5_2", "conv5_3")
  v3 = pretrained.layout("mobilenet_v3_large").stages([])
  assert [len(s) for s in v3] == [2, 2, 3, 6, 3, 1]  # torchvision's stage_indices 0,2,4,7,13,16


def test_ssd300_resnet50_in_nvidia_layout_gives_nvidia_maps():
  """All six maps of configs/ssd300_resnet50.py's backbone against NVIDIA's SSD300 v1.1 layout
  written in torch (DeepLearningExamples' ``ResNet`` feature extractor and
  ``_build_additional_features``), random weights and BatchNorm statistics."""
  trunk = _nvidia_resnet(torchvision.models.resnet50, seed=2)
  extras = []
  for i, (cin, cout, mid) in enumerate(zip([1024, 512, 512, 256, 256], [512, 512, 256, 256, 256],
                                           [256, 256, 128, 128, 128])):
    stride, pad = (2, 1) if i < 3 else (1, 0)
    extras.append(nn.Sequential(
        nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        nn.Conv2d(mid, cout, 3, padding=pad, stride=stride, bias=False), nn.BatchNorm2d(cout),
        nn.ReLU()))
  extras = _randomise_batchnorm(nn.ModuleList(extras), seed=3)
  images = _images(300, seed=4)
  with torch.no_grad():
    x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(images))))
    refs = [trunk.layer3(trunk.layer2(trunk.layer1(x)))]
    for block in extras:
      refs.append(block(refs[-1]))

  config = load_config("ssd300_resnet50.py")
  module = backbones.get(config.model.backbone)(num_levels=len(config.anchors.feature_sizes),
                                                **config.model.backbone_kwargs)
  x = jnp.asarray(images.permute(0, 2, 3, 1).numpy())
  variables = module.init(jax.random.key(0), x[:1], train=False)
  converted = pretrained.convert(trunk.state_dict(), "resnet50", variables)
  for i, block in enumerate(extras):  # the extras: 1x1 conv, BN, ReLU, 3x3 conv, BN, ReLU
    for j, (conv, bn) in enumerate(((0, 1), (3, 4))):
      name = f"extras_{i}_{j}"
      converted["params"][name] = {
          "conv": {"kernel": block[conv].weight.detach().numpy().transpose(2, 3, 1, 0)},
          "bn": {"scale": block[bn].weight.detach().numpy(), "bias": block[bn].bias.detach().numpy()}}
      converted["batch_stats"][name] = {"bn": {"mean": block[bn].running_mean.numpy(),
                                               "var": block[bn].running_var.numpy()}}
  variables, count = pretrained.fill({c: {"backbone": v} for c, v in variables.items()}, converted)
  assert count == len(jax.tree.leaves(variables))  # every leaf came from torch
  ours = module.apply({c: v["backbone"] for c, v in variables.items()}, x, train=False)
  assert [f.shape[1] for f in ours] == list(config.anchors.feature_sizes) == [38, 19, 10, 5, 3, 1]
  rel = [_rel(np.asarray(o), r) for o, r in zip(ours, refs)]
  print("ssd300_resnet50 (NVIDIA layout): relative difference per map "
        + ", ".join(f"{r:.2e}" for r in rel))
  assert max(rel) <= RTOL
