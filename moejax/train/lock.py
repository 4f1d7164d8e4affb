"""One run per work dir: `<workdir>/run.lock`.

`WorkdirLock(workdir).acquire()` takes an exclusive `fcntl.flock` on
`<workdir>/run.lock` and writes who holds it (pid, host, start time, command)
into the file. A second run on the same work dir finds the lock taken and
gets `WorkdirLockedError`, whose message names the holder; it has changed
nothing. The kernel drops a flock when its process ends, however it ends,
so the lock file of a killed run (SIGKILL, a crash, a reboot) is stale: the
next run takes it over and says so. `release` (or leaving the `with` block)
deletes the file (and the work dir, if `acquire` created it and it is
still empty).

Where the file system has no flock (some network or FUSE file systems),
the recorded pid decides: a lock whose pid no longer runs on this host (or
now belongs to another process) is stale; one recorded on another host is
taken as held, and the message says to delete the file if that run is gone.

Several processes (jax.distributed): process 0 alone takes the lock (the
caller decides); the others are started with it, by the same command.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Callable, Optional

LOCK_FILE = 'run.lock'


class WorkdirLockedError(RuntimeError):
  """Another live run holds the work dir's lock.

  Attributes:
    workdir: the work dir.
    holder: what the lock file says ({'pid', 'host', 'started', 'command'};
      {} if it could not be read).
  """

  def __init__(self, workdir: str, holder: dict,
               message: Optional[str] = None):
    self.workdir, self.holder = workdir, holder
    path = os.path.join(workdir, LOCK_FILE)
    super().__init__(message or (
        f'--workdir {workdir} is in use by another run: {describe(holder)}. '
        'Allowed: wait for that run to end, stop it (SIGTERM or Ctrl-C '
        'saves a checkpoint; re-run to resume), or use another --workdir. '
        f'If that process no longer exists, delete {path}.'))


def describe(holder: dict) -> str:
  """'pid 123 on host h, started 2026-01-01 10:00:00 (command ...)'."""
  if not holder:
    return 'a process that has not written its details yet'
  text = (f'pid {holder.get("pid")} on host {holder.get("host")}, started '
          f'{holder.get("started")}')
  return text + (f' ({holder["command"]})' if holder.get('command') else '')


def _proc_start(pid: int) -> Optional[str]:
  """The start time of process `pid` in clock ticks since boot (Linux
  /proc/<pid>/stat field 22), or None where there is no /proc."""
  try:
    with open(f'/proc/{pid}/stat', encoding='ascii') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _holder_alive(holder: dict) -> bool:
  """Whether the process a lock file names may still run (no flock here).
  Another host's process cannot be checked: taken as alive."""
  if holder.get('host') != socket.gethostname():
    return bool(holder)
  pid = holder.get('pid')
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, TypeError, ValueError):
    return isinstance(pid, int)
  started = _proc_start(int(pid))
  return None in (started, holder.get('proc_start')) or (
      started == holder['proc_start'])


def _read(fd: int) -> dict:
  try:
    holder = json.loads(os.pread(fd, 1 << 16, 0) or b'{}')
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


class WorkdirLock:
  """The exclusive lock of a work dir, held from `acquire` to `release`.

  Args (constructor):
    workdir: the run directory (created by `acquire` if missing).
    log: where the stale-lock takeover line goes (default: print).
  """

  def __init__(self, workdir: str,
               log: Callable[[str], None] = lambda m: print(m, flush=True)):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._log = log
    self._fd: Optional[int] = None
    self._created = False

  def acquire(self) -> dict:
    """Takes the lock; returns the stale holder taken over ({} if none).

    Raises:
      WorkdirLockedError: a live run holds it (nothing changed).
      OSError: the directory or the lock file cannot be written.
    """
    self._created = not os.path.isdir(self.workdir)
    os.makedirs(self.workdir, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        stale = self._lock(fd)
      except BaseException:
        os.close(fd)
        raise
      try:  # a run releasing the lock unlinks the file: lock the new one
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    self._fd = fd
    if stale:
      self._log(f'lock: taking over the stale lock of {describe(stale)}: '
                'that process no longer holds it (it ended or was killed)')
    me = {'pid': os.getpid(), 'host': socket.gethostname(),
          'started': datetime.datetime.now().isoformat(' ', 'seconds'),
          'command': ' '.join(sys.argv)[:300],
          'proc_start': _proc_start(os.getpid())}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + '\n').encode(), 0)
    return stale

  def _lock(self, fd: int) -> dict:
    """flock (or the pid check where flock is missing); returns the stale
    holder's record ({} if the file was empty)."""
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      raise WorkdirLockedError(self.workdir, _read(fd)) from e
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
      if _holder_alive(_read(fd)):  # no flock on this file system
        raise WorkdirLockedError(self.workdir, _read(fd)) from e
    return _read(fd)

  def moved_to(self, old_workdir: str) -> None:
    """After the work dir (with the lock file) was renamed to
    `old_workdir` (--fresh): locks the new, empty `workdir`, then releases
    the moved lock file."""
    old_fd, self._fd = self._fd, None
    try:
      self.acquire()
    finally:
      if old_fd is not None:
        _unlink_quietly(os.path.join(old_workdir, LOCK_FILE))
        os.close(old_fd)

  def release(self) -> None:
    """Deletes the lock file and drops the lock (no-op if not held)."""
    if self._fd is None:
      return
    try:
      if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
        _unlink_quietly(self.path)
    except OSError:
      pass  # the directory is gone or unreadable: the flock still ends
    os.close(self._fd)
    self._fd = None
    if self._created:  # a run refused before writing anything: no trace
      try:
        os.rmdir(self.workdir)
      except OSError:
        pass  # not empty: the run wrote something

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def _unlink_quietly(path: str) -> None:
  try:
    os.unlink(path)
  except OSError:
    pass
