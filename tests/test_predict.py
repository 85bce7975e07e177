"""Prediction CLI and drawing: boxes are drawn where detections.json says, and nowhere else."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFont

from tests.helpers import SHAPE_CLASSES
from ssdjax import predict
from ssdjax import train
from ssdjax import visualize
from tests.helpers import REPO, small_config, subprocess_env

NAMES = SHAPE_CLASSES
# PIL draws a width-2 outline inside [int(x0), int(x1)]; captions are 11 px above the box, and the
# default font's descenders reach one row further.
LINE = 2
CAPTION_ROWS = 13


def _cli(workdir, outdir, files, *extra) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "ssdjax.predict", f"--workdir={workdir}",
                           f"--outdir={outdir}", *extra, *files], env=subprocess_env(), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 2-step run and a noise image (so any drawn pixel shows) of a size unlike the model's."""
  root = tmp_path_factory.mktemp("predict")
  workdir = str(root / "run")
  train.train_and_evaluate(small_config(**{"train.num_steps": 2, "train.checkpoint_every": 2}),
                           workdir, progress=False)
  image = np.random.default_rng(0).integers(0, 256, size=(288, 320, 3), dtype=np.uint8)
  path = str(root / "noise.png")
  Image.fromarray(image).save(path)
  return workdir, path, image


def _edges(box_xyxy):
  """Pixel box (floats) -> (left col, top row, right col, bottom row) that the outline covers."""
  x0, y0, x1, y1 = (int(round(v)) for v in box_xyxy)
  # PIL truncates float corners; round(x0) and round(x1) - 1 lie on the 2-px line either way.
  return x0, y0, x1 - 1, y1 - 1


def _caption_top(y0: float) -> int:
  return int(max(y0 - 11, 0))


def _drawn_mask(det, height, width, caption_chars=None) -> np.ndarray:
  """bool [H, W]: a generous superset of the pixels that drawing ``det`` may change."""
  x0, y0, x1, y1 = _edges(det["box_xyxy"])
  mask = np.zeros((height, width), bool)
  m = LINE + 1
  for c in (x0, x1):
    mask[max(y0 - m, 0):y1 + m + 1, max(c - m, 0):c + m + 1] = True
  for r in (y0, y1):
    mask[max(r - m, 0):r + m + 1, max(x0 - m, 0):x1 + m + 1] = True
  chars = caption_chars or len(f"{det['class_name']} {det['score']:.2f}")
  top = _caption_top(det["box_xyxy"][1])
  mask[max(top - 1, 0):top + CAPTION_ROWS + 1, max(x0 - 2, 0):x0 + 8 * chars + 6] = True
  return mask


def _outline_points(det, height):
  """(row, col) on the left, right and bottom edges, below the caption."""
  x0, y0, x1, y1 = _edges(det["box_xyxy"])
  first = _caption_top(det["box_xyxy"][1]) + CAPTION_ROWS
  pts = [(r, c) for r in range(first, min(y1, height)) for c in (x0, x1)]
  if y1 >= first and y1 < height:
    pts += [(y1, c) for c in range(x0, x1 + 1)]
  return pts


def _check_drawing(dets, drawn, original, *, require_points=True):
  """Outlines have the class colour unless a better box covers them; elsewhere nothing changed.

  dets are sorted by score, best first; the best is drawn last, on top.
  """
  h, w = original.shape[:2]
  masks = [_drawn_mask(d, h, w) for d in dets]
  for i, det in enumerate(dets):
    colour = np.array(visualize.class_colour(det["label"]), np.uint8)
    better = np.zeros((h, w), bool)
    for m in masks[:i]:
      better |= m
    pts = [(r, c) for r, c in _outline_points(det, h) if c < w and not better[r, c]]
    if require_points:
      assert pts, f"detection {i}: no outline pixel to check"
    for r, c in pts:
      assert np.array_equal(drawn[r, c], colour), (i, det, r, c, drawn[r, c], colour)
  untouched = ~np.any(masks, axis=0)
  assert untouched.mean() > 0.2
  np.testing.assert_array_equal(drawn[untouched], original[untouched])


