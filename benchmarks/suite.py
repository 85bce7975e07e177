r"""ssdjax against torchvision, side by side and interleaved: the benchmark suite of `make bench`.

  python benchmarks/suite.py                                   # CPU: batch 8, 7 pairs
  python benchmarks/suite.py --write=BENCHMARKS.md             # ... and put the table there
  python benchmarks/suite.py --batch_size=64 --large_batch=256 --dtype=bfloat16   # a GPU

Both sides are SSD300-VGG16 with 91 classes and the same weights: torchvision's ``ssd300_vgg16``
with random weights, converted into ssdjax (``configs/ssd300_coco_torchvision.py``). Every row
times the two implementations alternately (torchvision, ssdjax, torchvision, ...) after warm-up,
so load on a shared machine hits both alike; it reports each side's median, min and max and the
speed-up (torchvision time / ssdjax time) per pair: its median and spread. The load average is
printed before and after: on a loaded machine the figures say little (torch degrades more).

Rows:
* train step: forward, matching, loss, backward, SGD (momentum 0.9, weight decay 5e-4), batch B.
* network forward: backbone and head only, batch B.
* matching + loss: 8 ground-truth boxes per image, hard negative mining, the head outputs given;
  torchvision's per-image matching loop and ``compute_loss``, ssdjax's jitted
  ``matching.batch_targets`` + ``losses.multibox_loss``.
* post-processing: score threshold, per-class top-k and NMS on trained-like scores; the
  classifier's background bias is raised until about 40 (anchor, class) pairs per image score
  above the 0.01 threshold (a trained detector's regime; random weights give thousands).
* inference, batch 1 and the large batch: normalisation, network and post-processing.
* compile: ssdjax's compile time of the train step and of inference (torch runs eagerly).
* peak memory per image, train and inference: in a child process per framework and mode, the
  peak resident memory (CPU; the process's high-water mark reset before the run) or device
  memory (GPU) above what the model and inputs held, over the batch.
* on a GPU, the model FLOPs utilisation of ssdjax's train step and inference: XLA's FLOP count of
  the compiled computation per second over the device's peak (``--peak_tflops``).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's idle threads must not spin
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # pylint: disable=g-import-not-at-top

SIZE = 300
WARMUP = 2
TARGET_CANDIDATES = 40  # (anchor, class) pairs per image above the score threshold
# Dense peak TFLOP/s per device name fragment: (float32, bfloat16). H100/H200 SXM.
PEAK_TFLOPS = {"H100": (67.0, 989.0), "H200": (67.0, 989.0), "A100": (19.5, 312.0)}


def load() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def random_input(batch_size, max_boxes, seed=0, boxes_per_image=8):
  """Images [B, 300, 300, 3] in [0, 255]; gt boxes [B, G, 4] xyxy normalized, labels 1..90, mask."""
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0, 0.6, (batch_size, max_boxes, 2))
  wh = rng.uniform(0.05, 0.4, (batch_size, max_boxes, 2))
  mask = np.broadcast_to(np.arange(max_boxes)[None] < boxes_per_image, (batch_size, max_boxes))
  return (rng.uniform(0, 255, (batch_size, SIZE, SIZE, 3)).astype(np.float32),
          (np.concatenate([xy, xy + wh], -1) * mask[..., None]).astype(np.float32),
          np.where(mask, rng.integers(1, 91, (batch_size, max_boxes)), 0).astype(np.int32),
          mask.copy())


def background_shift(logits: np.ndarray, threshold: float, target: int) -> float:
  """The background-logit shift that leaves about ``target`` (anchor, class >= 1) pairs per image
  with a softmax score above ``threshold``; logits [B, A, C]."""
  logits = logits - logits.max(-1, keepdims=True)
  e = np.exp(logits)

  def count(shift):
    denom = e[..., :1] * np.exp(shift) + e[..., 1:].sum(-1, keepdims=True)
    return float((e[..., 1:] / denom > threshold).sum() / logits.shape[0])

  lo, hi = 0.0, 50.0
  for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if count(mid) > target else (lo, mid)
  return hi


class Row:
  """Interleaved timing of (torchvision, ssdjax) callables: warm-up, then pairs A, B, A, B."""

  def __init__(self, name, tv_fn, jx_fn, tv_sync, jx_sync, pairs, note=""):
    self.name, self.note = name, note
    for _ in range(WARMUP):
      tv_sync(tv_fn())
      jx_sync(jx_fn())
    self.tv, self.jx = [], []
    for _ in range(pairs):
      for fn, sync, out in ((tv_fn, tv_sync, self.tv), (jx_fn, jx_sync, self.jx)):
        t0 = time.perf_counter()
        sync(fn())
        out.append(time.perf_counter() - t0)
    ratios = sorted(t / j for t, j in zip(self.tv, self.jx))
    self.speedup = (statistics.median(ratios), ratios[0], ratios[-1])
    print(f"  {name}: torchvision {fmt(self.tv)}, ssdjax {fmt(self.jx)}, speed-up "
          f"{self.speedup[0]:.2f}x [{self.speedup[1]:.2f}, {self.speedup[2]:.2f}]", flush=True)

  def markdown(self, batch) -> str:
    per = lambda ts: f"{batch / statistics.median(ts):,.1f}" if batch else ""
    m, lo, hi = self.speedup
    return (f"| {self.name} | {fmt(self.tv)} | {fmt(self.jx)} | "
            f"{per(self.tv)} / {per(self.jx)} | **{m:.2f}x** [{lo:.2f}, {hi:.2f}] | {self.note} |")


def fmt(ts) -> str:
  ms = lambda t: f"{t * 1e3:,.1f}" if t < 10 else f"{t * 1e3:,.0f}"
  return f"{ms(statistics.median(ts))} ms ({ms(min(ts))}-{ms(max(ts))})"


# ----------------------------------------------------------------------------------------------
# The two implementations.


def build(args, device):
  """torchvision model, ssdjax trainer and state, the same weights, and shared inputs."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision.models.detection import ssd300_vgg16  # pylint: disable=g-import-not-at-top

  from ssdjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from ssdjax import convert, train  # pylint: disable=g-import-not-at-top

  tdev = torch.device(device)
  config = config_lib.load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                             "configs", "ssd300_coco_torchvision.py"))
  config.model.compute_dtype = args.dtype
  config.train.batch_size = config.eval.batch_size = args.batch_size
  config.optimizer.learning_rate, config.optimizer.momentum = 1e-3, 0.9
  config.optimizer.weight_decay, config.optimizer.warmup_steps = 5e-4, 0
  torch.manual_seed(0)
  model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=91).to(tdev).eval()
  jax_device = jax.devices("gpu")[0] if device == "cuda" else jax.devices("cpu")[0]
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=[jax_device])
  trainer = train.Trainer(config, mesh=mesh)

  # Trained-like scores: raise the background bias of the classifier until about
  # TARGET_CANDIDATES pairs per image pass the score threshold (same weights on both sides).
  images, gt_boxes, gt_labels, gt_mask = random_input(args.batch_size, config.data.max_boxes)
  with torch.no_grad():
    t_images = [torch.from_numpy(im.transpose(2, 0, 1) / 255).float().to(tdev) for im in images]
    batch_t, _ = model.transform(t_images)
    feats = list(model.backbone(batch_t.tensors).values())
    logits = model.head(feats)["cls_logits"].float().cpu().numpy()
    shift = background_shift(logits, config.postprocess.score_threshold, TARGET_CANDIDATES)
    for level in model.head.classification_head.module_list:
      level.bias.view(-1, 91)[:, 0] += shift
  state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
  state = trainer.init_state(0)
  state["params"] = jax.device_put(convert.from_torchvision(state_dict), trainer.replicated)
  return dict(torch=torch, jax=jax, model=model, tdev=tdev, config=config, trainer=trainer,
              state=state, shift=shift, inputs=(images, gt_boxes, gt_labels, gt_mask))


