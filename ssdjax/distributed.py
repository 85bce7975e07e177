"""One run over several processes (hosts): JAX's distributed runtime, and what ssdjax adds to it.

``python -m ssdjax.main`` calls :func:`initialize` before anything touches a device. It starts
``jax.distributed`` when this process is one of several: when ``--coordinator_address``,
``--num_processes`` or ``--process_id`` is given, when the environment is a multi-task SLURM step
or an Open MPI job of several ranks, or always with ``--distributed=on`` (Cloud TPU pod slices:
JAX reads the coordinator, the process count and this process's index from the TPU metadata).
A single process runs as before and none of this is used.

Every process runs the same loop on its own part of the data (``ssdjax.data``); the arrays are
global, split over all devices of all processes. What ssdjax adds:

* **Losing a process ends the run within** ``train.process_timeout_s``. A :class:`Watchdog`
  thread in every process publishes a counter to the coordination service's key-value store and
  watches the others'. A process whose counter stops (killed, crashed, its host down or cut off)
  is reported by every survivor as ``error: process K of N stopped responding ...`` and they
  exit with status 1 instead of waiting in a collective forever. JAX's own heartbeat
  (``2 x process_timeout_s``) is the backstop; process 0 hosts the coordination service, so when
  it is lost JAX itself ends the others at once ("the leader task was preempted/died").
* :func:`barrier` waits for every process at most ``process_timeout_s`` and names the ones that
  did not arrive.
* :func:`is_main` (process 0) writes the workdir records, metrics, logs and progress bar.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

from absl import logging
import jax
import numpy as np

from ssdjax.errors import UserError

MODES = ("auto", "on", "off")
_ALIVE_PREFIX = "ssdjax/alive/"
_DONE = "done"
_state = {"timeout_s": None, "watchdog": None}


def launch_environment() -> str | None:
  """The cluster launcher that started this process as one of several, or None."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in os.environ:
    return f"SLURM ({os.environ['SLURM_NTASKS']} tasks)"
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return f"Open MPI ({os.environ['OMPI_COMM_WORLD_SIZE']} ranks)"
  return None


def initialize(*, mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               timeout_s: float) -> bool:
  """Starts ``jax.distributed`` when this process is one of several; True when it did.

  Args:
    mode: "auto" (start it when an address/count/index is given or the environment is a
      multi-process SLURM step or Open MPI job), "on" (always; what JAX does not get here it
      detects: Cloud TPU, SLURM, Open MPI) or "off".
    coordinator_address, num_processes, process_id: as ``jax.distributed.initialize``; None =
      detected.
    timeout_s: ``train.process_timeout_s``: a process not heard from for this long is lost.

  Raises:
    UserError: a bad combination of the arguments.
  """
  if mode not in MODES:
    raise UserError(f"--distributed={mode!r}; valid: {list(MODES)}")
  given = {k: v for k, v in (("--coordinator_address", coordinator_address),
                             ("--num_processes", num_processes),
                             ("--process_id", process_id)) if v is not None}
  if mode == "off":
    if given:
      raise UserError(f"{', '.join(given)} given with --distributed=off; drop them or the flag")
    return False
  if mode == "auto" and not given and launch_environment() is None:
    return False
  if num_processes is not None and num_processes < 1:
    raise UserError(f"--num_processes={num_processes} must be >= 1")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise UserError(f"--process_id={process_id} must be in 0..{num_processes - 1} "
                    f"(--num_processes={num_processes})")
  timeout = max(1, int(round(timeout_s)))
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               heartbeat_timeout_seconds=2 * timeout,
                               shutdown_timeout_seconds=2 * timeout)
  except (ValueError, TypeError) as e:  # what could not be detected, named by JAX
    raise UserError(f"jax.distributed could not start ({e}); give --coordinator_address, "
                    "--num_processes and --process_id, or launch under SLURM, Open MPI or on a "
                    "Cloud TPU pod slice (--distributed=on)") from e
  _state["timeout_s"] = float(timeout_s)
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # log lines come from process 0
  if jax.process_count() > 1:
    _state["watchdog"] = Watchdog(timeout_s)
    # Registered after JAX's own exit handler, so it runs first: the thread must not ask the
    # service for news once JAX has closed the connection.
    atexit.register(_state["watchdog"].stop, done=False)
  logging.info("process %d of %d, coordinator %s, %d local / %d global devices",
               jax.process_index(), jax.process_count(), coordinator_address or "(detected)",
               jax.local_device_count(), jax.device_count())
  return True


def is_main() -> bool:
  """Whether this process writes the workdir records, metrics, logs and progress (process 0)."""
  return jax.process_index() == 0


def finish() -> None:
  """Tells the other processes' watchdogs that this one ended on purpose (call before exiting)."""
  watchdog = _state["watchdog"]
  if watchdog is not None:
    watchdog.stop()
    _state["watchdog"] = None


