"""Training and evaluation: one sharded loop for 1 CPU, N GPUs or a TPU slice.

``train_and_evaluate(config, workdir)`` reads top to bottom: mesh -> input -> model and optimizer ->
shardings and state -> train step -> checkpoints -> evaluation -> loop. The state is a plain dict
``{params, batch_stats, opt, step, nonfinite, first_nonfinite}``, replicated over a 1-D ``data`` mesh
axis; batches are split over that axis. The train step is jitted once with donated state.

Every workdir holds what is needed to reproduce a number: ``config.json``, ``anchors.npy``,
``version.json`` (package version and git commit), ``metrics.jsonl``, TensorBoard events and orbax
checkpoints (state + input iterator position) under ``checkpoints/``.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import logging as std_logging
import os
import signal
import subprocess
import threading
import time
from typing import Any, Callable

from absl import logging
import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

import ssdjax
from ssdjax import anchors as anchors_lib
from ssdjax import augment
from ssdjax import checkpoints
from ssdjax import config as config_lib
from ssdjax import distributed
from ssdjax import evaluation
from ssdjax import freeze
from ssdjax import losses
from ssdjax import matching
from ssdjax import models
from ssdjax.models import conv as conv_lib
from ssdjax import postprocess
from ssdjax.errors import UserError

# ----------------------------------------------------------------------------------------------
# Configuration checks and workdir records.
# ----------------------------------------------------------------------------------------------
def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Stops a bad config before anything is compiled, naming the field and the fix."""
  config_lib.validate(config)
  config_lib.num_classes(config)  # resolved class names
  for field in ("train.batch_size", "eval.batch_size"):
    section, name = field.split(".")
    value = config[section][name]
    if value <= 0 or value % num_devices:
      raise UserError(f"config.{field}={value} must be a positive multiple of the device count "
                      f"({num_devices}): the batch is split evenly over the 'data' mesh axis")


def prepare_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """What a run trains with and its workdir records: ``config`` validated, its class names and
  category ids read from the data (``ssdjax.data.resolve_classes``), and outside parts named by
  import path (``ssdjax.config.parts_as_recorded``). Reads annotations, writes nothing."""
  from ssdjax import data  # pylint: disable=g-import-not-at-top

  config_lib.validate(config)
  config = config_lib.parts_as_recorded(data.resolve_classes(config))
  config.augment.on_device = data.augment_on_device(config)  # recorded as resolved
  return config


def _git_commit() -> str | None:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                         timeout=5, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return None


def write_run_records(config: ml_collections.ConfigDict, workdir: str, anchors: np.ndarray) -> None:
  """Saves the exact config, anchors and code version next to the checkpoints."""
  os.makedirs(workdir, exist_ok=True)
  # A changed config was checked (checkpoints.check_resume) and recorded before this.
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  np.save(os.path.join(workdir, "anchors.npy"), anchors)
  with open(os.path.join(workdir, "version.json"), "w") as f:
    json.dump({"ssdjax": ssdjax.__version__, "git_commit": _git_commit(), "jax": jax.__version__,
               "devices": [str(d) for d in jax.devices()], "processes": jax.process_count()},
              f, indent=2)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (``workdir/config.json``): resolved, with its class names.

  Fields added to the framework after the run was written take their defaults
  (``ssdjax.config.defaults()``, the single source of defaults), so older workdirs keep loading.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"{path} not found: --workdir must be a directory written by ssdjax.main")
  with open(path) as f:
    raw = json.load(f)
  return config_lib.from_saved(raw)