def rows(args, device, b) -> tuple[list[Row], dict]:
  torch, jax, model, tdev = b["torch"], b["jax"], b["model"], b["tdev"]
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from torchvision.models.detection import _utils as det_utils  # pylint: disable=g-import-not-at-top
  from torchvision.ops import boxes as box_ops  # pylint: disable=g-import-not-at-top

  from ssdjax import losses, matching, postprocess  # pylint: disable=g-import-not-at-top

  config, trainer = b["config"], b["trainer"]
  images, gt_boxes, gt_labels, gt_mask = b["inputs"]
  bsz, pairs = args.batch_size, args.pairs
  cuda = device == "cuda"
  tsync = lambda _: torch.cuda.synchronize() if cuda else None
  jsync = jax.block_until_ready
  bf16 = args.dtype == "bfloat16"
  autocast = lambda: torch.autocast(tdev.type, dtype=torch.bfloat16, enabled=bf16)
  mean = np.float32(config.data.mean_rgb)
  std = np.float32(config.data.std_rgb)
  info = {}

  def t_list(ims):
    return [torch.from_numpy(im.transpose(2, 0, 1) / 255).float().to(tdev) for im in ims]

  t_images = t_list(images)
  targets = [{"boxes": torch.from_numpy(bx[m] * SIZE).to(tdev),
              "labels": torch.from_numpy(lb[m]).long().to(tdev)}
             for bx, lb, m in zip(gt_boxes, gt_labels, gt_mask)]
  norm = (images - mean) / std
  batch = trainer.to_device(dict(images=norm, gt_boxes=gt_boxes, gt_labels=gt_labels, gt_mask=gt_mask))
  variables = trainer.variables(b["state"])
  out = []

  # --- network forward
  x_t = torch.from_numpy(norm.transpose(0, 3, 1, 2).copy()).to(tdev)
  with torch.no_grad():
    head_t = model.head(list(model.backbone(x_t).values()))
    batch_t, _ = model.transform(t_images)
    anchors_t = model.anchor_generator(batch_t, list(model.backbone(batch_t.tensors).values()))

  def tv_net():
    with torch.no_grad(), autocast():
      return model.head(list(model.backbone(x_t).values()))

  network = jax.jit(lambda v, im: trainer.model.apply(v, im, train=False))
  network = network.lower(variables, batch["images"]).compile()
  out.append(Row("network forward", tv_net, lambda: network(variables, batch["images"]), tsync,
                 jsync, pairs))

  # --- matching + loss on given head outputs (float32 on both sides)
  rng = np.random.default_rng(1)
  loc_np = rng.normal(0, 1, head_t["bbox_regression"].shape).astype(np.float32)
  cls_np = rng.normal(0, 1, head_t["cls_logits"].shape).astype(np.float32)
  head_given = {"bbox_regression": torch.from_numpy(loc_np).to(tdev),
                "cls_logits": torch.from_numpy(cls_np).to(tdev)}

  def tv_loss():
    with torch.no_grad():
      matched = [model.proposal_matcher(box_ops.box_iou(t["boxes"], a))
                 for t, a in zip(targets, anchors_t)]
      losses_t = model.compute_loss(targets, head_given, anchors_t, matched)
      return losses_t["bbox_regression"] + losses_t["classification"]

  anchors_j = jnp.asarray(trainer.anchors)
  match_kwargs = matching.from_config(config)
  loss_kwargs = dict(config.loss.kwargs)

  @jax.jit
  def jx_loss(loc, logits, gtb, gtl, gtm):
    loc_t, cls_t = matching.batch_targets(gtb, gtl, gtm, anchors_j, **match_kwargs)
    return losses.multibox_loss(loc, logits, loc_t, cls_t, **loss_kwargs)[0]

  largs = [jax.device_put(a) for a in (loc_np, cls_np, gt_boxes, gt_labels, gt_mask)]
  info["loss torchvision/ssdjax"] = (float(tv_loss()), float(jx_loss(*largs)))
  out.append(Row("matching + loss (8 gt/image, hard negative mining)", tv_loss,
                 lambda: jx_loss(*largs), tsync, jsync, pairs))

  # --- post-processing on trained-like scores
  loc_net = head_t["bbox_regression"].float()
  cls_net = head_t["cls_logits"].float()
  sizes = [(SIZE, SIZE)] * bsz

  def tv_post():
    with torch.no_grad():
      return model.postprocess_detections({"bbox_regression": loc_net, "cls_logits": cls_net},
                                          anchors_t, sizes)

  post_kwargs = postprocess.from_config(config)
  jx_post = jax.jit(lambda loc, logits: postprocess.detect(loc, logits, anchors_j, **post_kwargs))
  loc_j, cls_j = jax.device_put(loc_net.cpu().numpy()), jax.device_put(cls_net.cpu().numpy())
  probs = torch.softmax(cls_net, -1)[..., 1:]
  info["candidates per image"] = float((probs > config.postprocess.score_threshold).sum() / bsz)
  info["detections per image torchvision/ssdjax"] = (
      float(np.mean([len(d["scores"]) for d in tv_post()])),
      float(np.mean(jax.device_get(jx_post(loc_j, cls_j).valid))))
  out.append(Row(f"post-processing (~{info['candidates per image']:.0f} candidates/image)", tv_post,
                 lambda: jx_post(loc_j, cls_j), tsync, jsync, pairs))

  # --- inference end to end: normalisation, network, post-processing
  predict = jax.jit(lambda v, im: trainer.predict(v, (im - mean) / std))
  compile_times = {}
  for n in (1, args.large_batch):
    ims = np.concatenate([images] * (-(-n // bsz)))[:n]
    tims = t_list(ims)
    jims = jax.device_put(ims)
    t0 = time.perf_counter()
    pred = predict.lower(variables, jims).compile()
    compile_times[f"inference, batch {n}"] = time.perf_counter() - t0
    if n == args.large_batch:
      info["inference_flops"] = _flops(pred)

    def tv_infer(tims=tims):
      with torch.no_grad(), autocast():
        return model(tims)

    out.append(Row(f"inference, batch {n}", tv_infer, lambda pred=pred, jims=jims: pred(variables, jims),
                   tsync, jsync, max(3, pairs // 2) if n > bsz else pairs))

  # --- train step
  model.train()
  opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

  def tv_step():
    opt.zero_grad(set_to_none=True)
    with autocast():
      losses_t = model(t_images, targets)
    loss = losses_t["bbox_regression"] + losses_t["classification"]
    loss.backward()
    opt.step()
    return loss

  t0 = time.perf_counter()
  step = trainer.train_step.lower(b["state"], batch).compile()
  compile_times["train step"] = time.perf_counter() - t0
  info["train_flops"] = _flops(step)
  state = [b["state"]]

  def jx_step():
    state[0], metrics = step(state[0], batch)
    return metrics["loss"]

  out.append(Row("train step", tv_step, jx_step, tsync, jsync, pairs))
  model.eval()
  info["compile_s"] = compile_times
  return out, info


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


# ----------------------------------------------------------------------------------------------
# Peak memory, one child process per framework and mode.


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
  with open("/proc/self/status") as f:
    return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def memory_child(args, device, framework, mode) -> float:
  """Peak memory above the ready state during one call, in bytes per image (prints it too)."""
  b = build(args, device)
  torch, jax = b["torch"], b["jax"]
  images, gt_boxes, gt_labels, gt_mask = b["inputs"]
  cuda = device == "cuda"
  if framework == "torchvision":
    model = b["model"]
    t_images = [torch.from_numpy(im.transpose(2, 0, 1) / 255).float().to(b["tdev"]) for im in images]
    if mode == "train":
      model.train()
      targets = [{"boxes": torch.from_numpy(bx[m] * SIZE).to(b["tdev"]),
                  "labels": torch.from_numpy(lb[m]).long().to(b["tdev"])}
                 for bx, lb, m in zip(gt_boxes, gt_labels, gt_mask)]
      opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

      def call():
        opt.zero_grad(set_to_none=False)
        losses_t = model(t_images, targets)
        (losses_t["bbox_regression"] + losses_t["classification"]).backward()
        opt.step()
    else:
      def call():
        with torch.no_grad():
          model(t_images)
    call()  # warm-up: the optimizer state and allocator caches exist afterwards
  else:
    trainer = b["trainer"]
    config = b["config"]
    norm = (images - np.float32(config.data.mean_rgb)) / np.float32(config.data.std_rgb)
    batch = trainer.to_device(dict(images=norm, gt_boxes=gt_boxes, gt_labels=gt_labels,
                                   gt_mask=gt_mask))
    state = [b["state"]]
    if mode == "train":
      step = trainer.train_step.lower(state[0], batch).compile()

      def call():
        state[0], metrics = step(state[0], batch)
        jax.block_until_ready(metrics)
    else:
      predict = trainer.predict.lower(trainer.variables(state[0]), batch["images"]).compile()

      def call():
        jax.block_until_ready(predict(trainer.variables(state[0]), batch["images"]))
    call()
  if cuda:
    if framework == "torchvision":
      torch.cuda.synchronize()
      torch.cuda.reset_peak_memory_stats()
      before = torch.cuda.memory_allocated()
      call()
      torch.cuda.synchronize()
      peak = torch.cuda.max_memory_allocated() - before
    else:
      stats = jax.devices("gpu")[0].memory_stats()
      before = stats["bytes_in_use"]
      call()
      peak = jax.devices("gpu")[0].memory_stats()["peak_bytes_in_use"] - before
  else:
    # Freed heap memory that malloc kept from the warm-up call would hide the call's working set.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets the high-water mark VmHWM to the current RSS
    call()
    peak = _hwm_bytes() - before
  per_image = max(peak, 0) / args.batch_size
  print(json.dumps({"per_image_bytes": per_image}))
  return per_image


def _less_or_more(tv: float, jx: float) -> str:
  """ssdjax's memory against torchvision's, as 'N.NNx less' or 'N.NNx more'."""
  return f"{tv / jx:.2f}x less" if jx <= tv else f"{jx / tv:.2f}x more"


def memory_rows(args, device) -> list[str]:
  out = []
  for mode in ("train", "inference"):
    got = {}
    for framework in ("torchvision", "ssdjax"):
      cmd = [sys.executable, os.path.abspath(__file__), f"--_memory={framework}:{mode}",
             f"--batch_size={args.batch_size}", f"--dtype={args.dtype}", f"--device={device}"]
      res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
      line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
      got[framework] = json.loads(line[-1])["per_image_bytes"] if line else float("nan")
      if not line:
        print(res.stderr[-2000:], file=sys.stderr)
    tv, jx = got["torchvision"], got["ssdjax"]
    print(f"  peak memory per image, {mode}: torchvision {tv / 2**20:.0f} MiB, ssdjax {jx / 2**20:.0f} MiB")
    out.append(f"| peak memory per image, {mode} (batch {args.batch_size}) | {tv / 2**20:,.0f} MiB | "
               f"{jx / 2**20:,.0f} MiB | | {_less_or_more(tv, jx)} | {'device' if device == 'cuda' else 'resident'} "
               "memory above the ready state, one call |")
  return out


# ----------------------------------------------------------------------------------------------


def write_section(path: str, key: str, text: str) -> None:
  """Replaces (or adds at the top, under the title) the section between the suite's markers."""
  start, end = f"<!-- suite:{key} -->", f"<!-- /suite:{key} -->"
  block = f"{start}\n{text.rstrip()}\n{end}\n"
  doc = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
  if start in doc and end in doc:
    doc = doc[:doc.index(start)] + block + doc[doc.index(end) + len(end) + 1:]
  else:
    head, _, rest = doc.partition("\n\n")
    doc = head + "\n\n" + block + "\n" + rest
  with open(path, "w") as f:
    f.write(doc)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--large_batch", type=int, default=32)
  parser.add_argument("--pairs", type=int, default=7, help="timed (torchvision, ssdjax) pairs per row")
  parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="the device's dense peak for MFU (default: by GPU name)")
  parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory rows")
  parser.add_argument("--write", default=None, help="put the table into this markdown file")
  parser.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.device == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")  # both frameworks share a GPU
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top

  gpus = [d for d in jax.devices() if d.platform == "gpu"]
  device = args.device
  if device == "auto":
    device = "cuda" if torch.cuda.is_available() and gpus else "cpu"
  torch.set_num_threads(os.cpu_count())
  torch.backends.cudnn.benchmark = True
  if args._memory:
    framework, mode = args._memory.split(":")
    memory_child(args, device, framework, mode)
    return

  gpu_name = torch.cuda.get_device_name(0) if device == "cuda" else ""
  machine = (f"{gpu_name} + " if gpu_name else "") + (
      f"{platform.machine()}, {os.cpu_count()} CPU cores")
  versions = (f"python {platform.python_version()}, jax {jax.__version__}, torch {torch.__version__}, "
              f"torchvision {torchvision.__version__}")
  load_before = load()
  print(f"{machine}; {versions}\nload average before: {load_before}\n"
        f"batch {args.batch_size}, large batch {args.large_batch}, {args.dtype}, "
        f"{args.pairs} interleaved pairs after {WARMUP} warm-up runs each", flush=True)
  b = build(args, device)
  timed, info = rows(args, device, b)
  mem = [] if args.no_memory else memory_rows(args, device)
  load_after = load()
  print(f"load average after: {load_after}")

  peak = args.peak_tflops
  if peak is None and gpu_name:
    peak = next((p[args.dtype == "bfloat16"] for k, p in PEAK_TFLOPS.items() if k in gpu_name), None)
  by_name = {r.name: r for r in timed}
  lines = [f"## {datetime.date.today()} — `make bench` ({device}, {args.dtype}): {machine}",
           "",
           f"{versions}. Batch {args.batch_size} (large batch {args.large_batch}), "
           f"{args.pairs} interleaved pairs (torchvision, ssdjax) per row after {WARMUP} warm-up "
           f"runs each (the large batch {max(3, args.pairs // 2)}); load average before "
           f"{load_before}, after {load_after}. Times: median (min-max). Speed-up: torchvision "
           "time / ssdjax time per pair, median [min, max]. `python benchmarks/suite.py`"
           + (f" --dtype={args.dtype}" if args.dtype != "float32" else "") + ".",
           "",
           "| row | torchvision | ssdjax | images/s torchvision / ssdjax | speed-up | note |",
           "|---|---|---|---|---|---|"]
  for r in timed:
    n = 1 if r.name == "inference, batch 1" else (args.large_batch if r.name.startswith("inference")
                                                   else args.batch_size)
    lines.append(r.markdown(n))
  lines += mem
  comp = info["compile_s"]
  lines.append("| compile (ssdjax only) | | " + ", ".join(f"{k} {v:.1f} s" for k, v in comp.items())
               + " | | | torch runs eagerly |")
  extra = [f"Trained-like scores: the classifier's background bias raised by {b['shift']:.2f}, "
           f"{info['candidates per image']:.0f} candidate (anchor, class) pairs per image; "
           "detections per image torchvision {:.1f}, ssdjax {:.1f}. Loss on the same inputs: "
           "torchvision {:.4f}, ssdjax {:.4f}.".format(*info["detections per image torchvision/ssdjax"],
                                                        *info["loss torchvision/ssdjax"])]
  if peak:
    step_s = statistics.median(by_name["train step"].jx)
    inf_s = statistics.median(by_name[f"inference, batch {args.large_batch}"].jx)
    extra.append(f"Model FLOPs utilisation of ssdjax (XLA's FLOP count / time / {peak:g} TFLOP/s "
                 f"peak): train step {info['train_flops'] / step_s / peak / 1e12:.1%} "
                 f"({info['train_flops'] / 1e12:.2f} TFLOP per step), inference at batch "
                 f"{args.large_batch} {info['inference_flops'] / inf_s / peak / 1e12:.1%}.")
  text = "\n".join(lines) + "\n\n" + "\n\n".join(extra) + "\n"
  print("\n" + text)
  if args.write:
    write_section(args.write, f"{device}-{args.dtype}", text)
    print(f"wrote the table into {args.write}")


if __name__ == "__main__":
  main()