def explain_failure(error: BaseException) -> None:
  """After a collective failed (a peer's connection reset, say): waits at most
  ``train.process_timeout_s`` for the watchdog to name a lost process, which ends this process
  with its message; returns (the caller re-raises) when no process was lost."""
  watchdog = _state["watchdog"]
  if watchdog is None or not isinstance(error, jax.errors.JaxRuntimeError):
    return
  logging.warning("a collective failed (%s); waiting up to %g s to learn whether a process was "
                  "lost", str(error).splitlines()[0][:200], watchdog.timeout_s)
  watchdog.wait(watchdog.timeout_s + 3 * watchdog.interval_s)


def _client():
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client


def barrier(name: str, timeout_s: float | None = None) -> None:
  """Waits until every process reached ``barrier(name)`` (in the same order everywhere).

  Raises:
    RuntimeError: some process did not arrive within ``timeout_s`` (default
      ``train.process_timeout_s``); the message names them.
  """
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top
  timeout_s = timeout_s or _state["timeout_s"] or 300.0
  try:
    multihost.get_barrier_sync_fn()(key=f"ssdjax_{name}", timeout_ms=int(timeout_s * 1000))
  except jax.errors.JaxRuntimeError as e:
    text = str(e)
    late = text.split("timed out task names:", 1)[-1].split("\n\n", 1)[0].split()
    who = ", ".join(late) if "timed out task names:" in text else "some"
    raise RuntimeError(f"process(es) {who} of {jax.process_count()} did not reach '{name}' within "
                       f"train.process_timeout_s={timeout_s:g} s; stopping (rerun the same "
                       "command to resume from the last complete checkpoint)") from e


# How long a process waits for the others to finish compiling; a lost one is found meanwhile by
# the watchdog, and compile times differ by minutes when one process finds the executable in
# the compilation cache and another compiles it (only process 0 writes the cache).
_COMPILE_WAIT_S = 3600.0


def compile_together(jitted, *args) -> None:
  """Compiles ``jitted`` for ``args`` in every process, and returns once all have (once per
  function). A collective that runs for the first time must be joined by every process within a
  short time (30 s for gloo on CPU), shorter than compile times may differ between processes."""
  if jax.process_count() == 1 or id(jitted) in _state.setdefault("compiled", set()):
    return
  jitted.lower(*args).compile()
  _state["compiled"].add(id(jitted))
  barrier(f"compiled_{getattr(jitted, '__name__', 'function')}", timeout_s=_COMPILE_WAIT_S)


def agree(value: int) -> int:
  """Process 0's ``value`` (an int32) in every process, so that they take the same branch."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def any_process(flag: bool) -> bool:
  """Whether ``flag`` is true in some process (every process gets the same answer)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


class Watchdog:
  """Every process publishes a counter; a process whose counter stops is lost (module docstring).

  It runs in a daemon thread, so it reacts while the main thread waits in a collective.
  """

  def __init__(self, timeout_s: float):
    self.timeout_s = float(timeout_s)
    self.interval_s = min(max(self.timeout_s / 10, 0.2), 5.0)
    self.index, self.count = jax.process_index(), jax.process_count()
    self._client = _client()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="ssdjax-watchdog", daemon=True)
    self._thread.start()

  def wait(self, timeout_s: float) -> None:
    """Returns after ``timeout_s`` unless a lost process ends this one first."""
    self._thread.join(timeout_s)

  def stop(self, done: bool = True) -> None:
    """Ends the thread; ``done`` tells the others that this process ended on purpose."""
    self._stop.set()
    self._thread.join(timeout=10)
    if not done:
      return
    try:
      self._client.key_value_set(f"{_ALIVE_PREFIX}{self.index}", _DONE, allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass  # the service is gone already: nobody is left to tell

  def _run(self) -> None:
    seen: dict[int, tuple[str, float]] = {}
    counter = 0
    start = time.monotonic()
    while not self._stop.wait(0 if counter == 0 else self.interval_s):
      counter += 1
      try:
        self._client.key_value_set(f"{_ALIVE_PREFIX}{self.index}", str(counter),
                                   allow_overwrite=True)
        entries = self._client.key_value_dir_get(_ALIVE_PREFIX)
      except Exception as e:  # pylint: disable=broad-except
        if self._stop.is_set():
          return
        self._lost(0, f"the coordination service (process 0) stopped answering "
                   f"({str(e).splitlines()[0][:200]})")
        return
      now = time.monotonic()
      values = {int(k.rsplit("/", 1)[-1]): v for k, v in entries}
      for peer in range(self.count):
        if peer == self.index:
          continue
        value = values.get(peer)
        if value == _DONE:
          continue
        if peer not in seen or seen[peer][0] != value:
          seen[peer] = (value, now)
        silent = now - (seen[peer][1] if value is not None else start)
        if silent > self.timeout_s:
          self._lost(peer, f"it stopped responding {silent:.1f} s ago (killed, crashed, or its "
                     "host is down or cut off)")
          return

  def _lost(self, peer: int, why: str) -> None:
    sys.stderr.write(
        f"error: process {peer} of {self.count} is lost: {why}; this process ({self.index}) "
        f"stops too (train.process_timeout_s={self.timeout_s:g}). Rerun the same command on "
        "every host: the run resumes from its last complete checkpoint.\n")
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access
