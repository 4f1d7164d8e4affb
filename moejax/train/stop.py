"""Stopping a run early: SIGTERM and Ctrl-C (SIGINT) save, then stop.

While `train_and_evaluate` runs, the first SIGTERM or SIGINT asks the loop
to finish the step it is in, save a checkpoint at that step and return
(`RunResult.stop_signal` names the signal); Ctrl-C says so at once, in
one line. A second SIGINT aborts at once: it raises `SecondInterrupt` (a
KeyboardInterrupt) wherever the run is, so nothing more is saved and the
last checkpoint stays the last one. (Python checks for signals between
bytecodes: a long XLA compile finishes first.) The handlers of before the
run are back when it returns or raises. A SIGINT that the process ignores (a
background job of a non-interactive shell starts with SIGINT ignored) stays
ignored.

Several processes (jax.distributed): JAX's preemption sync point decides
the step at which every process saves and stops, after any of them got
SIGTERM (the distributed runtime handles SIGTERM itself). Ctrl-C is turned
into a SIGTERM of this process, so it takes the same path; a second Ctrl-C
aborts as with one process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

from jax.experimental import multihost_utils


class SecondInterrupt(KeyboardInterrupt):
  """A second Ctrl-C while the run was stopping: it aborts without saving
  (a KeyboardInterrupt, so code that catches those sees it as one)."""


def _abort(signum, frame):
  del signum, frame
  raise SecondInterrupt('Ctrl-C again before the checkpoint was saved')


def _say(line: str) -> None:
  """Prints from a signal handler: one unbuffered write (a print could
  re-enter a print that the handler interrupted)."""
  try:
    os.write(sys.stdout.fileno(), (line + '\n').encode())
  except (OSError, ValueError, AttributeError):  # no real file (captured)
    print(line, flush=True)


class StopFlag:
  """Set by SIGTERM or SIGINT while installed (in the main thread only).

  Attributes:
    stop_signal: 'SIGTERM' or 'SIGINT' once one arrived, else None.
  """

  def __init__(self):
    self.stop_signal: Optional[str] = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    self._install(signal.SIGTERM, self._handle)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
      self._install(signal.SIGINT, self._handle)
    return self

  def _install(self, signum, handler) -> None:
    old = signal.signal(signum, handler)
    # None: a handler not set from Python; SIG_DFL is the closest restore.
    self._old[signum] = signal.SIG_DFL if old is None else old

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, _abort)  # the next Ctrl-C aborts
      _say('SIGINT: saving a checkpoint at the next step (Ctrl-C again '
           'aborts without saving)')
    if self.stop_signal is None:
      self.stop_signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for signum, old in self._old.items():
      signal.signal(signum, old)
    self._old = {}

  def stopping(self, step: int) -> bool:
    """Whether to save and stop at `step` (call once per step)."""
    del step
    return self.stop_signal is not None


class SyncedStop(StopFlag):
  """Several processes: every process stops at the same step, the first
  that JAX's preemption sync point reports after any of them got SIGTERM.
  SIGINT here sends this process SIGTERM (which JAX's runtime handles)."""

  def __enter__(self):
    if (threading.current_thread() is threading.main_thread() and
        signal.getsignal(signal.SIGINT) is not signal.SIG_IGN):
      self._install(signal.SIGINT, self._forward)
    return self

  def _forward(self, signum, frame):
    del frame
    signal.signal(signal.SIGINT, _abort)
    _say('SIGINT: saving a checkpoint at the step all processes reach next '
         '(Ctrl-C again aborts without saving)')
    self.stop_signal = signal.Signals(signum).name
    os.kill(os.getpid(), signal.SIGTERM)

  def stopping(self, step: int) -> bool:
    if multihost_utils.reached_preemption_sync_point(step):
      self.stop_signal = self.stop_signal or 'SIGTERM'
      return True
    return False
