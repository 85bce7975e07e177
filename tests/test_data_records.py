"""Tests for ssdjax.data.records: record building, box checks, image loading, concatenation."""

import io
import logging

import numpy as np
import PIL.Image
import pytest

from ssdjax.data import records


def _record(n, file="f"):
  boxes = np.tile(np.array([[0.1, 0.2, 0.5, 0.6]], np.float32), (n, 1))
  return records.make_record(np.zeros((4, 4, 3), np.uint8), boxes, np.arange(1, n + 1),
                             image_id=7, file=file)


def test_make_record_dtypes_and_defaults():
  r = records.make_record(np.zeros((2, 3, 3), np.uint8), [[0, 0, 1, 1]], [3], image_id=np.int64(5),
                          file="x.jpg")
  assert r["boxes"].dtype == np.float32 and r["boxes"].shape == (1, 4)
  assert r["labels"].dtype == np.int32 and r["labels"].tolist() == [3]
  assert r["difficult"].tolist() == [False] and r["is_crowd"].tolist() == [False]
  assert type(r["image_id"]) is int and r["file"] == "x.jpg"
  empty = records.make_record(None, [], [], image_id=1, file="e")
  assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and "image" not in empty


def test_select_boxes_filters_every_per_box_field_together():
  r = records.make_record(None, [[0, 0, .1, .1], [0, 0, .2, .2], [0, 0, .3, .3]], [1, 2, 3],
                          difficult=[True, False, True], is_crowd=[False, True, False],
                          image_id=0, file="f")
  out = records.select_boxes(r, np.array([True, False, True]))
  assert out["labels"].tolist() == [1, 3]
  assert out["difficult"].tolist() == [True, True] and out["is_crowd"].tolist() == [False, False]
  np.testing.assert_allclose(out["boxes"][:, 2], [0.1, 0.3])
  assert r["labels"].tolist() == [1, 2, 3]  # input untouched


@pytest.mark.parametrize("box,label,fragment", [
    ([0.1, 0.1, 0.1, 0.5], 1, "zero area"),
    ([0.5, 0.1, 0.2, 0.5], 1, "zero area"),
    ([-0.1, 0.1, 0.2, 0.5], 1, "outside [0, 1]"),
    ([0.1, 0.1, 1.2, 0.5], 1, "outside [0, 1]"),
    ([0.1, np.nan, 0.2, 0.5], 1, "NaN"),
    ([0.1, 0.1, 0.2, 0.5], 0, "label 0"),
    ([0.1, 0.1, 0.2, 0.5], 5, "label 5"),
])
def test_box_problem_names_the_problem(box, label, fragment):
  assert fragment in records.box_problem(box, label, num_classes=5)


def test_box_problem_accepts_valid_boxes():
  assert records.box_problem([0, 0, 1, 1], 4, num_classes=5) is None
  assert records.box_problem([0.1, 0.1, 0.1001, 0.1001], 1, num_classes=2) is None  # tiny is fine


def test_clean_boxes_raise_or_drop_the_whole_record_once(caplog):
  # A file name of this test alone: clean_boxes reports a record once per process.
  r = records.make_record(None, [[0.1, 0.1, 0.5, 0.5], [0.3, 0.3, 0.3, 0.6], [0.1, 0.1, 0.2, 0.2]],
                          [1, 2, 9], image_id=0, file="tfds:voc[3] (clean_boxes)")
  with pytest.raises(ValueError, match=r"tfds:voc\[3\] \(clean_boxes\): object 1: .*zero area.*"
                                       r"bad_records='skip'"):
    records.clean_boxes(r, num_classes=5, bad_records="raise")
  with caplog.at_level(logging.WARNING):
    # Drawn twice (two epochs): dropped both times, each bad box logged the first time only.
    assert records.clean_boxes(r, num_classes=5, bad_records="skip") is None
    assert records.clean_boxes(r, num_classes=5, bad_records="skip") is None
  per_box = [m for m in caplog.messages if "(clean_boxes): object" in m]
  assert len(per_box) == 2 and all("image dropped" in m for m in per_box)
  assert "object 1" in per_box[0] and "label 9" in per_box[1]
  good = records.make_record(None, [[0.1, 0.1, 0.5, 0.5]], [1], image_id=0, file="g")
  assert records.clean_boxes(good, num_classes=2, bad_records="raise") is good
  assert records.clean_boxes(good, num_classes=2, bad_records="skip") is good
  with pytest.raises(ValueError, match="bad_records='ignore'.*'raise', 'skip'"):
    records.clean_boxes(good, num_classes=2, bad_records="ignore")


def test_warn_once_per_key(caplog):
  with caplog.at_level(logging.WARNING):
    assert records.warn_once("test_warn_once_per_key:a", "first a")
    assert not records.warn_once("test_warn_once_per_key:a", "second a")
    assert records.warn_once("test_warn_once_per_key:b", "first b")
  assert caplog.messages == ["first a", "first b"]


def _encoded(fmt, size=(48, 64)):
  buf = io.BytesIO()
  PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, size + (3,), np.uint8)).save(
      buf, format=fmt)
  return buf.getvalue()


