r"""The Quick start job: train the default config on synthetic shapes, evaluate, draw predictions.

  python -m ssdjax.demo --workdir=runs/demo [--config=configs/synthetic.py] [--num_images=8]

Rerunning resumes from the workdir's checkpoint (a finished run only evaluates and draws again).
Writes ``<workdir>/demo_images/*.png`` (validation images) and ``<workdir>/predictions/step_<N>/``
(the same images with the detected boxes drawn, plus detections.json; a rerun writes a new folder).
``--config.FIELD=VALUE`` overrides fields as for ``ssdjax.main``.
"""

import json
import os

from absl import flags
from absl import logging

from ssdjax import cli

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "synthetic.py")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Run directory.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "Validation images to draw predictions on.")


def main(argv):
  del argv
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from ssdjax import data, predict, train  # pylint: disable=g-import-not-at-top

  config, workdir = cli.parsed_config(default=DEFAULT_CONFIG), _WORKDIR.value
  logging.set_verbosity(logging.INFO)
  metrics = train.train_and_evaluate(config, workdir)
  config = train.load_config(workdir)  # as recorded: with the class names of the data

  source = data.make_source(config, config.data.eval)
  image_dir = os.path.join(workdir, "demo_images")
  os.makedirs(image_dir, exist_ok=True)
  files = []
  for i in range(min(_NUM_IMAGES.value, len(source))):
    path = os.path.join(image_dir, f"val_{i:03d}.png")
    Image.fromarray(source[i]["image"]).save(path)
    files.append(path)
  records = predict.predict_files(workdir, files, min_score=0.4, min_draw_side=384)
  outdir = records.outdir

  headline = {k: round(v, 4) for k, v in metrics.items() if "/AP/" not in k}
  print(json.dumps(headline, indent=2, sort_keys=True))
  print(f"validation mAP@0.5 (VOC07 11-point): {metrics.get('voc07/mAP', float('nan')):.3f}, "
        f"COCO AP: {metrics.get('coco/AP', float('nan')):.3f}")
  print(f"{sum(len(r['detections']) for r in records)} detections drawn on {len(records)} images in "
        f"{outdir}; metrics in {os.path.join(workdir, 'metrics.jsonl')}")


if __name__ == "__main__":
  cli.run(main)