def test_predict_files_draws_boxes_where_detections_say(run, tmp_path):
  workdir, path, image = run
  h, w = image.shape[:2]
  missing = str(tmp_path / "no_such_image.png")
  failing = _cli(workdir, str(tmp_path / "failed"), [missing])  # runs while the rest runs here
  try:
    # All detections: the listing itself.
    records = predict.predict_files(workdir, [path], str(tmp_path / "all"), min_score=0.0)
    with open(tmp_path / "all" / "detections.json") as f:
      assert json.load(f) == json.loads(json.dumps(records))
    (rec,) = records
    assert (rec["width"], rec["height"], rec["checkpoint_step"]) == (w, h, 2)
    assert rec["file"] == os.path.abspath(path)
    dets = rec["detections"]
    assert 0 < len(dets) <= 200
    scores = [d["score"] for d in dets]
    assert scores == sorted(scores, reverse=True)
    for d in dets:
      assert 1 <= d["label"] <= len(NAMES) and d["class_name"] == NAMES[d["label"] - 1]
      assert d["category_id"] == d["label"]  # synthetic data: labels are their own ids
      expected = np.round(np.array(d["box_normalized"], np.float64) * [w, h, w, h], 2)
      np.testing.assert_allclose(d["box_xyxy"], expected, atol=1e-9)

    # The three best: each drawn with its class colour (where no better box covers it); no other
    # pixel changed.
    third = scores[min(2, len(scores) - 1)]
    few = predict.predict_files(workdir, [path], str(tmp_path / "few"),
                                min_score=third)[0]["detections"]
    assert [d["score"] for d in few] == [s for s in scores if s >= third]
    assert len(few) <= 8, "too many ties to check the drawing"
    drawn = np.asarray(Image.open(tmp_path / "few" / "noise.png").convert("RGB"))
    assert drawn.shape == image.shape
    _check_drawing(few, drawn, image, require_points=False)
    assert _outline_points(few[-1], h), "the last-drawn box has nothing below its caption"

    # The CLI with only the top detection: its whole outline is checked.
    out = str(tmp_path / "top")
    top = _cli(workdir, out, [path], f"--min_score={scores[0]!r}", "--min_draw_side=0")
    stdout, stderr = top.communicate(timeout=300)
    assert top.returncode == 0, stderr[-3000:]
    assert out in stdout
    with open(os.path.join(out, "detections.json")) as f:
      (cli_rec,) = json.load(f)
    assert cli_rec["detections"] == [d for d in dets if d["score"] >= scores[0]]
    drawn = np.asarray(Image.open(os.path.join(out, "noise.png")).convert("RGB"))
    _check_drawing(cli_rec["detections"], drawn, image)
    d0 = cli_rec["detections"][0]
    x0, y0, x1, y1 = _edges(d0["box_xyxy"])
    mid = ((_caption_top(d0["box_xyxy"][1]) + CAPTION_ROWS + y1) // 2, x0)  # left edge, below caption
    assert np.array_equal(drawn[mid], visualize.class_colour(d0["label"]))
    assert not np.array_equal(image[mid], drawn[mid])

    # A missing image: non-zero exit, and the message names the file.
    _, stderr = failing.communicate(timeout=300)
    assert failing.returncode != 0
    assert "no_such_image.png" in stderr and "not found" in stderr
  finally:
    if failing.poll() is None:
      failing.kill()
      failing.wait()


def _expected_caption_width(caption: str) -> int:
  return int(ImageFont.load_default().getlength(caption)) + 2


def _shade(pixels, colour) -> np.ndarray:
  """[..., 3] -> [...] t in [0, 1] with pixel = t * colour (black text antialiased on the colour),
  or -1 where the pixel is no such shade."""
  p, c = pixels.astype(np.float64), np.asarray(colour, np.float64)
  t = (p @ c) / (c @ c)
  ok = np.all(np.abs(p - t[..., None] * c) <= 2.0, axis=-1)
  return np.where(ok, t, -1.0)


def test_draw_detections_on_a_plain_image():
  grey = (50, 60, 70)
  image = np.empty((100, 120, 3), np.uint8)
  image[:] = grey
  before = image.copy()
  boxes = np.array([[0.25, 0.4, 0.75, 0.9],     # label 2: pixels (30, 40) - (90, 90)
                    [0.05, 0.05, 0.2, 0.2]])    # label 0: background, never drawn
  names = ("aa", "bb")
  drawn = np.asarray(visualize.draw_detections(image, boxes, [2, 0], [0.87, 0.99], names))
  np.testing.assert_array_equal(image, before)  # the input is not drawn on
  assert drawn.shape == image.shape and drawn.dtype == np.uint8
  colour = np.array(visualize.class_colour(2), np.uint8)
  assert not np.array_equal(colour, visualize.class_colour(1))

  # The outline: 2 px inside the box on every side.
  ring = np.zeros((100, 120), bool)
  ring[40:91, 30:91] = True
  ring[42:89, 32:89] = False
  assert np.all(drawn[ring] == colour)
  # The inside is untouched.
  np.testing.assert_array_equal(drawn[42:89, 32:89], before[42:89, 32:89])

  # The caption: a colour strip above the box (rows 29..40), as wide as "bb 0.87" in the default
  # font, with dark text pixels on it.
  width = _expected_caption_width("bb 0.87")
  shade = _shade(drawn[29:40, 30:30 + width + 1], colour)
  assert np.all(shade >= 0)
  assert np.mean(shade == 1.0) > 0.5 and np.sum(shade < 0.5) >= 10
  np.testing.assert_array_equal(drawn[29:40, 30 + width + 1:], before[29:40, 30 + width + 1:])

  # Nothing else changed: in particular the label-0 box was not drawn.
  changed = np.any(drawn != before, axis=-1)
  allowed = ring.copy()
  allowed[29:41, 30:30 + width + 1] = True
  assert not np.any(changed & ~allowed)
  assert not np.any(changed[:30, :30])

  # Ground truth (no scores): the caption is the name alone, so narrower.
  gt = np.asarray(visualize.draw_detections(image, boxes[:1], [2], None, names))
  narrow = _expected_caption_width("bb")
  assert narrow < width
  assert np.all(_shade(gt[29:40, 30:30 + narrow + 1], colour) >= 0)
  np.testing.assert_array_equal(gt[29:40, 30 + narrow + 1:], before[29:40, 30 + narrow + 1:])


def test_class_colours_cycle_through_a_fixed_palette():
  colours = [visualize.class_colour(label) for label in range(1, 21)]
  assert len(set(colours)) == 20
  assert visualize.class_colour(21) == colours[0]
  assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in colours)