# ----------------------------------------------------------------------------------------------
# Optimizer.
# ----------------------------------------------------------------------------------------------
def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Learning-rate schedule: linear warmup, then piecewise-constant or cosine decay."""
  opt = config.optimizer
  lr, warmup, total = opt.learning_rate, opt.warmup_steps, config.train.num_steps
  if opt.schedule == "piecewise":
    # join_schedules restarts the count at the warmup boundary; boundaries are absolute steps.
    main = optax.piecewise_constant_schedule(
        lr, {int(b) - warmup: opt.decay_factor for b in opt.boundaries if b > warmup})
  elif opt.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps=max(total - warmup, 1))
  else:
    raise UserError(f"config.optimizer.schedule={opt.schedule!r}; valid: ['cosine', 'piecewise']")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _decay_mask(params, decay_biases: bool = False):
  # Caffe SSD decays weights only (decay_mult 0 on biases); norms and the L2Norm scale are vectors.
  # torch.optim.SGD(weight_decay=...) (torchvision's recipe) decays every parameter.
  return jax.tree.map(lambda p: decay_biases or p.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """SGD with momentum and L2 weight decay (the paper), or Adam / AdamW."""
  opt = config.optimizer
  schedule = make_schedule(config)
  decay_mask = functools.partial(_decay_mask, decay_biases=bool(opt.decay_biases))
  parts = []
  if opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  if opt.name == "sgd":
    if opt.weight_decay:
      parts.append(optax.add_decayed_weights(opt.weight_decay, mask=decay_mask))
    parts.append(optax.sgd(schedule, momentum=opt.momentum or None))
  elif opt.name == "adam":
    if opt.weight_decay:
      parts.append(optax.add_decayed_weights(opt.weight_decay, mask=decay_mask))
    parts.append(optax.adam(schedule))
  elif opt.name == "adamw":
    parts.append(optax.adamw(schedule, weight_decay=opt.weight_decay, mask=decay_mask))
  else:
    raise UserError(f"config.optimizer.name={opt.name!r}; valid: ['adam', 'adamw', 'sgd']")
  return optax.chain(*parts)


# ----------------------------------------------------------------------------------------------
# State, steps and shardings.
# ----------------------------------------------------------------------------------------------
def make_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device; the batch is split over its 'data' axis."""
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _variables(state) -> dict:
  variables = {"params": state["params"]}
  if state["batch_stats"]:
    variables["batch_stats"] = state["batch_stats"]
  return variables


def make_init_fn(config, model, tx):
  """(rng) -> a fresh state dict."""
  size = config.image_size

  def init(rng):
    variables = model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32), train=False)
    params = variables["params"]
    return {
        "params": params,
        "batch_stats": variables.get("batch_stats", {}),
        "opt": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        # Steps whose loss or gradients were not finite are skipped (state unchanged) and counted.
        "nonfinite": jnp.zeros((), jnp.int32),
        "first_nonfinite": jnp.full((), -1, jnp.int32),
    }

  return init


# The augmentation keys are a stream of their own, apart from the initialisation key(seed).
_AUGMENT_STREAM = 1


