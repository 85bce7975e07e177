"""Checkpoints that are never trusted blindly, and resumes that never change a run silently.

Every checkpoint step folder (``<workdir>/checkpoints/<step>/``, written by orbax) gets a
``ssdjax_checksums.json`` once orbax has finished it: the size and SHA-256 of every file in it.
Restoring verifies it first; a checkpoint that fails the check, fails to restore or holds
non-finite values is reported with its path and moved aside to ``<workdir>/checkpoints_bad/``
(never deleted), and the newest good one is used instead (:func:`restore_newest_good`).

Resuming compares the config of the new run with the one recorded in the workdir before anything
is written (:func:`check_resume`): fields that define the model, the anchors, the matching, the
loss, the data, the augmentation or the optimizer are refused with their names; fields that only
say how long to train and how often to log, evaluate and save (:data:`SAFE_TO_CHANGE`) are
allowed, and every change is recorded in ``<workdir>/config_changes.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from ssdjax import distributed
from ssdjax.errors import UserError

CHECKSUMS = "ssdjax_checksums.json"
BAD_DIR = "checkpoints_bad"


def manager(workdir: str, keep: int, *, read_only: bool = False) -> ocp.CheckpointManager:
  """The orbax CheckpointManager of ``<workdir>/checkpoints`` keeping the newest ``keep``."""
  policy = ocp.checkpoint_managers.preservation_policy.LatestN(keep)
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=not read_only,
                                         read_only=read_only)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


# ----------------------------------------------------------------------------------------------
# Checksums.


def _files(folder: str) -> list[str]:
  out = []
  for root, _, names in os.walk(folder):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), folder)
      if rel != CHECKSUMS:
        out.append(rel)
  return sorted(out)


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def write_checksums(folder: str) -> None:
  """Records size and SHA-256 of every file of a finished checkpoint folder (atomically)."""
  table = {rel: {"size": os.path.getsize(os.path.join(folder, rel)),
                 "sha256": _sha256(os.path.join(folder, rel))} for rel in _files(folder)}
  tmp = os.path.join(folder, CHECKSUMS + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"files": table}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(folder, CHECKSUMS))


def verify_checksums(folder: str) -> str | None:
  """None when every recorded file is present with its size and hash, else what is wrong."""
  path = os.path.join(folder, CHECKSUMS)
  if not os.path.exists(path):
    return f"{path} is missing (the checkpoint was not finished)"
  try:
    with open(path) as f:
      table = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{path} is unreadable ({type(e).__name__}: {e})"
  for rel, want in sorted(table.items()):
    file = os.path.join(folder, rel)
    if not os.path.isfile(file):
      return f"{file} is missing"
    size = os.path.getsize(file)
    if size != want["size"]:
      return f"{file} has {size} bytes, {want['size']} were written"
    if _sha256(file) != want["sha256"]:
      return f"{file} does not match its checksum (the file changed after it was written)"
  return None


# ----------------------------------------------------------------------------------------------
# Finite state.


def tree_finite(tree) -> jax.Array:
  """A bool scalar: every floating-point value of ``tree`` is finite (works under jit)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


_tree_finite_jit = jax.jit(tree_finite)


def all_finite(tree) -> bool:
  """Whether every floating-point value of ``tree`` is finite (one device reduction)."""
  return bool(jax.device_get(_tree_finite_jit(tree)))


# ----------------------------------------------------------------------------------------------
# Saving.


def save(mngr: ocp.CheckpointManager, step: int, items: Mapping[str, Any], *, state) -> None:
  """Saves ``items`` (orbax args by name) as ``step``, waits for it and writes its checksums.

  Raises:
    FloatingPointError: ``state`` holds a non-finite value; nothing is written.
    OSError: the write failed (full or read-only disk), naming the step and the folder.
  """
  if not all_finite(state):
    raise FloatingPointError(f"the state at step {step} holds NaN/inf values; it was not "
                             "checkpointed (the newest checkpoint stays the last good one)")
  folder = step_dir(mngr, step)
  try:
    saved = mngr.save(step, args=ocp.args.Composite(**items), force=True)
    # Waiting here makes a write failure surface at the step that caused it.
    mngr.wait_until_finished()
    # Several processes: the checksums cover every process's files (and orbax's finalization).
    distributed.barrier(f"checkpoint_{step}_written")
    if saved and distributed.is_main():
      write_checksums(folder)
  except OSError as e:
    raise OSError(e.errno, f"checkpoint at step {step} could not be written to {folder}: "
                  f"{e.strerror or e}") from e


# ----------------------------------------------------------------------------------------------
# Restoring with fall-back.


