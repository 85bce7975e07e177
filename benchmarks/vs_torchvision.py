r"""ssdjax against torchvision's ``ssd300_vgg16``: inference and train-step speed, same weights and input.

  python benchmarks/vs_torchvision.py                                 # CPU: batch 2, 3 timed runs
  python benchmarks/vs_torchvision.py --batch_size=32 --steps=10 --dtype=bfloat16   # GPU

Both are SSD300-VGG16 with 91 classes: torchvision's with random weights (``weights=None``), ssdjax
with the same weights (``convert.from_torchvision``) and ``configs/ssd300_coco_torchvision.py``. The
input is one batch of random 300x300 images with 1-8 random ground-truth boxes each.

* inference: torchvision ``model.eval()`` under ``torch.no_grad()`` on a list of [3, 300, 300] images
  in [0, 1]. Its forward includes its ``transform`` (normalize, resize 300 -> 300, rescale boxes),
  which ssdjax leaves to the input pipeline; the transform alone is timed and printed too.
  ssdjax: ``Trainer.predict`` on the same images already normalized. Both include the
  post-processing (score threshold, per-class top-k, NMS); the network alone is timed as well.
  With random weights every class score is near 1/91, just above the 0.01 threshold, so
  torchvision's post-processing gets ~400 candidates for each of the 90 classes: its worst case,
  far slower than with trained weights. ssdjax's (static shapes) costs the same for any scores.
* train step: torchvision ``model.train()``, loss dict from the targets, summed, backward,
  ``torch.optim.SGD(lr=1e-3, momentum=0.9, weight_decay=5e-4)``; ssdjax ``Trainer.train_step``
  (forward, matching, loss, backward, SGD).

Times exclude compilation (ssdjax's compile time is printed apart) and warm-up, wait for the device
(``block_until_ready``, ``torch.cuda.synchronize``) and are the median of --steps runs after 2
warm-up runs. Each framework gets one device; torch uses os.cpu_count() threads and, on a GPU,
``cudnn.benchmark`` (XLA autotunes its convolutions too) and its default TF32 convolutions, as XLA.
bfloat16 means ``config.model.compute_dtype`` in ssdjax and ``torch.autocast`` in torch. Ratios are
ssdjax / torchvision time: below 1, ssdjax is faster.
"""

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # pylint: disable=g-import-not-at-top

WARMUP = 2
SIZE = 300