def test_truncation_problem_reads_the_end_marker(tmp_path):
  jpeg, png = _encoded("JPEG"), _encoded("PNG")
  files = {
      "ok.jpg": jpeg, "ok.png": png,
      "padded.jpg": jpeg + b"\0" * 300,      # zero padding after the end marker
      "trailer.jpg": jpeg + b"SEFH" * 400,    # a camera's trailer: decoded once, fine
      "trailer.png": png + b"extra bytes",
      "cut.jpg": jpeg[: len(jpeg) * 2 // 3], "cut.png": png[: len(png) * 2 // 3],
      "cut_before_marker.jpg": jpeg[:-2],
      "cut_in_iend.png": png[:-4],            # every pixel is there: decoded once, fine
  }
  for name, payload in files.items():
    (tmp_path / name).write_bytes(payload)
  PIL.Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "other.bmp")
  for name in ("ok.jpg", "ok.png", "padded.jpg", "trailer.jpg", "trailer.png", "cut_in_iend.png",
               "other.bmp"):
    assert records.truncation_problem(str(tmp_path / name)) is None, name
  for name, marker in (("cut.jpg", "JPEG end-of-image marker FF D9"),
                       ("cut.png", "PNG IEND chunk"),
                       ("cut_before_marker.jpg", "FF D9")):
    problem = records.truncation_problem(str(tmp_path / name))
    assert problem is not None and problem.startswith(str(tmp_path / name)), name
    assert "truncated image file" in problem and marker in problem, problem
  # The up-front check: the header of a cut file reads fine, read_image_sizes still rejects it.
  assert records.image_size(str(tmp_path / "cut.jpg")) == (48, 64)
  sizes = records.read_image_sizes([str(tmp_path / n) for n in ("ok.jpg", "cut.jpg", "cut.png")])
  assert sizes[0] == (48, 64)
  assert "cut.jpg: truncated image file" in sizes[1] and "cut.png: truncated" in sizes[2]


def test_box_iou_matches_jax_iou():
  from ssdjax import boxes as jboxes  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 0.6, (7, 2))
  a = np.concatenate([xy, xy + rng.uniform(0.05, 0.4, (7, 2))], 1)
  xy = rng.uniform(0, 0.6, (5, 2))
  b = np.concatenate([xy, xy + rng.uniform(0.05, 0.4, (5, 2))], 1)
  b[0] = [0.2, 0.2, 0.2, 0.5]  # degenerate
  np.testing.assert_allclose(records.box_iou(a, b), np.asarray(jboxes.iou(a, b)), atol=1e-6)
  # Hand case: two unit squares offset by half -> 1/3.
  np.testing.assert_allclose(records.box_iou([[0, 0, 1, 1]], [[0.5, 0, 1.5, 1]]), [[1 / 3]])


def test_load_image_and_errors(tmp_path):
  pixels = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
  PIL.Image.fromarray(pixels).save(tmp_path / "ok.png")
  PIL.Image.fromarray(pixels[..., 0]).save(tmp_path / "gray.png")
  np.testing.assert_array_equal(records.load_image(tmp_path / "ok.png"), pixels)
  gray = records.load_image(tmp_path / "gray.png")
  assert gray.shape == (5, 6, 3) and (gray[..., 1] == pixels[..., 0]).all()
  assert records.image_size(str(tmp_path / "ok.png")) == (5, 6)
  (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
  buf = io.BytesIO()
  PIL.Image.fromarray(np.full((64, 64, 3), 9, np.uint8)).save(buf, format="PNG")
  (tmp_path / "cut.png").write_bytes(buf.getvalue()[:60])
  with pytest.raises(ValueError, match=r"missing\.png: image file not found"):
    records.load_image(tmp_path / "missing.png")
  with pytest.raises(ValueError, match=r"junk\.jpg: cannot decode image"):
    records.load_image(tmp_path / "junk.jpg")
  with pytest.raises(ValueError, match=r"cut\.png: cannot decode image"):
    records.load_image(tmp_path / "cut.png")
  sizes = records.read_image_sizes([str(tmp_path / "ok.png"), str(tmp_path / "missing.png")])
  assert sizes[0] == (5, 6) and "missing.png: image file not found" in sizes[1]
  assert records.image_size(buf.getvalue(), name="bytes") == (64, 64)


def test_concat_source_indexing():

  class Src:
    def __init__(self, ids):
      self.ids = ids

    def __len__(self):
      return len(self.ids)

    def __getitem__(self, i):
      return self.ids[i]

    def annotation(self, i):
      return -self.ids[i]

  src = records.ConcatSource([Src([1, 2]), Src([]), Src([3, 4, 5])])
  assert len(src) == 5
  assert [src[i] for i in range(5)] == [1, 2, 3, 4, 5]
  assert src.annotation(4) == -5
  with pytest.raises(IndexError):
    src[5]  # pylint: disable=pointless-statement
  with pytest.raises(ValueError):
    records.ConcatSource([])


def test_split_spec_and_image_ids():
  assert records.split_spec("VOC2007:trainval") == ("VOC2007", "trainval")
  assert records.split_spec("trainval") == ("", "trainval")
  assert records.image_id_from_name("000005.jpg", 9) == 5
  assert records.image_id_from_name("2008_000002", 9) == 2008000002
  assert records.image_id_from_name("dir7/abc.jpg", 9) == 9