def augment_key(seed: int, step) -> jax.Array:
  """The key of step ``step``'s on-device augmentation; image i of the batch uses fold_in(key, i)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _AUGMENT_STREAM), step)


def make_train_step(config, model, tx, anchors, *, augment_on_device: bool = False):
  """(state, batch) -> (state, metrics): forward, matching, loss, backward, optimizer update.

  With ``augment_on_device`` the batch holds uint8 canvases (``ssdjax.data`` module docstring)
  and the step first augments them with ``ssdjax.augment.augment_batch``, its randomness from
  (config.seed, step, image index), so a resumed run sees the same batches.
  """
  anchors = jnp.asarray(anchors)  # [A, 4] cxcywh
  match_kwargs = matching.from_config(config)
  loss_fn = losses.from_config(config)
  schedule = make_schedule(config)
  switches = {k: config.augment[k] for k in augment.SWITCHES}
  tap_grads = conv_lib.resolve(config.train.conv_weight_grad)

  def augmented(step_index, batch):
    return augment.augment_batch(
        augment_key(config.seed, step_index), batch["images"], batch["valid_hw"],
        batch["gt_boxes"], batch["gt_labels"], batch["gt_mask"], image_size=config.image_size,
        mean_rgb=tuple(config.data.mean_rgb), std_rgb=tuple(config.data.std_rgb), **switches)

  def step(state, batch):
    if augment_on_device:
      batch = augmented(state["step"], batch)
    gt = (batch["gt_boxes"], batch["gt_labels"], batch["gt_mask"])
    loc_t, cls_t = matching.batch_targets(*gt, anchors, **match_kwargs)  # [B, A, 4], [B, A]

    def objective(params):
      variables = dict(_variables(state), params=params)
      mutable = ["batch_stats"] if state["batch_stats"] else []
      with freeze.frozen_batchnorm(config, params), conv_lib.tap_weight_grad(tap_grads):
        (loc, logits), new_vars = model.apply(variables, batch["images"], train=True,
                                              mutable=mutable)
      loss, aux = loss_fn(loc, logits, loc_t, cls_t)
      return loss, (aux, new_vars)

    (loss, (aux, new_vars)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    batch_stats = new_vars.get("batch_stats", {})
    grad_norm = optax.tree.norm(grads)
    # A finite loss and gradient can still overflow in the update (a huge learning rate), so the
    # result is checked too. A non-finite step leaves params, optimizer and batch stats as they
    # were, so nothing non-finite can reach a checkpoint; the host acts on the counter.
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & checkpoints.tree_finite((params, opt, batch_stats)))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {
        "params": keep(params, state["params"]),
        "batch_stats": keep(batch_stats, state["batch_stats"]),
        "opt": keep(opt, state["opt"]),
        "step": state["step"] + 1,
        "nonfinite": state["nonfinite"] + (~finite).astype(jnp.int32),
        "first_nonfinite": jnp.where((state["first_nonfinite"] < 0) & ~finite, state["step"],
                                     state["first_nonfinite"]),
    }
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
               **{f"loss_{k}": v for k, v in aux.items()}}
    return new_state, metrics

  return step


def make_predict_fn(config, model, anchors):
  """(variables, images [B,S,S,3]) -> postprocess.Detections, jit-able, fixed shapes."""
  anchors = jnp.asarray(anchors)
  post_kwargs = postprocess.from_config(config)

  def predict(variables, images):
    loc, logits = model.apply(variables, images, train=False)
    return postprocess.detect(loc, logits, anchors, **post_kwargs)

  return predict


_TRAINER_IDS = itertools.count()


class Trainer:
  """Holds the compiled functions and shardings of one experiment (built once, used by the loop)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
    self.config = config
    self.mesh = mesh or make_mesh()
    validate_config(config, self.mesh.size)
    self.anchors = anchors_lib.from_config(config)
    self.model = models.from_config(config)
    self.tx = make_optimizer(config)
    self.replicated = jax.NamedSharding(self.mesh, jax.P())
    self.data_sharding = jax.NamedSharding(self.mesh, jax.P("data"))

    if freeze.enabled(config):  # zero updates for the frozen trunk stages (ssdjax.freeze)
      shapes = jax.eval_shape(make_init_fn(config, self.model, optax.identity()), jax.random.key(0))
      self.tx = freeze.wrap(self.tx, config, shapes["params"], shapes["batch_stats"])
    init = make_init_fn(config, self.model, self.tx)
    self.abstract_state = jax.eval_shape(init, jax.random.key(0))
    self.state_sharding = jax.tree.map(lambda _: self.replicated, self.abstract_state)
    self._init = jax.jit(init, out_shardings=self.state_sharding)
    # One compilation for the whole run; a retrace (changed shapes or dtypes) fails loudly. chex
    # counts traces per function name and source, so each Trainer names its step apart: a second
    # Trainer in the same process (an ablation loop, a notebook) has a budget of its own.
    from ssdjax import data  # pylint: disable=g-import-not-at-top
    self.augment_on_device = data.augment_on_device(config)
    step = make_train_step(config, self.model, self.tx, self.anchors,
                           augment_on_device=self.augment_on_device)
    step.__name__ = f"train_step_{next(_TRAINER_IDS)}"
    step = chex.assert_max_traces(step, n=1)
    self.train_step = jax.jit(step, in_shardings=(self.state_sharding, self.data_sharding),
                              out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)
    self.predict = jax.jit(make_predict_fn(config, self.model, self.anchors),
                           in_shardings=(self.replicated, self.data_sharding),
                           out_shardings=self.data_sharding)

  def init_state(self, seed: int):
    """A fresh state; with ``config.model.pretrained`` its backbone trunk comes from that file."""
    state = self._init(jax.random.key(seed))
    if self.config.model.pretrained:
      from ssdjax import pretrained  # pylint: disable=g-import-not-at-top
      converted = pretrained.backbone_variables(self.config, state)
      filled, count = pretrained.fill(jax.device_get(
          {"params": state["params"], "batch_stats": state["batch_stats"]}), converted)
      state = dict(state, params=filled["params"], batch_stats=filled["batch_stats"])
      state = jax.device_put(state, self.state_sharding)
      logging.info("backbone %s: %d tensors from %s; the extra levels and the head keep their "
                   "initialisation", self.config.model.backbone, count, self.config.model.pretrained)
    return state

  def shard(self, array) -> jax.Array:
    """A process-local numpy array -> one global array split over 'data' on its first axis."""
    return jax.make_array_from_process_local_data(self.data_sharding, np.asarray(array))

  def to_device(self, batch: dict) -> dict:
    """Process-local numpy batch -> global arrays sharded over 'data'."""
    return {k: self.shard(v) for k, v in batch.items()}

  def local_rows(self, tree):
    """Global arrays split over 'data' -> this process's rows as NumPy (``to_device`` undone)."""
    if jax.process_count() == 1:
      return jax.device_get(tree)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    local = multihost_utils.global_array_to_host_local_array(tree, self.mesh, jax.P("data"))
    return jax.tree.map(np.asarray, local)

  def restore_target(self):
    """The state's shapes, dtypes and shardings: what orbax restores into."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.state_sharding)

  def variables(self, state) -> dict:
    return _variables(state)


# ----------------------------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------------------------
def check_nonfinite(state, config, where: str) -> int:
  """The number of skipped (non-finite) steps so far; raises when the run must stop.

  ``train.on_nonfinite="stop"`` stops at the first such step, ``"skip"`` once more than
  ``train.max_skipped_steps`` were skipped. The state never holds their updates.
  """
  n = int(jax.device_get(state["nonfinite"]))
  limit = 0 if config.train.on_nonfinite == "stop" else config.train.max_skipped_steps
  if n > limit:
    first = int(jax.device_get(state["first_nonfinite"])) + 1
    raise FloatingPointError(
        f"{where}: step {first} had a NaN/inf loss, gradient or update ({n} such step(s) in "
        f"all, config.train.on_nonfinite={config.train.on_nonfinite!r}, max_skipped_steps="
        f"{config.train.max_skipped_steps}); those updates were not applied and nothing "
        "non-finite was checkpointed. Lower config.optimizer.learning_rate, set "
        "config.optimizer.warmup_steps or config.optimizer.grad_clip_norm, or check the data.")
  return n


def restore_for_inference(workdir: str, step: int | None = None, *, config=None):
  """(config, trainer, variables, step) from a workdir's latest (or given) checkpoint.

  ``config`` defaults to the workdir's own (``load_config``); its model must be the same.
  """
  config = load_config(workdir) if config is None else config
  trainer = Trainer(config, mesh=make_mesh())
  mngr = checkpoints.manager(workdir, config.train.keep_checkpoints, read_only=True)
  try:
    if not mngr.all_steps():
      raise UserError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    if step is not None and step not in mngr.all_steps():
      raise UserError(f"no checkpoint of step {step} in {os.path.join(workdir, 'checkpoints')}; "
                      f"there are steps {list(mngr.all_steps())}")
    args = ocp.args.Composite(state=ocp.args.StandardRestore(trainer.restore_target()))
    # Read-only: a damaged checkpoint is reported and skipped, not moved.
    restored, step = checkpoints.restore_newest_good(
        mngr, lambda s: mngr.restore(s, args=args), move_bad=False, step=step)
    if restored is None:
      raise UserError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')} is intact")
  finally:
    mngr.close()
  return config, trainer, trainer.variables(restored["state"]), step


# Fields a later evaluation may change: where the data is and how it is scored, not the model.
_EVAL_OVERRIDABLE = ("eval.", "data.data_dir", "data.eval", "data.num_workers", "data.bad_records",
                     "data.coco_json.", "postprocess.")


def evaluate_workdir(workdir: str, overrides=(), step: int | None = None) -> dict[str, float]:
  """Evaluates a workdir's latest (or given) checkpoint with the config it was trained with.

  ``overrides`` (``"field=value"``) may change the eval split and scoring (``eval.*``,
  ``postprocess.*``, ``data.data_dir``, ``data.eval``, ...), not the model; the eval data's
  classes are checked against the recorded ones.
  """
  from ssdjax import data  # pylint: disable=g-import-not-at-top

  bad = [o for o in overrides if not o.split("=", 1)[0].startswith(_EVAL_OVERRIDABLE)]
  if bad:
    raise UserError(f"--mode=eval cannot change {bad[0].split('=', 1)[0]}: the model is the "
                    f"workdir's; fields that may change: {', '.join(_EVAL_OVERRIDABLE)}")
  config = load_config(workdir)
  config_lib.apply_overrides(config, list(overrides))
  config_lib.validate(config)
  if config.eval.metrics:
    data.resolve_classes(config, eval_only=True)  # the eval data must have the classes the model was trained on
  _, trainer, variables, _ = restore_for_inference(workdir, step, config=config)
  metrics, _ = evaluate(trainer, variables)
  return metrics


# ----------------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------------
def evaluate(trainer: Trainer, variables) -> tuple[dict, list]:
  """Runs detection over the eval split; returns (metrics, detection records).

  The split is ``config.data.eval`` cut to ``config.eval.max_images`` by the input pipeline, which
  gives the ground truth and the batches for the same images. With several processes each one
  detects on its own part of the split (``ssdjax.data.make_eval_batches``); the detections are
  gathered in every process and scored there, each image once, so every process returns the
  metrics one process would.
  """
  gt, dets = detect_eval_split(trainer, variables)
  return score(trainer.config, gt, dets), dets


def score(config: ml_collections.ConfigDict, gt: list, dets: list) -> dict[str, float]:
  """The ``config.eval.metrics`` of detections ``dets`` against ground truth ``gt`` (host only)."""
  if not config.eval.metrics:
    return {}
  return evaluation.evaluate(gt, dets, tuple(config.class_names),
                             metrics=tuple(config.eval.metrics),
                             backend=config.eval.coco_backend)


def detect_eval_split(trainer: Trainer, variables) -> tuple[list, list]:
  """(ground truth, detection records) of the eval split: the device part of :func:`evaluate`."""
  from ssdjax import data  # the input pipeline is only needed by the loop and the CLIs

  config = trainer.config
  if not config.eval.metrics:
    return [], []
  gt = data.eval_ground_truth(config)
  position = {g["image_id"]: i for i, g in enumerate(gt)}
  local = []  # per batch: this process's rows, padding at position -1
  for batch in data.make_eval_batches(config, batch_size=config.eval.batch_size,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count()):
    images = trainer.shard(batch["images"])
    distributed.compile_together(trainer.predict, variables, images)
    out = trainer.local_rows(trainer.predict(variables, images))
    where = np.array([position[int(i)] if ok else -1
                      for i, ok in zip(batch["image_id"], batch["valid"])], np.int32)
    local.append({"position": where, "valid": np.asarray(out.valid, np.int32),
                  "boxes": np.asarray(out.boxes), "scores": np.asarray(out.scores),
                  "classes": np.asarray(out.classes, np.int32)})
  rows = {k: np.concatenate([b[k] for b in local]) for k in local[0]} if local else {}
  if jax.process_count() > 1 and rows:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    rows = {k: np.asarray(v).reshape((-1,) + v.shape[2:])  # [processes * M, ...]
            for k, v in multihost_utils.process_allgather(rows).items()}
  dets = []
  for r in np.argsort(rows["position"], kind="stable") if rows else []:
    if rows["position"][r] < 0:
      continue
    n = int(rows["valid"][r])
    dets.append({"image_id": int(gt[rows["position"][r]]["image_id"]),
                 "boxes": rows["boxes"][r, :n], "scores": rows["scores"][r, :n],
                 "labels": rows["classes"][r, :n]})
  return gt, dets


# ----------------------------------------------------------------------------------------------
# Metrics output.
# ----------------------------------------------------------------------------------------------
class MetricsWriter:
  """Scalars to TensorBoard event files and to ``metrics.jsonl`` (one JSON object per write)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._path = os.path.join(workdir, "metrics.jsonl")
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()
    with open(self._path, "a") as f:
      f.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class EvalScorer:
  """Scores the evaluations made during training, in one background thread when ``overlap``.

  The detections are made on the devices first (the model is in use there); scoring them on the
  host (pycocotools-equal COCO and VOC metrics, seconds for thousands of images) then runs while
  training goes on. Results are logged and written from the loop's thread, in step order, as soon
  as they are ready (:meth:`poll`); the final evaluation, :meth:`close` and an error in scoring
  wait for every earlier one, so no metrics are lost and none is written out of order.
  """

  def __init__(self, config: ml_collections.ConfigDict, writer: MetricsWriter, overlap: bool):
    self.config = config
    self.writer = writer
    self._pool = None
    if overlap:
      from concurrent import futures  # pylint: disable=g-import-not-at-top
      self._pool = futures.ThreadPoolExecutor(1, thread_name_prefix="ssdjax-eval-scoring")
    self._pending = collections.deque()  # (step, seconds detecting, future of (metrics, seconds))

  def _timed_score(self, gt, dets):
    t0 = time.perf_counter()
    metrics = score(self.config, gt, dets)
    return metrics, time.perf_counter() - t0

  def submit(self, step: int, gt: list, dets: list, t_detect: float, *,
             wait: bool = False) -> dict[str, float] | None:
    """Scores one evaluation; returns its metrics when ``wait`` (or not overlapping), else None."""
    if self._pool is None or wait:
      self.poll(block=True)
      metrics, t_score = self._timed_score(gt, dets)
      self._report(step, metrics, t_detect, t_score, background=False)
      return metrics
    self._pending.append((step, t_detect, self._pool.submit(self._timed_score, gt, dets)))
    return None

  def poll(self, block: bool = False) -> None:
    """Reports the finished evaluations (all of them when ``block``), oldest first."""
    while self._pending and (block or self._pending[0][2].done()):
      step, t_detect, future = self._pending.popleft()
      metrics, t_score = future.result()  # an error in scoring is raised here
      self._report(step, metrics, t_detect, t_score, background=True)

  def _report(self, step, metrics, t_detect, t_score, background):
    logging.info("eval at step %d (detection %.1fs, scoring %.1fs%s): %s", step, t_detect,
                 t_score, " beside training" if background else "",
                 ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "/AP/" not in k))
    self.writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})

  def close(self) -> None:
    """Waits for the evaluations still being scored and writes them; errors are logged."""
    try:
      self.poll(block=True)
    except Exception as e:  # pylint: disable=broad-except
      logging.error("scoring an evaluation failed: %s: %s", type(e).__name__, e)
    finally:
      if self._pool is not None:
        self._pool.shutdown(wait=True)


