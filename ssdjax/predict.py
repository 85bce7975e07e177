r"""Runs a trained detector on image files: detections as JSON and drawn on PNGs.

  python -m ssdjax.predict --workdir=runs/synthetic image1.png image2.jpg
  python -m ssdjax.predict --workdir=runs/synthetic --outdir=out --min_score=0.5 photos/ 'more/*.jpg'

Inputs are image files, folders (every image file directly inside, sorted) and glob patterns
(quote them to pass them through the shell unexpanded). A file that is missing, or a pattern or
folder that matches no image, stops the run before the checkpoint is loaded; a file that fails to
decode is reported, listed in ``detections.json`` with its error, and skipped, and the other images'
results are written (the exit status is then 1).

Writes ``<outdir>/detections.json`` (per image: file, width, height, checkpoint step and
detections with label, the data set's ``category_id``, class name, score and the box in pixels and
normalized xyxy) and one PNG per image with the boxes drawn (images smaller than
``--min_draw_side`` are drawn on an upscaled copy, so captions stay legible). ``--outdir`` defaults
to ``<workdir>/predictions/step_<N>``; a folder that already holds results is never overwritten:
the next free ``step_<N>-2``, ``-3``, ... is used instead.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Sequence

from absl import flags
from absl import logging
import jax
import numpy as np

from ssdjax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def expand_inputs(args: Sequence[str]) -> list[str]:
  """Image files named by ``args``: files as given, folders' image files, glob matches (sorted).

  Raises:
    UserError: naming each file that does not exist and each folder or pattern without images.
  """
  files, problems = [], []
  for arg in args:
    if os.path.isdir(arg):
      found = sorted(os.path.join(arg, f) for f in os.listdir(arg)
                     if f.lower().endswith(IMAGE_EXTENSIONS)
                     and os.path.isfile(os.path.join(arg, f)))
      if not found:
        problems.append(f"folder {arg} holds no image file ({', '.join(IMAGE_EXTENSIONS)})")
      files += found
    elif os.path.isfile(arg):
      files.append(arg)
    elif glob.has_magic(arg):
      found = sorted(p for p in glob.glob(arg) if os.path.isfile(p))
      if not found:
        problems.append(f"pattern {arg!r} matches no file")
      files += found
    else:
      problems.append(f"image file {arg} not found")
  if problems:
    raise UserError("; ".join(problems))
  if not files:
    raise UserError("no image files given")
  return files


def default_outdir(workdir: str, step: int) -> str:
  """``<workdir>/predictions/step_<step>``, or the first of ``-2``, ``-3``, ... not yet used."""
  base = os.path.join(workdir, "predictions", f"step_{step}")
  path, n = base, 1
  while os.path.exists(path) and os.listdir(path):
    n += 1
    path = f"{base}-{n}"
  return path


def _png_names(files: Sequence[str]) -> list[str]:
  """One PNG name per input; inputs that share a base name get ``_2``, ``_3``, ... appended."""
  names, seen = [], {}
  for path in files:
    stem = os.path.splitext(os.path.basename(path))[0]
    seen[stem] = seen.get(stem, 0) + 1
    names.append(f"{stem}.png" if seen[stem] == 1 else f"{stem}_{seen[stem]}.png")
  return names


class Records(list):
  """The list of per-image records; ``outdir`` says where they were written."""
  outdir: str = ""


def predict_files(workdir: str, files: Sequence[str], outdir: str | None = None, *,
                  min_score: float, step: int | None = None,
                  min_draw_side: int = 0) -> list[dict]:
  """Detects objects in ``files`` with the checkpoint in ``workdir``; returns the JSON records.

  Args:
    workdir: a workdir written by ``ssdjax.main`` (or ``ssdjax.convert``).
    files: image paths (use :func:`expand_inputs` for folders and patterns).
    outdir: where detections.json and the PNGs go; None = :func:`default_outdir`.
    min_score: detections below this score are neither listed nor drawn.
    step: checkpoint step (None = the latest).
    min_draw_side: draw images whose shorter side is below this on an integer-upscaled copy.

  Returns:
    :class:`Records`, one record per file in order: ``{"file", "width", "height",
    "checkpoint_step", "detections"}`` or, for a file that failed to decode, ``{"file", "error",
    "detections": []}``; its ``outdir`` attribute is the folder written.
  """
  from ssdjax import data, train, visualize  # pylint: disable=g-import-not-at-top

  if not files:
    raise UserError("no image files given")
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:  # before the (slow) checkpoint restore
    raise UserError(f"image file(s) not found: {', '.join(missing)}")
  config, trainer, variables, step = train.restore_for_inference(workdir, step)
  names = tuple(config.class_names)
  outdir = outdir or default_outdir(workdir, step)
  os.makedirs(outdir, exist_ok=True)
  pngs = _png_names(files)
  bs = config.eval.batch_size
  records = Records()
  records.outdir = outdir
  for start in range(0, len(files), bs):
    chunk = list(range(start, min(start + bs, len(files))))
    images = {}
    for k in chunk:
      try:
        images[k] = data.load_image(files[k])
      except ValueError as e:
        logging.warning("%s; skipped", e)
        images[k] = str(e)
    batch = np.zeros((bs, config.image_size, config.image_size, 3), np.float32)
    for i, k in enumerate(chunk):
      if not isinstance(images[k], str):
        batch[i] = data.preprocess(images[k], config)
    out = jax.device_get(trainer.predict(variables, trainer.shard(batch)))
    for i, k in enumerate(chunk):
      path, im = files[k], images[k]
      if isinstance(im, str):
        records.append({"file": os.path.abspath(path), "error": im, "detections": []})
        continue
      n = int(out.valid[i])
      keep = np.asarray(out.scores[i, :n]) >= min_score
      boxes = np.asarray(out.boxes[i, :n])[keep]
      scores = np.asarray(out.scores[i, :n])[keep]
      labels = np.asarray(out.classes[i, :n])[keep]
      h, w = im.shape[:2]
      pix = visualize.to_pixels(boxes, w, h)
      records.append({
          "file": os.path.abspath(path), "width": int(w), "height": int(h),
          "checkpoint_step": int(step),
          "detections": [{"label": int(l), "category_id": data.category_id(config, l),
                          "class_name": names[int(l) - 1], "score": float(s),
                          "box_xyxy": [round(float(v), 2) for v in p],
                          "box_normalized": [float(v) for v in b]}
                         for b, p, s, l in zip(boxes, pix, scores, labels)]})
      png = os.path.join(outdir, pngs[k])
      visualize.draw_detections(im, boxes, labels, scores, names,
                                min_side=min_draw_side).save(png)
      logging.info("%s: %d detection(s) -> %s", path, len(scores), png)
  with open(os.path.join(outdir, "detections.json"), "w") as f:
    json.dump(records, f, indent=2)
  return records


def _define_flags() -> None:
  # Only when run as a program: other entry points (ssdjax.demo) import predict_files and own
  # flags of the same names.
  flags.DEFINE_string("workdir", None, "A workdir written by ssdjax.main (config + checkpoints).")
  flags.DEFINE_string("outdir", None, "Where to write detections.json and PNGs (default: "
                      "<workdir>/predictions/step_<N>, never an earlier prediction's folder).")
  flags.DEFINE_float("min_score", 0.3, "Detections below this score are not drawn or listed.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_integer("min_draw_side", 384, "Images with a shorter side below this are drawn "
                       "on an upscaled copy (0 = never), so captions stay legible.")


def main(argv):
  fl = flags.FLAGS
  if not fl.workdir:
    raise UserError("--workdir is required")
  if not argv[1:]:
    raise UserError("give image files, folders or glob patterns after the flags")
  files = expand_inputs(argv[1:])
  records = predict_files(fl.workdir, files, fl.outdir, min_score=fl.min_score, step=fl.step,
                          min_draw_side=fl.min_draw_side)
  failed = [r for r in records if "error" in r]
  total = sum(len(r["detections"]) for r in records)
  print(f"{total} detection(s) in {len(records) - len(failed)} image(s); written to "
        f"{records.outdir}")
  if failed:
    print(f"{len(failed)} file(s) could not be read and were skipped: "
          + "; ".join(r["error"] for r in failed))
    raise SystemExit(1)


if __name__ == "__main__":
  from ssdjax import cli  # pylint: disable=g-import-not-at-top

  _define_flags()
  cli.run(main)
