"""The README's research-code example runs as written and gives sane values."""

import os

import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_composing_example_runs():
  text = open(README).read()
  section = text.index("## Composing the functions in research code")
  start = text.index("```python", section) + len("```python")
  code = text[start:text.index("```", start)]
  scope: dict = {}
  exec(compile(code, "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert np.isfinite(float(scope["loss"])) and float(scope["loss"]) > 0
  grads = scope["grads"]
  assert grads[0].shape == (1, 8732, 4) and grads[1].shape == (1, 8732, 21)
  assert np.abs(np.asarray(grads[0])).sum() > 0  # matched anchors pull on the box offsets
  assert scope["dets"].boxes.shape == (1, 200, 4)