class _QuietCheckpointLogs:
  """Drops orbax's per-save INFO lines (a dozen per checkpoint) so the progress lines stay readable."""

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def _due(step: int, every: int) -> bool:
  """Whether a periodic action runs after ``step``; ``every`` = 0 means never (only at the end)."""
  return every > 0 and step % every == 0


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s"


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------
class DevicePrefetch:
  """Batches put on the devices ``depth`` steps ahead, so that the transfer overlaps the step.

  ``get_state()`` is the input position after the batches handed out so far (not after those
  in flight), which is what a checkpoint records for an exact resume: JSON bytes, as
  ``grain.checkpoint.CheckpointSave`` takes them from an iterator that is not grain's own (restore
  them with :class:`InputPosition`). An iterator whose stream starts at a later global batch
  (``start_step``, a run resumed with another process count) records that step with its position.
  """

  def __init__(self, iterator, to_device: Callable[[dict], dict], depth: int = 2, *,
               start_step: int = 0):
    self._it, self._to_device, self._depth = iterator, to_device, depth
    self._start_step = start_step
    self._queue: collections.deque = collections.deque()
    self._state = iterator.get_state()

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    while len(self._queue) < self._depth:
      batch = self._to_device(next(self._it))
      self._queue.append((batch, self._it.get_state()))
    batch, self._state = self._queue.popleft()
    return batch

  def get_state(self) -> bytes:
    if self._start_step:
      return json.dumps({_START_STEP: self._start_step, "iterator": self._state}, indent=4).encode()
    return json.dumps(self._state, indent=4).encode()


