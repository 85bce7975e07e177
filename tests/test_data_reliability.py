"""Reliability of the input pipeline end to end: bad data never trains, workers never outlive the
trainer, shared memory never leaks.

* ``bad_records="skip"`` drops the whole image of a bad annotation, so no image trains one of its
  objects as background; every bad entry is logged once and counted.
* A truncated image is found when the source is built, not each time it is drawn.
* Input worker processes end with a trainer killed by SIGKILL, and a closed pipeline leaves no
  shared memory for the resource tracker to warn about.
"""

import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil
import pytest

from tests.datasets import coco_json_split, salt_coco_json, truncate
from tests.helpers import REPO, load_config, subprocess_env
from ssdjax import data
from ssdjax.data import pipeline, records

_CATEGORIES = [{"id": 4, "name": "ant"}, {"id": 9, "name": "bee"}, {"id": 2, "name": "cow"}]


def _coco_config(data_dir, *, batch_size, bad_records="skip"):
  """The synthetic config on a COCO-JSON folder of the default layout, augmentation off, so that
  each training image can be told by its pixels."""
  c = load_config("synthetic.py")
  c.data.source, c.data.data_dir = "coco_json", str(data_dir)
  c.data.train, c.data.eval = ("train",), "val"
  c.data.bad_records = bad_records
  c.data.num_workers = 0
  c.train.batch_size = batch_size
  c.image_size = 32
  for field in ("photometric", "expand", "random_crop", "hflip"):
    c.augment[field] = False
  return c


def _coco_folder(data_dir, num_train):
  """train: ``num_train`` noise images, one box of each category each; val: 2 images."""
  for split, n, seed in (("train", num_train, 0), ("val", 2, 1)):
    coco_json_split(os.path.join(data_dir, "annotations", f"{split}.json"),
                    os.path.join(data_dir, "images", split), _CATEGORIES, num_images=n,
                    seed=seed)
  return os.path.join(data_dir, "annotations", "train.json")


def _image_ids_in_batch(batch, data_dir, config, num_train):
  """The COCO image id of each image of a training batch, found by its pixels."""
  inputs = np.stack([
      data.preprocess(records.load_image(os.path.join(data_dir, "images", "train",
                                                      f"img_0_{k}.jpg")), config)
      for k in range(num_train)])  # [num_train, S, S, 3]
  ids = []
  for image in batch["images"]:
    diff = np.abs(inputs - image[None]).mean(axis=(1, 2, 3))  # [num_train]
    assert diff.min() < 1e-4, diff  # it is one of the files
    ids.append(int(diff.argmin()) + 1)
  return ids


def test_skip_drops_every_image_with_a_bad_annotation_from_training(tmp_path, caplog):
  num_train, salted = 8, [2, 5, 7]
  ann_file = _coco_folder(tmp_path, num_train)
  salt_ids = salt_coco_json(ann_file, salted)  # outside, zero width, unknown category
  good = sorted(set(range(1, num_train + 1)) - set(salted))
  config = _coco_config(tmp_path, batch_size=len(good))
  with caplog.at_level(logging.WARNING):
    config = data.resolve_classes(config)
    source = pipeline.train_source(config)
    it = data.make_train_iterator(config, seed=0)
    batches = [next(it) for _ in range(3)]  # one epoch each
  assert [source.annotation(i)["image_id"] for i in range(len(source))] == good
  for batch in batches:
    # Every good image once per epoch with all 3 of its objects; a salted image never, neither
    # with its good objects nor as a negative.
    assert sorted(_image_ids_in_batch(batch, tmp_path, config, num_train)) == good
    assert batch["gt_mask"].sum(axis=1).tolist() == [3] * len(good)
  assert source.skipped["bad_entries"] == len(salted)
  assert source.skipped["images"] == len(salted)
  assert source.skipped["annotations"] == 4 * len(salted)  # the bad one and the 3 good ones
  per_entry = [m for m in caplog.messages if m.endswith("(config.data.bad_records='skip')")]
  assert len(per_entry) == len(salted)
  for ann_id, image_id in zip(salt_ids, salted):
    logged = [m for m in per_entry if f"annotation id {ann_id} " in m]
    assert len(logged) == 1 and f"image id {image_id} dropped" in logged[0], logged
  summary = [m for m in caplog.messages if "bad entries" in m]
  assert len(summary) == 1 and summary[0].startswith(f"{ann_file}: {len(salted)} bad entries")

  with pytest.raises(ValueError, match=rf"{ann_file}: annotation id {salt_ids[0]} .*img_0_1\.jpg.*"
                                       r"outside.*bad_records='skip'"):
    data.make_train_iterator(_coco_config(tmp_path, batch_size=5, bad_records="raise"), seed=0)


