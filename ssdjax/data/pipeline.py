"""Training and evaluation input pipelines (grain), and single-image preprocessing for prediction.

Training (:func:`make_train_iterator`): source -> shuffle (a new order each epoch) -> repeat
forever -> per-element augmentation with an RNG derived from the seed and the element's position
(``random_map``) -> this process's rows of every global batch -> batches -> ``num_workers`` worker
processes (``mp_prefetch``; 0 = in the main process). The global stream is the same for any number
of processes, and each process reads only its rows of it, so N processes train on exactly the
batches one process would. Difficult (VOC) and crowd (COCO) boxes are dropped from the training
targets, as Caffe SSD and torchvision do; evaluation keeps them to ignore matches.

Worker processes end when the process that started them ends, even by SIGKILL
(:func:`_exit_with_parent`), and the shared memory that carries their batches is released before
the process exits (:func:`release_shared_memory`).

With ``config.augment.on_device`` the host only decodes and fits each image into a uint8 canvas
(:class:`CanvasTransform`); ``ssdjax.augment`` augments the batch inside the jitted train step.

Batches are dicts of NumPy arrays with static shapes (``G = config.data.max_boxes``)::

  train: images float32 [b, S, S, 3] normalized, gt_boxes float32 [b, G, 4] xyxy normalized,
         gt_labels int32 [b, G] (0 = padding), gt_mask bool [b, G]
  train, augment.on_device: images uint8 [b, C, C, 3] canvases (C = augment.canvas_size),
         valid_hw int32 [b, 2] (h, w) of each image in its canvas, gt_* as above (normalized to
         the image)
  eval:  images float32 [b, S, S, 3], image_id int64 [b], valid bool [b] (False = padding)
"""

from __future__ import annotations

import atexit
import functools
import gc
import os
import select
import signal
import threading
import time
import types
from typing import Any, Callable, Iterator, Sequence

from absl import flags
from absl import logging
import grain
import grain.multiprocessing
import numpy as np
from PIL import Image

from ssdjax.data import augment, coco_json, records, synthetic, tfds_sources, voc_xml
from ssdjax.errors import UserError

# config.data.source -> function (config, split spec) -> random-access source.
SOURCES: dict[str, Callable[[Any, str], Any]] = {
    "synthetic": synthetic.from_config,
    "coco_json": coco_json.from_config,
    "voc_xml": voc_xml.from_config,
    "tfds": tfds_sources.from_config,
}

# Threads that read and transform elements inside each process: PIL and NumPy release the GIL for
# most of the work. The buffer holds elements after the transform.
_READ_THREADS = 2
_READ_BUFFER = 16

# How often a worker checks that its parent is alive where it cannot wait on a pidfd (not Linux).
_PARENT_POLL_S = 0.5

_warned_max_boxes = False
# Set once a pipeline with worker processes is built: their batches come in shared memory.
_shared_memory_used = False


def make_source(config, spec: str):
  """The random-access source of one split spec of ``config.data.source``."""
  name = config.data.source
  if name not in SOURCES:
    raise ValueError(f"config.data.source={name!r} is unknown; valid sources: {sorted(SOURCES)}")
  return SOURCES[name](config, spec)


def train_source(config):
  """All of ``config.data.train`` concatenated (e.g. VOC 2007 + 2012 trainval)."""
  specs = _specs(config.data.train, "config.data.train")
  sources = [make_source(config, spec) for spec in specs]
  return sources[0] if len(sources) == 1 else records.ConcatSource(sources)


def eval_source(config):
  """The ``config.data.eval`` source, cut to the first ``config.eval.max_images`` (0 = all)."""
  source = make_source(config, config.data.eval)
  if config.eval.max_images:
    return _Head(source, config.eval.max_images)
  return source