_START_STEP = "ssdjax_start_step"


class InputPosition:
  """Restores what :meth:`DevicePrefetch.get_state` saved (through grain's checkpoint handler).

  ``iterator`` is the input iterator of a stream that starts at global batch ``start_step`` (0 at
  first); ``make(start_step)`` builds another one when the saved position belongs to a stream
  that starts later.
  """

  def __init__(self, make: Callable[[int], Any], iterator):
    self._make = make
    self.iterator, self.start_step = iterator, 0

  def set_state(self, state: bytes) -> None:
    state = json.loads(state)
    start = 0
    if isinstance(state, dict) and _START_STEP in state:
      start, state = int(state[_START_STEP]), state["iterator"]
    if self.iterator is None or start != self.start_step:
      self.close()
      self.iterator, self.start_step = self._make(start), start
    self.iterator.set_state(state)

  def start_prefetch(self) -> None:
    start = getattr(self.iterator, "start_prefetch", None)
    if start is not None:
      start()

  def close(self) -> None:
    close = getattr(self.iterator, "close", None)
    if close is not None:
      close()
    self.iterator = None


def input_files(step_folder: str) -> list[str] | None:
  """The per-process input positions of a checkpoint (``process_<i>-of-<n>.json``, grain's names),
  or None when it has no input item (weights converted by ``ssdjax.convert``)."""
  folder = os.path.join(step_folder, "data")
  if not os.path.isdir(folder):
    return None
  return sorted(f for f in os.listdir(folder) if f.startswith("process_") and f.endswith(".json"))


