r"""Head ablation: trains one config once per (head, seed) and tabulates accuracy, size and speed.

  python experiments/head_ablation.py --workdir=runs/heads
  python experiments/head_ablation.py --workdir=runs/heads --heads=ssd,dense --seeds=0,1 \
      --steps=500 --set train.batch_size=16 --set optimizer.learning_rate=1e-3

Each run trains ``--config`` (default configs/synthetic.py) with ``config.model.head`` and
``config.seed`` set, in ``<workdir>/<head>/seed<k>``, through ``ssdjax.train.train_and_evaluate``.
``--heads`` takes registered names and import paths ``package.module:Name`` of heads written
outside ssdjax (their folder is then ``package.module-Name``), e.g.
``--heads=ssd,shared,experiments.custom_head.parts:TwoConvHead``.
Rerunning the command resumes unfinished runs from their checkpoints and reuses finished ones (a run
is finished when it holds ``final_metrics.json`` for the same number of steps; a finished run whose
other config fields differ is reused with a note: use a new workdir to retrain). ``--set``
overrides any config field by its dotted path, parsed by the field's type as ``--config.<field>``
of ``ssdjax.main`` is; an unknown field is an error.

Writes ``<workdir>/results.md`` (printed too) and ``<workdir>/results.json``: per head the parameter
count, VOC07 mAP@0.5 and COCO AP as mean ± sample std over seeds (no std for one seed), and the
training speed in images/s: per run the median over its logged intervals after the first (which
includes compilation), averaged over seeds. Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from ssdjax import cli
from ssdjax import models
from ssdjax import train
from ssdjax.errors import UserError


def load_config(path: str, overrides: list[str]):
  """Loads ``get_config()`` from ``path`` and applies ``field=value`` overrides (dotted paths),
  parsed by the field's type as ``--config.<field>`` of ``ssdjax.main`` is; every field checked."""
  return cli.load_config(path, overrides)


def count_params(config) -> int:
  """Number of parameters of the config's model (shapes only: nothing is computed); the config's
  class names must be resolved (``train.prepare_config``)."""
  model = models.from_config(config)
  images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"])))


def images_per_sec(workdir: str) -> float:
  """Median train throughput over logged intervals, leaving out the first (compilation)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  speeds = [r["train/images_per_sec"] for r in rows if "train/images_per_sec" in r]
  return float(np.median(speeds[1:] or speeds)) if speeds else float("nan")


def run_one(config, workdir: str) -> tuple[dict, bool]:
  """(final metrics, reused) of one run; trains (or resumes) unless it already finished."""
  final_path = os.path.join(workdir, "final_metrics.json")
  if os.path.exists(final_path):
    with open(os.path.join(workdir, "config.json")) as f:
      saved = json.load(f)
    if saved["train"]["num_steps"] == config.train.num_steps:  # else: resume to the new length
      if saved != json.loads(train.prepare_config(config).to_json_best_effort()):
        print(f"  note: {workdir} was trained with another config; reusing it (new --workdir to "
              "retrain)", flush=True)
      with open(final_path) as f:
        return json.load(f), True
  # The train step's retrace guard counts traces per call site, and every run here builds its
  # Trainer from the same one: each run starts with a fresh count.
  return train.train_and_evaluate(config, workdir, progress=sys.stderr.isatty()), False


def head_dir(head: str) -> str:
  """A folder name for a head: its registered name, or its import path with ':' as '-'."""
  return head.replace(":", "-")


def _mean_std(values):
  values = np.asarray(values, np.float64)
  return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def _fmt(mean, std):
  return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--config", default="configs/synthetic.py")
  parser.add_argument("--heads", default=",".join(models.heads.REGISTRY.builtin_names()),
                      help="comma-separated head names or import paths 'package.module:Name' "
                      "(default: every built-in head)")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
  parser.add_argument("--steps", type=int, default=None, help="overrides config.train.num_steps")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="config override, e.g. --set train.batch_size=16 (repeatable)")
  args = parser.parse_args(argv)
  heads = [h for h in args.heads.split(",") if h]
  try:
    for h in heads:
      models.heads.get(h)  # a name or an import path that resolves
    seeds = [int(s) for s in args.seeds.split(",") if s]
    base = load_config(args.config, args.set)
  except ValueError as e:
    parser.error(str(e))
  if not heads or not seeds:
    parser.error("--heads and --seeds need at least one entry each")
  if args.steps is not None:
    base.train.num_steps = args.steps

  def run_config(head, seed):
    config = base.copy_and_resolve_references()
    config.model.head, config.seed = head, seed
    return config

  try:  # traces every model now, so a head that does not fit the config stops the sweep early
    params = {head: count_params(train.prepare_config(run_config(head, seeds[0])))
              for head in heads}
  except ValueError as e:
    parser.error(str(e))
  rows, total, i = [], len(heads) * len(seeds), 0
  for head in heads:
    runs = []
    for seed in seeds:
      i += 1
      config = run_config(head, seed)
      workdir = os.path.join(args.workdir, head_dir(head), f"seed{seed}")
      print(f"[{i}/{total}] head={head} seed={seed}: {workdir}", flush=True)
      t0 = time.perf_counter()
      final, reused = run_one(config, workdir)
      run = {"seed": seed, "workdir": workdir, "images_per_sec": images_per_sec(workdir),
             "voc07_map": final.get("voc07/mAP", float("nan")),
             "coco_ap": final.get("coco/AP", float("nan"))}
      runs.append(run)
      print(f"[{i}/{total}] head={head} seed={seed}: {'reused' if reused else 'trained'} in "
            f"{time.perf_counter() - t0:.1f}s, VOC07 mAP {run['voc07_map']:.4f}, COCO AP "
            f"{run['coco_ap']:.4f}, {run['images_per_sec']:.1f} img/s", flush=True)
    voc, voc_std = _mean_std([r["voc07_map"] for r in runs])
    coco, coco_std = _mean_std([r["coco_ap"] for r in runs])
    rows.append({"head": head, "params": params[head], "voc07_map_mean": voc,
                 "voc07_map_std": voc_std, "coco_ap_mean": coco, "coco_ap_std": coco_std,
                 "images_per_sec_mean": float(np.mean([r["images_per_sec"] for r in runs])),
                 "num_seeds": len(runs), "runs": runs})

  lines = ["| head | params | mAP@0.5 VOC07 | COCO AP | train img/s | seeds |",
           "|---|---:|---:|---:|---:|---:|"]
  lines += [f"| {r['head']} | {r['params']:,} | {_fmt(r['voc07_map_mean'], r['voc07_map_std'])} | "
            f"{_fmt(r['coco_ap_mean'], r['coco_ap_std'])} | {r['images_per_sec_mean']:.1f} | "
            f"{r['num_seeds']} |" for r in rows]
  table = "\n".join(lines) + "\n"
  results = {"config": args.config, "overrides": args.set, "num_steps": base.train.num_steps,
             "seeds": seeds, "rows": rows}
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "results.md"), "w") as f:
    f.write(f"Head ablation: {args.config}, {base.train.num_steps} steps, overrides {args.set}\n\n")
    f.write(table)
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  print(table, end="")
  return results


if __name__ == "__main__":
  main()