def quarantine(mngr: ocp.CheckpointManager, step: int) -> str:
  """Moves a bad checkpoint out of orbax's sight, to ``<workdir>/checkpoints_bad/`` (process 0
  moves it, every process then sees it gone); returns where it went (process 0) or ""."""
  dst = ""
  if distributed.is_main():
    src = step_dir(mngr, step)
    bad_root = os.path.join(os.path.dirname(str(mngr.directory)), BAD_DIR)
    os.makedirs(bad_root, exist_ok=True)
    dst = os.path.join(bad_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while os.path.exists(dst):
      n += 1
      dst = os.path.join(bad_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    shutil.move(src, dst)
  distributed.barrier(f"quarantine_{step}")
  mngr.reload()
  return dst


def restore_newest_good(mngr: ocp.CheckpointManager, restore: Callable[[int], dict], *,
                        move_bad: bool, step: int | None = None,
                        report: Callable[[str], None] = logging.warning):
  """(restored items, step) of the newest checkpoint that verifies, restores and is finite.

  Args:
    mngr: the checkpoint manager.
    restore: ``restore(step) -> items`` (orbax ``mngr.restore`` with the run's arguments); its
      ``"state"`` must be finite.
    move_bad: move a bad checkpoint to ``checkpoints_bad/`` (training) or leave it where it is
      (evaluation, prediction, export: read-only).
    step: only this step (no fall-back), or None for the newest good one.
    report: where the one-line message about each bad checkpoint goes (process 0's).

  With several processes they all take the same checkpoint: process 0 verifies the checksums, and
  a checkpoint that fails to restore in any process is bad for all.

  Returns:
    (items, step), or (None, None) when there is no good checkpoint.
  """
  candidates = [step] if step is not None else sorted(mngr.all_steps(), reverse=True)
  for s in candidates:
    folder = step_dir(mngr, s)
    problem = verify_checksums(folder) if distributed.is_main() else None
    if distributed.agree(problem is not None) and problem is None:
      problem = "process 0 found its files damaged"
    items = None
    if problem is None:
      try:
        items = restore(s)
      except Exception as e:  # pylint: disable=broad-except
        problem = f"it failed to restore ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
      if distributed.any_process(problem is not None) and problem is None:
        problem = "it failed to restore in another process"
    if problem is None and not all_finite(items["state"]):
      problem = "it holds NaN/inf values"
    if problem is None:
      return items, s
    if step is not None:
      raise UserError(f"checkpoint {folder} is damaged: {problem}")
    where = ""
    if move_bad:
      where = f"; moved to {quarantine(mngr, s)}"
    if distributed.is_main():
      report(f"checkpoint {folder} is damaged: {problem}{where}; falling back to the previous one")
  return None, None


# ----------------------------------------------------------------------------------------------
# Resuming with a changed config.

# Fields a resumed run may change: how long to train, how often to log, evaluate and save, how
# evaluation is scored, where the data set lies, the pretrained weights (read only by a fresh run).
# Every other field changes what is trained.
SAFE_TO_CHANGE = ("train.num_steps", "train.log_every", "train.eval_every",
                  "train.checkpoint_every", "train.keep_checkpoints", "train.process_timeout_s",
                  "train.conv_weight_grad",
                  "eval.", "postprocess.",
                  "data.data_dir", "data.eval", "model.pretrained")
# Fields that define the parameters' shapes or the optimizer state's layout (freezing): never
# resumable, whatever the flag.
MODEL_FIELDS = ("image_size", "class_names", "anchors.", "model.")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping) and not (prefix + k).endswith("kwargs"):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{dotted field: (old value, new value)} of two configs as JSON-style dicts."""
  a, b = _flatten(old), _flatten(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _matches(field: str, prefixes) -> bool:
  return any(field == p or (p.endswith(".") and field.startswith(p)) for p in prefixes)


def check_resume(saved: Mapping[str, Any], new: Mapping[str, Any], *, trained: bool,
                 allow_change: bool) -> dict[str, tuple[Any, Any]]:
  """The changed fields of a resumed run, or a refusal naming them.

  Args:
    saved, new: the recorded and the new config as JSON-style dicts.
    trained: the checkpoint to resume was written by the training loop; False for a step-0
      checkpoint of converted weights, from which any training setup may start.
    allow_change: the user asked to resume with changed training fields (``--allow_config_change``).

  Raises:
    UserError: a model field changed (never allowed), or a training field without
      ``allow_change``; the message names every such field with its old and new value.
  """
  diff = config_diff(saved, new)
  model = {k: v for k, v in diff.items()
           if _matches(k, MODEL_FIELDS) and not _matches(k, SAFE_TO_CHANGE)}
  other = {k: v for k, v in diff.items() if k not in model and not _matches(k, SAFE_TO_CHANGE)}

  def show(fields):
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in fields.items())

  if model:
    raise UserError(f"the workdir was trained with another model; changed: {show(model)}. "
                    "Start a new --workdir (the checkpoints cannot hold this model)")
  if other and trained and not allow_change:
    raise UserError(f"resuming with a changed config; changed: {show(other)}. These fields "
                    "change what is trained: use a new --workdir, or pass --allow_config_change "
                    "to resume with them (the change is recorded in config_changes.jsonl)")
  return diff


def record_changes(workdir: str, step: int, diff: Mapping[str, tuple[Any, Any]]) -> None:
  """Appends the changed fields of a resumed run to ``<workdir>/config_changes.jsonl``."""
  if not diff:
    return
  with open(os.path.join(workdir, "config_changes.jsonl"), "a") as f:
    f.write(json.dumps({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "changed": {k: {"old": o, "new": n} for k, (o, n) in diff.items()}})
            + "\n")