def timed(fn, steps, sync):
  """Median seconds of fn() over `steps` runs after WARMUP runs; sync() waits for the device."""
  for _ in range(WARMUP):
    sync(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def random_input(batch_size, max_boxes, seed=0):
  """Images [B, 300, 300, 3] in [0, 255], gt boxes [B, G, 4] xyxy normalized, labels 1..90, mask."""
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0, 0.6, (batch_size, max_boxes, 2))
  wh = rng.uniform(0.05, 0.4, (batch_size, max_boxes, 2))
  n = rng.integers(1, min(max_boxes, 8) + 1, batch_size)
  mask = np.arange(max_boxes)[None] < n[:, None]
  return (rng.uniform(0, 255, (batch_size, SIZE, SIZE, 3)).astype(np.float32),
          (np.concatenate([xy, xy + wh], -1) * mask[..., None]).astype(np.float32),
          np.where(mask, rng.integers(1, 91, (batch_size, max_boxes)), 0).astype(np.int32), mask)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch_size", type=int, default=2)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--skip_train", action="store_true", help="time inference only")
  args = parser.parse_args()

  if args.device == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"  # must precede the first jax import
  # Both frameworks share one GPU: JAX would otherwise take 75% of its memory up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  from torchvision.models.detection import ssd300_vgg16  # pylint: disable=g-import-not-at-top

  from ssdjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from ssdjax import convert, train  # pylint: disable=g-import-not-at-top

  jax_gpus = [d for d in jax.devices() if d.platform == "gpu"]
  device = args.device
  if device == "auto":
    device = "cuda" if torch.cuda.is_available() and jax_gpus else "cpu"
  if device == "cuda" and not (torch.cuda.is_available() and jax_gpus):
    raise ValueError(f"--device=cuda needs a GPU in both torch (cuda available: "
                     f"{torch.cuda.is_available()}) and JAX (devices: {jax.devices()}); use --device=cpu")
  jax_device = jax_gpus[0] if device == "cuda" else jax.devices("cpu")[0]
  tdev = torch.device(device)
  torch.set_num_threads(os.cpu_count())
  torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once, in warm-up

  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
        f"python {platform.python_version()}")
  print(f"jax {jax.__version__}, devices {jax.devices()}; torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, cuda available {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name(0)}, cudnn tf32 {torch.backends.cudnn.allow_tf32})"
           if torch.cuda.is_available() else ""))
  print(f"running on {device} ({jax_device}); torch threads {torch.get_num_threads()} "
        f"(= os.cpu_count()); batch {args.batch_size}, {args.dtype}, median of {args.steps} runs "
        f"after {WARMUP} warm-up")

  config = config_lib.load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                             "configs", "ssd300_coco_torchvision.py"))
  config.train.batch_size = config.eval.batch_size = args.batch_size
  config.model.compute_dtype = args.dtype
  config.optimizer.learning_rate, config.optimizer.momentum, config.optimizer.weight_decay = 1e-3, 0.9, 5e-4
  images, gt_boxes, gt_labels, gt_mask = random_input(args.batch_size, config.data.max_boxes)

  # torchvision: images in [0, 1], NCHW, boxes in pixels.
  torch.manual_seed(0)
  model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=91).to(tdev).eval()
  state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
  t_images = [torch.from_numpy(im.transpose(2, 0, 1) / 255).float().to(tdev) for im in images]
  targets = [{"boxes": torch.from_numpy(b[m] * SIZE).to(tdev),
              "labels": torch.from_numpy(l[m]).long().to(tdev)}
             for b, l, m in zip(gt_boxes, gt_labels, gt_mask)]
  autocast = lambda: torch.autocast(tdev.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
  tsync = lambda _: torch.cuda.synchronize() if device == "cuda" else None

  # ssdjax on one device, fed the normalized images (what the input pipeline produces).
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=[jax_device])
  trainer = train.Trainer(config, mesh=mesh)
  state = trainer.init_state(0)
  state["params"] = jax.device_put(convert.from_torchvision(state_dict), trainer.replicated)
  norm = (images - np.float32(config.data.mean_rgb)) / np.float32(config.data.std_rgb)
  batch = trainer.to_device(dict(images=norm, gt_boxes=gt_boxes, gt_labels=gt_labels, gt_mask=gt_mask))
  variables, jx_images = trainer.variables(state), batch["images"]
  x = torch.from_numpy(norm.transpose(0, 3, 1, 2).copy()).to(tdev)  # = torchvision's transform output

  def tv_run(fn):
    def run():
      with torch.no_grad(), autocast():
        return fn()
    return timed(run, args.steps, tsync)

  t_tv = tv_run(lambda: model(t_images))
  t_transform = tv_run(lambda: model.transform(t_images))
  t_tv_net = tv_run(lambda: model.head(list(model.backbone(x).values())))
  with torch.no_grad(), autocast():
    n_tv = np.mean([len(d["scores"]) for d in model(t_images)])
  t0 = time.perf_counter()
  predict = trainer.predict.lower(variables, jx_images).compile()
  compile_predict = time.perf_counter() - t0
  t_jx = timed(lambda: predict(variables, jx_images), args.steps, jax.block_until_ready)
  n_jx = float(np.mean(jax.device_get(predict(variables, jx_images).valid)))
  network = jax.jit(lambda v, im: trainer.model.apply(v, im, train=False))
  network = network.lower(variables, jx_images).compile()
  t_jx_net = timed(lambda: network(variables, jx_images), args.steps, jax.block_until_ready)
  results = {"inference": (t_jx, t_tv), "network alone": (t_jx_net, t_tv_net)}
  print(f"\ninference (backbone + head + post-processing), detections/image: ssdjax {n_jx:.0f}, "
        f"torchvision {n_tv:.0f}")
  print(f"  torchvision: {t_tv * 1e3:9.1f} ms/batch  {args.batch_size / t_tv:8.1f} img/s  "
        f"(its transform alone: {t_transform * 1e3:.1f} ms, included)")
  print(f"  ssdjax:      {t_jx * 1e3:9.1f} ms/batch  {args.batch_size / t_jx:8.1f} img/s  "
        f"(compile {compile_predict:.1f} s, excluded)")
  print(f"  ratio ssdjax/torchvision: {t_jx / t_tv:.2f}")
  print(f"  network alone (backbone + head, no transform or post-processing): ssdjax "
        f"{t_jx_net * 1e3:.1f} ms, torchvision {t_tv_net * 1e3:.1f} ms, ratio {t_jx_net / t_tv_net:.2f}")

  if not args.skip_train:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    tv_loss = []

    def tv_step():
      opt.zero_grad(set_to_none=True)
      with autocast():
        losses = model(t_images, targets)
      loss = losses["bbox_regression"] + losses["classification"]
      loss.backward()
      opt.step()
      tv_loss.append(loss.detach())

    t_tv = timed(tv_step, args.steps, tsync)
    t0 = time.perf_counter()
    step = trainer.train_step.lower(state, batch).compile()
    compile_step = time.perf_counter() - t0
    jx_loss = []

    def jx_step():
      nonlocal state
      state, metrics = step(state, batch)  # the old state is donated
      jx_loss.append(metrics["loss"])
      return state, metrics

    t_jx = timed(jx_step, args.steps, jax.block_until_ready)
    results["train step"] = (t_jx, t_tv)
    print(f"\ntrain step (forward + loss + backward + SGD), first loss: ssdjax {float(jx_loss[0]):.3f}, "
          f"torchvision {float(tv_loss[0]):.3f}")
    print(f"  torchvision: {t_tv * 1e3:9.1f} ms/step   {args.batch_size / t_tv:8.1f} img/s")
    print(f"  ssdjax:      {t_jx * 1e3:9.1f} ms/step   {args.batch_size / t_jx:8.1f} img/s  "
          f"(compile {compile_step:.1f} s, excluded)")
    print(f"  ratio ssdjax/torchvision: {t_jx / t_tv:.2f}")

  print("\nsummary (median ms, ssdjax / torchvision = ratio): " + "; ".join(
      f"{k} {j * 1e3:.1f} / {t * 1e3:.1f} = {j / t:.2f}" for k, (j, t) in results.items()))


if __name__ == "__main__":
  main()