def test_truncated_jpeg_is_handled_when_the_source_is_built(tmp_path, caplog):
  num_train = 5
  ann_file = _coco_folder(tmp_path, num_train)
  cut = os.path.join(tmp_path, "images", "train", "img_0_3.jpg")  # image id 4
  truncate(cut)
  with pytest.raises(ValueError, match=rf"image id 4: {cut}: truncated image file .*FF D9"):
    data.make_train_iterator(_coco_config(tmp_path, batch_size=4, bad_records="raise"), seed=0)
  config = _coco_config(tmp_path, batch_size=4)
  with caplog.at_level(logging.WARNING):
    config = data.resolve_classes(config)
    it = data.make_train_iterator(config, seed=0)
    batches = [next(it) for _ in range(4)]  # four epochs: the file is never drawn
  source = pipeline.train_source(config)
  assert source.skipped["bad_entries"] == 1 and source.skipped["images"] == 1
  for batch in batches:
    inputs = [np.abs(batch["images"] - data.preprocess(records.load_image(
        os.path.join(tmp_path, "images", "train", f"img_0_{k}.jpg")), config)).mean(axis=(1, 2, 3))
        for k in (0, 1, 2, 4)]
    assert all(d.min() < 1e-4 for d in inputs)  # the 4 good images, each once
  about_cut = [m for m in caplog.messages if "img_0_3.jpg" in m and "bad entries" not in m]
  assert len(about_cut) == 1 and "truncated image file" in about_cut[0], about_cut
  assert any(m.startswith(f"{ann_file}: 1 bad entries") for m in caplog.messages)


# Builds the synthetic training iterator with 2 worker processes, draws batches, prints the pids
# of every process it started, then blocks until it is killed.
_KILLED_TRAINER = """
import json, time
import psutil
from tests.helpers import small_config
from ssdjax import data
it = data.make_train_iterator(small_config(**{"data.num_workers": 2}), seed=0)
for _ in range(3):
  next(it)
print(json.dumps([p.pid for p in psutil.Process().children(recursive=True)]), flush=True)
time.sleep(600)
"""


def _alive(process: psutil.Process) -> bool:
  try:  # an orphan that nobody reaps stays a zombie: it has ended
    return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
  except psutil.NoSuchProcess:
    return False


def test_workers_end_when_the_trainer_is_killed():
  with tempfile.TemporaryFile("w+") as stderr:
    trainer = subprocess.Popen([sys.executable, "-c", _KILLED_TRAINER], cwd=REPO,
                               env=subprocess_env(), stdout=subprocess.PIPE, stderr=stderr,
                               text=True)
    children = []
    try:
      ready, _, _ = select.select([trainer.stdout], [], [], 300)
      line = trainer.stdout.readline() if ready else ""
      stderr.seek(0)
      assert line, f"the trainer printed no pids:\n{stderr.read()[-3000:]}"
      children = [psutil.Process(pid) for pid in json.loads(line)]
      workers = [p for p in children if "spawn_main" in " ".join(p.cmdline())]
      assert len(workers) == 2, [p.cmdline() for p in children]
      trainer.send_signal(signal.SIGKILL)
      trainer.wait()
      deadline = time.monotonic() + 10
      while any(map(_alive, children)) and time.monotonic() < deadline:
        time.sleep(0.1)
      # The workers, and the resource tracker that waits for them.
      assert not [p.cmdline() for p in children if _alive(p)]
    finally:
      if trainer.poll() is None:
        trainer.kill()
        trainer.wait()
      for p in children:
        if _alive(p):
          p.kill()


# One training iterator and one eval pass with worker processes, then a normal exit; in a
# function, as the trainer holds them.
_SHORT_RUN = """
from tests.helpers import small_config
from ssdjax import data

def run():
  config = small_config(**{"data.num_workers": 2})
  it = data.make_train_iterator(config, seed=0)
  for _ in range(3):
    next(it)
  it.close()
  print(sum(int(b["valid"].sum()) for b in data.make_eval_batches(config, batch_size=4)))

run()
"""


def test_a_closed_pipeline_leaves_no_shared_memory():
  out = subprocess.run([sys.executable, "-c", _SHORT_RUN], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["8"]  # every eval image
  assert "leaked shared_memory" not in out.stderr, out.stderr[-3000:]
  assert "Exception ignored" not in out.stderr, out.stderr[-3000:]