def test_to_pixels():
  np.testing.assert_allclose(visualize.to_pixels(np.array([[0.1, 0.2, 0.5, 1.0]]), 200, 100),
                             [[20.0, 20.0, 100.0, 100.0]])


def test_the_most_confident_box_is_drawn_on_top():
  image = np.full((100, 100, 3), 128, np.uint8)
  # Two boxes whose left edges coincide (x = 20 px); the less confident one is listed first.
  boxes = np.array([[0.2, 0.3, 0.8, 0.9], [0.2, 0.2, 0.6, 0.7]], np.float32)
  for scores, top in (([0.3, 0.9], 1), ([0.9, 0.3], 0)):
    labels = [1, 2]
    drawn = np.asarray(visualize.draw_detections(image, boxes, labels, scores, ("a", "b")))
    np.testing.assert_array_equal(drawn[50, 20], visualize.class_colour(labels[top]))


def test_inputs_are_files_folders_and_globs(tmp_path):
  folder = tmp_path / "photos"
  folder.mkdir()
  for name in ("b.png", "a.jpg", "notes.txt"):
    (folder / name).write_bytes(b"x")
  (folder / "sub").mkdir()
  single = tmp_path / "one.png"
  single.write_bytes(b"x")
  got = predict.expand_inputs([str(single), str(folder), str(tmp_path / "photos" / "*.png")])
  assert got == [str(single), str(folder / "a.jpg"), str(folder / "b.png"), str(folder / "b.png")]
  with pytest.raises(ValueError, match=r"image file .*nope.png not found.*pattern .*\*.gif"):
    predict.expand_inputs([str(tmp_path / "nope.png"), str(tmp_path / "*.gif")])
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="holds no image file"):
    predict.expand_inputs([str(tmp_path / "empty")])