class _StopSignals:
  """Catches SIGINT and SIGTERM during training: the loop saves at the current step and exits.

  With several processes all must save the same step, and a signal may reach only some of them:
  SIGTERM is left to JAX's preemption service (``jax.distributed`` catches it and the processes
  agree on a step, ``multihost_utils.reached_preemption_sync_point``) and SIGINT is passed on to
  it as a SIGTERM; every process then exits with status 143.
  """

  def __init__(self):
    self.signum = None
    self._old = {}
    self._several = jax.process_count() > 1
    self._interrupted = False
    if threading.current_thread() is not threading.main_thread():
      return  # signal handlers can only be set from the main thread
    for sig in (signal.SIGINT,) if self._several else (signal.SIGINT, signal.SIGTERM):
      self._old[sig] = signal.signal(sig, self._handle)

  def stop_at(self, step: int) -> bool:
    """Whether the loop saves at ``step`` (steps done) and exits; called at every step."""
    if self._several and self.signum is None:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        reached = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # jax.distributed started without its preemption service
        reached = False
      if reached:
        self.signum = signal.SIGTERM
        logging.warning("a process received SIGTERM or SIGINT: every process saves a checkpoint "
                        "at step %d, then exits", step)
    return self.signum is not None

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None or self._interrupted:  # a second signal: stop now, unsaved
      self.restore()
      raise KeyboardInterrupt
    if self._several:
      self._interrupted = True
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service, which tells the others
      logging.warning("%s received: all processes save a checkpoint at a step they agree on, "
                      "then exit (send it again to stop without saving)",
                      signal.Signals(signum).name)
      return
    self.signum = signum
    logging.warning("%s received: saving a checkpoint at the current step, then exiting (send it "
                    "again to stop without saving)", signal.Signals(signum).name)

  def restore(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}


