r"""Runs a trained detector on image files: detections as JSON and drawn on PNGs.

  python -m ssdjax.predict --workdir=runs/synthetic image1.png image2.jpg
  python -m ssdjax.predict --workdir=runs/synthetic --outdir=out --min_score=0.5 images/*.png

Writes ``<outdir>/detections.json`` (per image: file, width, height and detections with class name,
score and the box in pixels and normalized xyxy) and ``<outdir>/<image name>.png`` with the boxes
drawn. ``--outdir`` defaults to ``<workdir>/predictions``.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

def predict_files(workdir: str, files: Sequence[str], outdir: str, *, min_score: float = 0.3,
                  step: int | None = None) -> list[dict]:
  """Detects objects in ``files`` with the checkpoint in ``workdir``; returns the JSON records."""
  from ssdjax import data, train, visualize  # pylint: disable=g-import-not-at-top

  if not files:
    raise ValueError("no image files given")
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:  # before the (slow) checkpoint restore
    raise FileNotFoundError(f"image file(s) not found: {', '.join(missing)}")
  config, trainer, variables, step = train.restore_for_inference(workdir, step)
  names = tuple(data.class_names(config))
  os.makedirs(outdir, exist_ok=True)
  bs = config.eval.batch_size
  records = []
  for start in range(0, len(files), bs):
    chunk = list(files[start:start + bs])
    images = [data.load_image(f) for f in chunk]
    batch = np.zeros((bs, config.image_size, config.image_size, 3), np.float32)
    for i, im in enumerate(images):
      batch[i] = data.preprocess(im, config)
    out = jax.device_get(trainer.predict(variables, trainer.shard(batch)))
    for i, (path, im) in enumerate(zip(chunk, images)):
      n = int(out.valid[i])
      keep = np.asarray(out.scores[i, :n]) >= min_score
      boxes = np.asarray(out.boxes[i, :n])[keep]
      scores = np.asarray(out.scores[i, :n])[keep]
      labels = np.asarray(out.classes[i, :n])[keep]
      h, w = im.shape[:2]
      pix = visualize.to_pixels(boxes, w, h)
      records.append({
          "file": os.path.abspath(path), "width": int(w), "height": int(h), "checkpoint_step": int(step),
          "detections": [{"label": int(l), "class_name": names[int(l) - 1], "score": float(s),
                          "box_xyxy": [round(float(v), 2) for v in p],
                          "box_normalized": [float(v) for v in b]}
                         for b, p, s, l in zip(boxes, pix, scores, labels)]})
      png = os.path.join(outdir, os.path.splitext(os.path.basename(path))[0] + ".png")
      visualize.draw_detections(im, boxes, labels, scores, names).save(png)
      logging.info("%s: %d detection(s) -> %s", path, len(scores), png)
  with open(os.path.join(outdir, "detections.json"), "w") as f:
    json.dump(records, f, indent=2)
  return records


def _define_flags() -> None:
  # Only when run as a program: other entry points (ssdjax.demo) import predict_files and own
  # flags of the same names.
  flags.DEFINE_string("workdir", None, "A workdir written by ssdjax.main (config + checkpoints).")
  flags.DEFINE_string("outdir", None, "Where to write detections.json and PNGs.")
  flags.DEFINE_float("min_score", 0.3, "Detections below this score are not drawn or listed.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  files = argv[1:]
  if not files:
    raise app.UsageError("give one or more image files after the flags")
  fl = flags.FLAGS
  outdir = fl.outdir or os.path.join(fl.workdir, "predictions")
  records = predict_files(fl.workdir, files, outdir, min_score=fl.min_score, step=fl.step)
  total = sum(len(r["detections"]) for r in records)
  print(f"{total} detection(s) in {len(records)} image(s); written to {outdir}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
