r"""Exports a trained detector as one self-contained StableHLO artifact (``jax.export``).

  python -m ssdjax.export --workdir=runs/synthetic --out=detector.jax
  python -m ssdjax.export --workdir=runs/synthetic --out=detector_b8.jax --batch=8 --platforms=cpu,cuda

The artifact is the whole inference function, preprocessed images float32 [B, S, S, 3] ->
detections (model, anchor decoding, per-class top-k, NMS), with the trained parameters baked in as
constants. Running it needs ``jax`` and ``numpy`` only (``jax.export.deserialize``): no ssdjax, no
Flax, no config. ``FILE.json`` next to it holds what a caller needs around it: image size, the
mean/std of the preprocessing, class names, input and output names, shapes and dtypes, the batch
size, the checkpoint step and the versions that wrote it.

Outputs are a dict ``{"boxes", "scores", "classes", "valid"}`` with the shapes and meaning of
:class:`ssdjax.postprocess.Detections`. A dict rather than the NamedTuple: deserializing a NamedTuple
output needs the same class registered (``jax.export.register_namedtuple_serialization``), i.e.
ssdjax importable where the artifact runs; :func:`load_exported` turns the dict back into
``Detections``.

Batch: polymorphic by default (a symbolic dimension ``b``, any batch >= 1 at call time). Every op of
the inference function is batch-independent — convolutions, reshapes that keep the batch axis,
``lax.top_k``, the ``fori_loop`` NMS under ``vmap`` — so the symbolic batch exports and the program
is compiled once per concrete batch size when called. ``--batch=N`` exports a fixed batch instead.

Serialization needs the ``flatbuffers`` package. The constants make the artifact about as large as
the parameters (SSD300-VGG16: ~100 MB); the format's limit is 2 GB.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import ssdjax
from ssdjax import postprocess
from ssdjax.errors import UserError

OUTPUT_NAMES = tuple(postprocess.Detections._fields)  # ("boxes", "scores", "classes", "valid")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")

_OUTPUT_DOCS = {
    "boxes": "[B, D, 4] float32 xyxy, normalized to [0, 1], clipped; padding rows are 0",
    "scores": "[B, D] float32 class probabilities, descending; padding rows are 0",
    "classes": "[B, D] int32 labels 1..num_classes-1 (class_names[label - 1]); padding rows are 0",
    "valid": "[B] int32 number of real detections per image (rows [:valid])",
}


def _check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
  if isinstance(platforms, str):
    platforms = [p for p in platforms.split(",") if p]
  platforms = tuple(str(p).strip().lower() for p in platforms)
  bad = [p for p in platforms if p not in PLATFORMS]
  if not platforms or bad:
    raise UserError(f"platforms={list(platforms)}: each must be one of {list(PLATFORMS)} "
                     "(and at least one given)")
  if len(set(platforms)) != len(platforms):
    raise UserError(f"platforms={list(platforms)} names a platform twice")
  return platforms


def _check_batch_size(batch_size) -> int | None:
  if batch_size is None:
    return None
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise UserError(f"batch_size must be an integer >= 1, or None for a polymorphic batch; "
                     f"got {batch_size!r}")
  return int(batch_size)


def _shape_json(shape) -> list:
  """Concrete dims as ints, symbolic ones by name ("b")."""
  return [int(d) if isinstance(d, (int, np.integer)) else str(d) for d in shape]


def _export(workdir: str, *, batch_size: int | None, platforms: Sequence[str],
            step: int | None) -> tuple[jax.export.Exported, dict[str, Any]]:
  from ssdjax import train  # pylint: disable=g-import-not-at-top

  batch_size = _check_batch_size(batch_size)
  platforms = _check_platforms(platforms)
  config, trainer, variables, step = train.restore_for_inference(workdir, step)
  predict = train.make_predict_fn(config, trainer.model, trainer.anchors)
  # Host numpy arrays closed over by the traced function become constants of the module: the
  # artifact carries its parameters and no device placement or sharding.
  variables = jax.device_get(variables)

  def infer(images):
    return predict(variables, images)._asdict()

  size = int(config.image_size)
  batch = jax.export.symbolic_shape("b")[0] if batch_size is None else batch_size
  images_spec = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  exported = jax.export.export(jax.jit(infer), platforms=platforms)(images_spec)

  out_avals = jax.tree.unflatten(exported.out_tree, exported.out_avals)
  metadata = {
      "format": "jax.export (StableHLO), load with jax.export.deserialize",
      "calling_convention_version": int(exported.calling_convention_version),
      "platforms": list(exported.platforms),
      "batch_size": "polymorphic" if batch_size is None else batch_size,
      "input": {"name": "images", "shape": _shape_json(exported.in_avals[0].shape),
                "dtype": "float32",
                "preprocessing": "RGB, resized to image_size x image_size (bilinear), then "
                                 "(pixel - mean_rgb) / std_rgb with pixels in [0, 255]"},
      "output_names": list(OUTPUT_NAMES),
      "outputs": {name: {"shape": _shape_json(out_avals[name].shape),
                         "dtype": str(out_avals[name].dtype), "description": _OUTPUT_DOCS[name]}
                  for name in OUTPUT_NAMES},
      "image_size": size,
      "mean_rgb": [float(v) for v in config.data.mean_rgb],
      "std_rgb": [float(v) for v in config.data.std_rgb],
      "class_names": list(config.class_names),
      "category_ids": (list(config.data.category_ids) if config.data.category_ids
                       else list(range(1, len(config.class_names) + 1))),
      "num_classes": len(config.class_names) + 1,
      "postprocess": {k: (list(v) if isinstance(v, tuple) else v)
                      for k, v in postprocess.from_config(config).items()},
      "model": {"backbone": config.model.backbone, "head": config.model.head},
      "checkpoint_step": int(step),
      "workdir": os.path.abspath(workdir),
      "ssdjax_version": ssdjax.__version__,
      "jax_version": jax.__version__,
  }
  return exported, metadata


def export_inference(workdir: str, *, batch_size: int | None = None,
                     platforms: Sequence[str] = ("cpu",),
                     step: int | None = None) -> jax.export.Exported:
  """The inference function of a trained run, exported with its parameters as constants.

  Args:
    workdir: a run directory written by ``ssdjax.main`` (config.json + checkpoints).
    batch_size: a fixed batch size, or None for a polymorphic batch (symbolic ``b``).
    platforms: lowering platforms, any of ``PLATFORMS``; several give one multi-platform artifact.
    step: checkpoint step (default: the latest).

  Returns:
    ``jax.export.Exported`` of images float32 [B, S, S, 3] (preprocessed) -> dict of boxes
    [B, D, 4] xyxy normalized, scores [B, D], classes [B, D] int32, valid [B] int32.
  """
  return _export(workdir, batch_size=batch_size, platforms=platforms, step=step)[0]


def export_to_file(workdir: str, out: str, *, batch_size: int | None = None,
                   platforms: Sequence[str] = ("cpu",), step: int | None = None) -> dict[str, Any]:
  """Writes ``out`` (serialized artifact) and ``out + ".json"`` (metadata); returns the metadata."""
  exported, metadata = _export(workdir, batch_size=batch_size, platforms=platforms, step=step)
  blob = exported.serialize()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "wb") as f:
    f.write(blob)
  metadata["size_bytes"] = len(blob)
  with open(out + ".json", "w") as f:
    json.dump(metadata, f, indent=2)
  return metadata


def load_exported(path: str) -> tuple[Callable[[Any], postprocess.Detections], dict[str, Any]]:
  """Loads an artifact written by :func:`export_to_file`; needs no model code.

  Returns:
    (detect, metadata): ``detect(images)`` takes preprocessed images float32 [B, S, S, 3] and
    returns :class:`ssdjax.postprocess.Detections`; ``metadata`` is the content of ``path + ".json"``.
  """
  meta_path = path + ".json"
  for p in (path, meta_path):
    if not os.path.isfile(p):
      raise FileNotFoundError(f"{p} not found: write it with python -m ssdjax.export --out={path}")
  with open(path, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  with open(meta_path) as f:
    metadata = json.load(f)
  size, batch = metadata["image_size"], metadata["batch_size"]

  def detect(images) -> postprocess.Detections:
    shape = tuple(np.shape(images))
    dtype = images.dtype if hasattr(images, "dtype") else np.asarray(images).dtype
    if len(shape) != 4 or shape[1:] != (size, size, 3) or shape[0] < 1 or (
        batch != "polymorphic" and shape[0] != batch):
      want = "B >= 1" if batch == "polymorphic" else f"B = {batch}"
      raise ValueError(f"images must have shape [B, {size}, {size}, 3] with {want} for {path}; "
                       f"got {list(shape)}")
    if dtype != jnp.float32:
      raise ValueError(f"images must be float32 (preprocessed with mean_rgb/std_rgb); got {dtype}")
    out = exported.call(images)
    return postprocess.Detections(**{name: out[name] for name in OUTPUT_NAMES})

  return detect, metadata


def _define_flags() -> None:
  # Defined only when run as a program: ssdjax.predict and ssdjax.main own flags of the same
  # names, and absl refuses a second definition in one process.
  flags.DEFINE_string("workdir", None, "A workdir written by ssdjax.main (config + checkpoints).")
  flags.DEFINE_string("out", None, "Artifact file to write; metadata goes to <out>.json.")
  flags.DEFINE_integer("batch", None, "Fixed batch size (default: polymorphic batch).")
  flags.DEFINE_bool("polymorphic", False, "Polymorphic batch (the default).")
  flags.DEFINE_string("platforms", "cpu", f"Comma-separated, from {','.join(PLATFORMS)}.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fl = flags.FLAGS
  if fl.batch is not None and fl.polymorphic:
    raise app.UsageError("give --batch=N or --polymorphic, not both")
  meta = export_to_file(fl.workdir, fl.out, batch_size=fl.batch, platforms=fl.platforms,
                        step=fl.step)
  print(f"exported step {meta['checkpoint_step']} for {','.join(meta['platforms'])}, batch "
        f"{meta['batch_size']}, input {meta['input']['shape']}: {fl.out} "
        f"({meta['size_bytes']:,} bytes) + {fl.out}.json")


if __name__ == "__main__":
  from ssdjax import cli  # pylint: disable=g-import-not-at-top

  _define_flags()
  cli.run(main)