def _save_and_exit(save, step: int, signum: int):
  save(step)
  name = signal.Signals(signum).name
  logging.warning("%s: checkpoint at step %d saved; rerun the same command to resume", name, step)
  raise SystemExit(128 + signum)


def _resume_changes(config, workdir: str, allow_change: bool) -> dict:
  """The fields that differ from the workdir's recorded config (see checkpoints.check_resume)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return {}
  saved = config_lib.to_dict(load_config(workdir))
  if saved["augment"]["on_device"] is None:  # recorded before the device path: the host's
    saved["augment"]["on_device"] = False
  new = json.loads(config.to_json_best_effort())
  saved = json.loads(json.dumps(saved))  # tuples -> lists, as recorded
  ckpt = os.path.join(workdir, "checkpoints")
  steps = [d for d in (os.listdir(ckpt) if os.path.isdir(ckpt) else []) if d.isdigit()]
  if not steps:
    return checkpoints.config_diff(saved, new)  # nothing to resume: the new config starts afresh
  trained = any(os.path.isdir(os.path.join(ckpt, d, "data")) for d in steps)
  diff = checkpoints.check_resume(saved, new, trained=trained, allow_change=allow_change)
  if diff:
    logging.warning("resuming with changed fields (recorded in config_changes.jsonl): %s",
                    "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in diff.items()))
  return diff


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       progress: bool = True, allow_config_change: bool = False
                       ) -> dict[str, float]:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluates it.

  Resuming refuses a config whose training fields differ from the recorded one unless
  ``allow_config_change`` (a changed model is always refused); SIGINT/SIGTERM save a checkpoint
  at the current step and exit with status 128 + the signal number.

  Returns the final evaluation metrics (plus ``train/loss`` of the last logged interval).
  """
  from ssdjax import data  # pylint: disable=g-import-not-at-top

  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietCheckpointLogs) for f in handler.filters):
    handler.addFilter(_QuietCheckpointLogs())

  # --- Config: validated and resolved (class names from the data) before anything is written,
  # and compared with the workdir's own when resuming.
  config = prepare_config(config)
  changes = _resume_changes(config, workdir, allow_config_change)
  distributed.barrier("resume_checked")  # every process read the records before they are rewritten

  # --- Mesh, model, optimizer, compiled steps.
  trainer = Trainer(config)
  main_process = distributed.is_main()
  if main_process:
    write_run_records(config, workdir, trainer.anchors)
  logging.info("mesh %s over %d device(s): %s; %d anchors", dict(trainer.mesh.shape),
               trainer.mesh.size, jax.devices()[0].platform, len(trainer.anchors))

  # --- Input: this process's rows of every global batch (ssdjax.data), from global batch
  # ``start_step`` of the stream on.
  def make_input(start_step: int = 0):
    return data.make_train_iterator(config, seed=config.seed, process_index=jax.process_index(),
                                    process_count=jax.process_count(), start_step=start_step)

  position = InputPosition(make_input, make_input())

  # --- State: fresh or restored (params, optimizer, step and the input position) from the
  # newest checkpoint that verifies; damaged ones are moved to checkpoints_bad/.
  mngr = checkpoints.manager(workdir, config.train.keep_checkpoints)
  this_process = f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def restore(step_now):
    import grain  # pylint: disable=g-import-not-at-top
    items = {"state": ocp.args.StandardRestore(trainer.restore_target())}
    # A checkpoint written outside this loop (ssdjax.convert) has no input position, and one
    # written by another number of processes has none for this one: see below.
    files = input_files(checkpoints.step_dir(mngr, step_now)) or []
    if "data" in mngr.item_metadata(step_now) and (this_process in files or not files):
      items["data"] = grain.checkpoint.CheckpointRestore(position)
    return mngr.restore(step_now, args=ocp.args.Composite(**items))

  had_checkpoints = bool(mngr.all_steps())
  restored, start = checkpoints.restore_newest_good(mngr, restore, move_bad=True)
  input_start = 0
  if restored is None:
    state = trainer.init_state(config.seed)
    start = 0
    if had_checkpoints:  # every one was damaged: a failed restore may have moved the input
      position.close()
      position.iterator = make_input()
  else:
    state = restored["state"]
    logging.info("resumed from %s at step %d", checkpoints.step_dir(mngr, start), start)
    if "data" in restored:
      input_start = position.start_step
    else:
      # The global stream does not depend on the process count, so a checkpoint of N processes
      # continues in M at global batch `start`: the batches an uninterrupted run reads (unless
      # bad_records="skip" dropped images). Converted weights start the input from the beginning.
      written_by = input_files(checkpoints.step_dir(mngr, start))
      if written_by:
        input_start = start
        logging.info("the checkpoint holds the input positions of %s process(es), this run has "
                     "%d: the input continues at global batch %d of the same stream",
                     written_by[0].rsplit("-of-", 1)[-1][:-len(".json")], jax.process_count(),
                     start)
      position.close()
      position.iterator = make_input(input_start)
  train_iter = position.iterator
  if main_process:
    checkpoints.record_changes(workdir, start, changes)
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  logging.info("model %s/%s: %s parameters", config.model.backbone, config.model.head, f"{n_params:,}")

  writer = MetricsWriter(workdir, enabled=main_process)
  total = config.train.num_steps
  bar = None
  if progress and main_process:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
               mininterval=1.0, disable=None)

  saved_at = [start]
  feed = DevicePrefetch(train_iter, trainer.to_device, start_step=input_start)

  def save(step_now: int) -> None:
    import grain  # pylint: disable=g-import-not-at-top
    check_nonfinite(state, config, f"checkpoint at step {step_now}")
    if saved_at[0] != step_now:
      # The position after the batches the steps took, not after those prefetched.
      checkpoints.save(mngr, step_now, {"state": ocp.args.StandardSave(state),
                                        "data": grain.checkpoint.CheckpointSave(feed)},
                       state=state)
      saved_at[0] = step_now

  scorer = EvalScorer(config, writer, overlap=config.eval.overlap)

  def run_eval(step_now: int, *, wait: bool = False) -> dict[str, float] | None:
    t0 = time.perf_counter()
    gt, dets = detect_eval_split(trainer, trainer.variables(state))
    return scorer.submit(step_now, gt, dets, time.perf_counter() - t0, wait=wait)

  # --- Loop.
  final: dict[str, float] = {}
  pending: list[dict] = []
  t_log, steps_since = time.perf_counter(), 0
  t_start, start_step = time.perf_counter(), start
  stop = _StopSignals()
  try:
    for step in range(start, total):
      if stop.stop_at(step):
        _save_and_exit(save, step, stop.signum)
      batch = next(feed)
      distributed.compile_together(trainer.train_step, state, batch)
      state, metrics = trainer.train_step(state, batch)
      pending.append(metrics)
      steps_since += 1
      done = step + 1
      if bar is not None:
        bar.update(1)
      if _due(done, config.train.log_every) or done == total:
        host = jax.device_get(pending)
        skipped = check_nonfinite(state, config, f"step {done}")
        elapsed = time.perf_counter() - t_log
        scalars = {f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[0]}
        scalars["train/images_per_sec"] = steps_since * config.train.batch_size / elapsed
        scalars["train/skipped_steps"] = skipped
        writer.write(done, scalars)
        eta = (time.perf_counter() - t_start) / (done - start_step) * (total - done)
        parts = " ".join(f"{k[len('train/loss_'):]} {v:.4g}" for k, v in scalars.items()
                         if k.startswith("train/loss_"))
        msg = (f"step {done}/{total} loss {scalars['train/loss']:.4f} ({parts}) lr "
               f"{scalars['train/lr']:.2e} {scalars['train/images_per_sec']:.1f} img/s ETA "
               f"{_format_eta(eta)}")
        if bar is not None:
          bar.set_postfix_str(f"loss {scalars['train/loss']:.3f}", refresh=False)
        if skipped:
          msg += f" ({skipped} non-finite step(s) skipped)"
        logging.info(msg)
        final["train/loss"] = scalars["train/loss"]
        pending, t_log, steps_since = [], time.perf_counter(), 0
      if _due(done, config.train.checkpoint_every) or done == total:
        save(done)
      if _due(done, config.train.eval_every) and done != total:
        run_eval(done)
      scorer.poll()
    if stop.stop_at(total):
      _save_and_exit(save, total, stop.signum)
    if bar is not None:
      bar.close()
    final.update(run_eval(total, wait=True))
  finally:
    scorer.close()
    stop.restore()
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    close = getattr(train_iter, "close", None)
    if close is not None:
      close()
  if main_process:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump(final, f, indent=2, sort_keys=True)
  return final