def test_bad_file_is_skipped_others_kept_and_outputs_never_overwritten(run, tmp_path):
  workdir, path, image = run
  images = tmp_path / "in"
  images.mkdir()
  good_a, good_b = images / "a.png", images / "c.png"
  Image.fromarray(image).save(good_a)
  Image.fromarray(image[:100, :90]).save(good_b)
  payload = good_a.read_bytes()
  (images / "b.png").write_bytes(payload[: len(payload) // 3])  # header fine, pixels cut off
  out = subprocess.run([sys.executable, "-m", "ssdjax.predict", f"--workdir={workdir}",
                        "--min_score=0.0", str(images)], env=subprocess_env(), cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-3000:]
  assert "1 file(s) could not be read" in out.stdout and "b.png" in out.stdout
  first = os.path.join(workdir, "predictions", "step_2")
  with open(os.path.join(first, "detections.json")) as f:
    records = json.load(f)
  assert [os.path.basename(r["file"]) for r in records] == ["a.png", "b.png", "c.png"]
  assert "error" in records[1] and records[1]["detections"] == []
  assert "cannot decode" in records[1]["error"]
  assert records[0]["detections"] and (records[2]["width"], records[2]["height"]) == (90, 100)
  assert sorted(os.listdir(first)) == ["a.png", "c.png", "detections.json"]
  # The small image was drawn on an upscaled copy (default --min_draw_side=384): 5 x 90 >= 384.
  with Image.open(os.path.join(first, "c.png")) as drawn:
    assert drawn.size == (450, 500)
  before = os.path.getmtime(os.path.join(first, "detections.json"))

  # The same command again writes a new folder; the first is left as it was.
  again = predict.predict_files(workdir, [str(good_a)], min_score=0.0)
  assert again.outdir == first + "-2"
  assert os.path.getmtime(os.path.join(first, "detections.json")) == before
  with open(os.path.join(first + "-2", "detections.json")) as f:
    assert json.load(f)[0]["detections"] == records[0]["detections"]


def test_small_images_are_drawn_on_an_integer_upscaled_copy():
  image = np.random.default_rng(3).integers(0, 256, (50, 70, 3), np.uint8)
  assert visualize.upscale_factor(70, 50, 0) == 1 and visualize.upscale_factor(70, 50, 50) == 1
  assert visualize.upscale_factor(70, 50, 120) == 3  # 2 x 50 < 120 <= 3 x 50
  drawn = np.asarray(visualize.draw_detections(image, np.array([[0.5, 0.5, 0.9, 0.9]]), [1],
                                               [0.5], ("a",), min_side=120))
  assert drawn.shape == (150, 210, 3)
  # Away from the box and its caption every pixel is the input's, repeated 3 x 3.
  np.testing.assert_array_equal(drawn[:60, :90], np.repeat(np.repeat(image[:20, :30], 3, 0), 3, 1))
  colour = visualize.class_colour(1)
  assert np.array_equal(drawn[100, 105], colour)  # left edge of the box at x = 0.5 * 210