class TrainTransform:
  """grain random map: record -> training element (augmented, resized, normalized, padded)."""

  def __init__(self, config):
    self.augment = types.SimpleNamespace(**config.augment.to_dict())
    self.image_size = int(config.image_size)
    self.mean_rgb = tuple(config.data.mean_rgb)
    self.std_rgb = tuple(config.data.std_rgb)
    self.max_boxes = int(config.data.max_boxes)

  def __call__(self, record: records.Record, rng: np.random.Generator) -> dict[str, np.ndarray]:
    record = records.select_boxes(record, ~(record["difficult"] | record["is_crowd"]))
    record = augment.augment(record, rng, self.augment, fill_rgb=self.mean_rgb)
    return {"images": _model_input(record["image"], self.image_size, self.mean_rgb, self.std_rgb),
            **pad_boxes(record, self.max_boxes)}


class CanvasTransform:
  """grain map: record -> on-device training element (the host part of ``augment.on_device``).

  The decoded image is fitted into a ``augment.canvas_size`` square uint8 canvas at the top-left
  (aspect kept, shrunk with PIL's bilinear filter when larger, never enlarged), with its size
  in the canvas; boxes stay normalized to the image. No randomness: ``ssdjax.augment`` draws it
  on the device.

  Returns:
    {"images": uint8 [C, C, 3], "valid_hw": int32 [2] (h, w), "gt_boxes", "gt_labels",
    "gt_mask" (as :func:`pad_boxes`)}.
  """

  def __init__(self, config):
    self.canvas = int(config.augment.canvas_size)
    self.max_boxes = int(config.data.max_boxes)

  def __call__(self, record: records.Record) -> dict[str, np.ndarray]:
    record = records.select_boxes(record, ~(record["difficult"] | record["is_crowd"]))
    return {**fit_canvas(record["image"], self.canvas), **pad_boxes(record, self.max_boxes)}


def fit_canvas(image: np.ndarray, canvas: int) -> dict[str, np.ndarray]:
  """uint8 [H, W, 3] -> {"images": uint8 [canvas, canvas, 3], "valid_hw": int32 [2]}."""
  h, w = image.shape[:2]
  scale = min(1.0, canvas / max(h, w))
  if scale < 1.0:
    h, w = max(1, round(h * scale)), max(1, round(w * scale))
    image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
  out = np.zeros((canvas, canvas, 3), np.uint8)
  out[:h, :w] = image
  return {"images": out, "valid_hw": np.array([h, w], np.int32)}


def augment_on_device(config) -> bool:
  """``config.augment.on_device``, with None resolved: on the accelerator unless JAX runs on CPU."""
  if config.augment.on_device is not None:
    return bool(config.augment.on_device)
  import jax  # pylint: disable=g-import-not-at-top
  return jax.default_backend() != "cpu"


class EvalTransform:
  """grain map: record -> eval element (resize + normalize only)."""

  def __init__(self, config):
    self.image_size = int(config.image_size)
    self.mean_rgb = tuple(config.data.mean_rgb)
    self.std_rgb = tuple(config.data.std_rgb)

  def __call__(self, record: records.Record) -> dict[str, np.ndarray]:
    return {"images": _model_input(record["image"], self.image_size, self.mean_rgb, self.std_rgb),
            "image_id": np.int64(record["image_id"]), "valid": np.True_}


def _model_input(image, image_size, mean_rgb, std_rgb) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [S, S, 3]."""
  return augment.normalize(augment.resize(image, image_size), mean_rgb, std_rgb)


def pad_boxes(record: records.Record, max_boxes: int) -> dict[str, np.ndarray]:
  """Pads (or cuts, with a warning once) a record's boxes to ``max_boxes``.

  Returns:
    gt_boxes float32 [G, 4] xyxy normalized, gt_labels int32 [G] (0 = padding), gt_mask bool [G].
  """
  global _warned_max_boxes
  n = len(record["labels"])
  if n > max_boxes:
    if not _warned_max_boxes:
      logging.warning("%s has %d boxes, more than config.data.max_boxes=%d: keeping the first %d "
                      "(warned once; raise max_boxes to keep them all)",
                      record["file"], n, max_boxes, max_boxes)
      _warned_max_boxes = True
    n = max_boxes
  gt_boxes = np.zeros((max_boxes, 4), np.float32)
  gt_labels = np.zeros((max_boxes,), np.int32)
  gt_boxes[:n] = record["boxes"][:n]
  gt_labels[:n] = record["labels"][:n]
  return {"gt_boxes": gt_boxes, "gt_labels": gt_labels, "gt_mask": np.arange(max_boxes) < n}


def make_train_iterator(config, *, seed: int, process_index: int = 0, process_count: int = 1,
                        start_step: int = 0) -> grain.DatasetIterator:
  """Infinite iterator of training batches for this process (module docstring for the arrays).

  Args:
    config: the experiment config (data, augment, image_size, train.batch_size).
    seed: seeds the shuffle and the augmentation RNGs.
    process_index, process_count: this process reads rows ``[p * b, (p + 1) * b)`` of every
      global batch of ``config.train.batch_size`` (``b = batch_size // process_count``), and only
      those images; the global batches do not depend on the process count.
    start_step: the first batch is global batch ``start_step`` of the stream (a resumed run
      whose checkpoint holds no input position for this process count starts at its step).

  Returns:
    A grain ``DatasetIterator``: ``next(it)`` is a batch; ``get_state()`` / ``set_state()`` (or
    ``grain.checkpoint.CheckpointSave(it)``) save and restore its position (relative to
    ``start_step``).
  """
  global_batch = config.train.batch_size
  if process_count < 1 or global_batch < 1 or global_batch % process_count:
    raise ValueError(f"config.train.batch_size={global_batch} must be a positive multiple of the "
                     f"process count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in 0..{process_count - 1}")
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0")
  _check_data_config(config)
  source = train_source(config)
  if len(source) == 0:
    raise ValueError(f"the training source has no records ({config.data.train})")
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  # On the device path the augmentation's randomness comes from (seed, step, image index) in the
  # train step; the host only decodes and fits the canvas.
  ds = ds.map(CanvasTransform(config)) if augment_on_device(config) else ds.random_map(
      TrainTransform(config))
  rows = global_batch // process_count
  if process_count > 1:
    ds = _ProcessRows(ds, rows, process_index, process_count)
  if start_step:
    ds = ds[start_step * rows:]
  return iter(_batched(ds, rows, config.data.num_workers, drop_remainder=True))


class _ProcessRows(grain.MapDataset):
  """Rows ``[p * rows, (p + 1) * rows)`` of every global batch of ``rows * count`` elements.

  Lazy: an element of the parent is read (decoded, augmented) only by the process that uses it.
  """

  def __init__(self, parent: grain.MapDataset, rows: int, process_index: int, count: int):
    super().__init__(parent)
    self._rows, self._index, self._count = rows, process_index, count

  def __len__(self) -> int:
    return len(self._parent) // self._count

  def __str__(self) -> str:
    return f"_ProcessRows(rows={self._rows}, process={self._index} of {self._count})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, row = divmod(index, self._rows)
    return self._parent[(batch * self._count + self._index) * self._rows + row]


def make_eval_batches(config, *, batch_size: int, process_index: int = 0,
                      process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Batches over the eval split (``config.data.eval``), in source order.

  An image that fails to decode with ``bad_records="skip"`` is left out (and logged); its ground
  truth stays in :func:`eval_ground_truth`, so its objects count as missed.

  Args:
    config: the experiment config.
    batch_size: the global batch; each process's batches hold ``batch_size // process_count``.
    process_index, process_count: this process reads its part of the split only, records
      ``[p * m, (p + 1) * m)`` with ``m = ceil(n / process_count)``. Every process yields the
      same number of batches (its last ones padded, or all padding), so that the processes run
      the same number of global steps; together they hold every image once.

  Returns:
    An iterator of {"images": float32 [b, S, S, 3], "image_id": int64 [b], "valid": bool [b]}; the
    last batches are padded to ``b`` with zero images and valid=False.
  """
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"eval batch_size={batch_size} must be a positive multiple of the process "
                     f"count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in 0..{process_count - 1}")
  _check_data_config(config)
  ds = grain.MapDataset.source(eval_source(config))
  rows = batch_size // process_count
  num_batches = None
  if process_count > 1:
    part = -(-len(ds) // process_count)
    ds = ds[process_index * part:(process_index + 1) * part]
    num_batches = -(-part // rows)
  ds = ds.map(EvalTransform(config))
  return _padded_batches(iter(_batched(ds, rows, config.data.num_workers, drop_remainder=False)),
                         rows, in_workers=config.data.num_workers > 0, num_batches=num_batches,
                         image_size=int(config.image_size))


def _padded_batches(iterator, batch_size: int, *, in_workers: bool, num_batches: int | None = None,
                    image_size: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """``iterator``'s batches padded to ``batch_size`` rows, then all-padding batches up to
  ``num_batches`` (None: none)."""
  count = 0
  try:
    for batch in iterator:
      count += 1
      yield _pad_batch(batch, batch_size)
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()
    if in_workers:
      release_shared_memory()
  empty = {"images": np.zeros((0, image_size, image_size, 3), np.float32),
           "image_id": np.zeros((0,), np.int64), "valid": np.zeros((0,), bool)}
  for _ in range(count, num_batches or 0):
    yield _pad_batch(empty, batch_size)


def eval_ground_truth(config) -> list[dict[str, Any]]:
  """Ground truth of the eval split, in the order of :func:`make_eval_batches`.

  Returns:
    [{"image_id": int, "height": int, "width": int, "boxes": float32 [N, 4] xyxy normalized,
      "labels": int32 [N], "difficult": bool [N], "is_crowd": bool [N]}] (pixel size = height x
    width, for COCO's area ranges).
  """
  source = eval_source(config)
  keys = ("image_id", "height", "width", "boxes", "labels", "difficult", "is_crowd")
  return [{k: ann[k] for k in keys} for ann in map(source.annotation, range(len(source)))]


def _data_classes(config, eval_only: bool) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
  """(class names, category ids or None) as the data of ``config.data`` states them.

  Every training split and the eval split must agree (COCO-JSON files with other categories,
  say, would silently train one label as another class).
  """
  source = config.data.source
  specs = [] if eval_only else list(_specs(config.data.train, "config.data.train"))
  specs.append(config.data.eval)
  if source == "synthetic":
    return synthetic.class_names(config.data.synthetic.num_classes), None
  if source == "voc_xml":
    train_names = set()
    for spec in specs[:-1] or specs:
      train_names.update(voc_xml.class_names_in(config, spec))
    extra = sorted(set(voc_xml.class_names_in(config, specs[-1])) - train_names)
    if extra and not eval_only:
      raise UserError(f"voc_xml eval split {specs[-1]!r} has classes {extra} that no training "
                      "split has; set config.class_names to the full list")
    if not train_names:
      raise UserError(f"voc_xml training splits {specs[:-1]} have no objects")
    return tuple(sorted(train_names)), None
  if source not in SOURCES:
    raise UserError(f"config.data.source={source!r} is unknown; valid sources: {sorted(SOURCES)}")
  found = None
  for spec in specs:
    src = make_source(config, spec)
    here = (tuple(src.class_names()), src.category_ids())
    if found is None:
      found, first = here, (spec, src)
    elif here != found:
      raise UserError(
          f"the splits disagree on their classes: {first[0]!r} ({first[1]!r}) has "
          f"{list(found[0])} (ids {found[1]}), {spec!r} ({src!r}) has {list(here[0])} (ids "
          f"{here[1]}); give every split the same categories")
  return found


def resolve_classes(config, *, eval_only: bool = False):
  """A copy of ``config`` with ``class_names`` and ``data.category_ids`` read from the data.

  ``eval_only`` reads (or checks against) the eval split alone, for evaluating a trained run.

  The class names (and, for COCO data, the category ids) are facts of the data set: read from
  the COCO-JSON categories, the tfds features, the VOC annotations or the synthetic shapes. A
  config that states them already (converted weights fix the outputs) is checked against the
  data instead: the names must be the data's (for voc_xml: include every name it uses).

  Raises:
    UserError: the splits disagree, or the config's names differ from the data's.
  """
  names, ids = _data_classes(config, eval_only)
  out = config.copy_and_resolve_references()
  if config.class_names is not None:
    given = tuple(config.class_names)
    ok = set(names) <= set(given) if config.data.source == "voc_xml" else given == names
    if not ok:
      raise UserError(
          f"config.class_names {list(given)} differs from the classes of the data "
          f"({config.data.source}: {list(names)}); leave config.class_names unset (None) to "
          "take them from the data, or use a config whose outputs match the data")
    names = given
  if config.data.category_ids is not None:
    given_ids = tuple(config.data.category_ids)
    if ids is not None and given_ids != tuple(ids):
      raise UserError(f"config.data.category_ids {list(given_ids)} differs from the data's "
                      f"{list(ids)}; leave it unset to take them from the data")
    ids = given_ids
  with out.unlocked():
    out.class_names = tuple(names)
    out.data.category_ids = None if ids is None else tuple(int(i) for i in ids)
  return out


def category_id(config, label: int) -> int:
  """The data set's category id of a label (COCO ids for COCO data; else the label itself)."""
  ids = config.data.category_ids
  return int(ids[int(label) - 1]) if ids else int(label)


def preprocess(image: np.ndarray, config) -> np.ndarray:
  """uint8 [H, W, 3] RGB -> float32 [S, S, 3]: resized (bilinear) and normalized like eval data."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"preprocess expects a uint8 [H, W, 3] RGB image, got {image.dtype} "
                     f"{list(image.shape)} (ssdjax.data.load_image reads files this way)")
  return _model_input(image, int(config.image_size), config.data.mean_rgb, config.data.std_rgb)


def _batched(ds: grain.MapDataset, batch_size: int, num_workers: int, *, drop_remainder: bool):
  """MapDataset of elements -> IterDataset of batches, in ``num_workers`` processes if > 0.

  ``None`` elements (images dropped by bad_records="skip" at load time) are filtered out.
  """
  global _shared_memory_used
  read_options = grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_READ_BUFFER)
  it = ds.to_iter_dataset(read_options).batch(batch_size, drop_remainder=drop_remainder)
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read absl flags; outside absl.app (notebooks, tests) the flag
      # defaults apply.
      flags.FLAGS.mark_as_parsed()
    if not _shared_memory_used:
      # atexit runs the last registered first: this runs before multiprocessing's own exit
      # handler (registered when grain imported it), which stops grain's unlink thread.
      atexit.register(release_shared_memory)
      _shared_memory_used = True
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                        worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
  return it


def _exit_with_parent(parent_pid: int, worker_index: int, worker_count: int) -> None:
  """grain ``worker_init_fn``: ends this worker process as soon as ``parent_pid`` has ended.

  Without it a trainer killed by SIGKILL (or the OOM killer) leaves its workers running, and
  Python's resource tracker with them: it waits for every process that holds its pipe.

  ``prctl(PR_SET_PDEATHSIG)`` cannot do this here: the kernel sends that signal when the *thread*
  that started the worker ends, and grain starts each worker from a prefetch thread that it stops
  and replaces in ``set_state`` (a resumed run), which would kill healthy workers and hang the
  resume. A daemon thread waits for the parent process instead.

  Ctrl-C in a terminal signals the whole process group; workers ignore SIGINT so that the
  trainer alone handles it (it saves a checkpoint, then ends, and its workers with it).
  """
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  threading.Thread(target=_wait_for_parent_then_exit, args=(parent_pid,), daemon=True,
                   name="ssdjax-exit-with-parent").start()


def _wait_for_parent_then_exit(parent_pid: int) -> None:
  try:
    # Linux >= 5.3: readable once the process has ended, no polling.
    pidfd = os.pidfd_open(parent_pid)
  except (AttributeError, OSError):  # another OS, or the parent has ended already
    pidfd = None
  # A worker is reparented when its parent ends, so while getppid() is parent_pid the pidfd is
  # the parent's and not a later process that reuses its pid.
  if pidfd is not None and os.getppid() == parent_pid:
    select.select([pidfd], [], [])
  else:
    while os.getppid() == parent_pid:
      time.sleep(_PARENT_POLL_S)
  os._exit(1)  # pylint: disable=protected-access


def release_shared_memory() -> None:
  """Unlinks the shared memory of the worker batches that nothing uses any more, and waits for it.

  Worker processes hand batches over in shared memory, which grain 0.2 unlinks when the array is
  garbage collected. Two ways it can miss that, each ending the run with the resource tracker's
  "leaked shared_memory objects" warning: (1) a prefetch thread that ends on an exception (every
  eval pass ends on StopIteration) keeps its last batch in a reference cycle through the
  exception's traceback, which only the cyclic GC frees, and at interpreter shutdown that runs
  after the modules ``SharedMemoryArray.__del__`` needs are gone; (2) ``__del__`` unlinks in a
  background thread pool, which multiprocessing's exit handler stops with unlinks still queued.
  This collects the cycles, then waits until the pool has done what was queued. It runs at exit
  and at the end of every eval pass with workers.
  """
  gc.collect()
  pool = getattr(grain.multiprocessing.SharedMemoryArray, "_del_thread_pool", None)
  if pool is None:
    return
  try:
    # A no-op queued behind the pending unlinks: grain gives the pool one thread, which runs them
    # in order.
    pool.apply(int)
  except ValueError:  # the pool was stopped already
    pass


def _pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  n = len(batch["valid"])
  if n == batch_size:
    return batch
  return {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


def _check_data_config(config) -> None:
  data = config.data
  records.check_bad_records_mode(data.bad_records)
  if data.max_boxes < 1:
    raise ValueError(f"config.data.max_boxes={data.max_boxes} must be >= 1")
  if data.num_workers < 0:
    raise ValueError(f"config.data.num_workers={data.num_workers} must be >= 0 (0 = in process)")
  aug = config.augment
  for name, ok, valid in (("expand_prob", 0 <= aug.expand_prob <= 1, "in [0, 1]"),
                          ("channel_swap_prob", 0 <= aug.channel_swap_prob <= 1, "in [0, 1]"),
                          ("expand_max_ratio", aug.expand_max_ratio >= 1, ">= 1"),
                          ("crop_trials", aug.crop_trials >= 1, ">= 1")):
    if not ok:
      raise ValueError(f"config.augment.{name}={aug[name]} must be {valid}")
  for name in ("mean_rgb", "std_rgb"):
    value = np.asarray(data[name], np.float64)
    if value.shape != (3,) or (name == "std_rgb" and (value <= 0).any()):
      raise ValueError(f"config.data.{name}={data[name]} must be 3 numbers"
                       + (" > 0" if name == "std_rgb" else ""))


def _specs(value, name: str) -> Sequence[str]:
  specs = (value,) if isinstance(value, str) else tuple(value)
  if not specs:
    raise ValueError(f"{name} is empty; give at least one split spec")
  return specs


class _Head:
  """The first ``n`` records of a source."""

  def __init__(self, source, n: int):
    self.source, self.n = source, min(int(n), len(source))

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int):
    if not 0 <= index < self.n:
      raise IndexError(f"index {index} out of range for {self.n} records")
    return self.source[index]

  def annotation(self, index: int):
    return self.source.annotation(index)
