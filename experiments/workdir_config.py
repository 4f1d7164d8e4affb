"""A work dir as the trainer finds it: its path, its stored config, --fresh.

`check_workdir_path` refuses a --workdir that cannot hold a run (empty, a
file, not writable) with one line naming the path and the problem.
`check_workdir_config` refuses to resume a work dir whose stored config
differs from the new one, listing the differing keys (exit code 2 in
`experiments.train`), unless the user passes --override or --fresh. The
stored config is `config.json`, or, when that file is gone, the config
saved in the newest checkpoint (`checkpoint.saved_config`), so deleting
config.json does not let another config continue the run unnoticed.
`load_stored_config` reads the stored config back as a run config (for
`experiments.train --workdir W` without --config, e.g. after
`experiments.convert`). `move_run_aside` (--fresh) and `keep_stored_config`
(--override) change the work dir before a run. `LibraryLog` sends library
warnings and tracebacks to `<workdir>/errors.log` while a run lives.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import traceback
from typing import Any, Optional

import ml_collections

from configs import base as base_config
from experiments.config_lib import flatten
from experiments.config_lib import resolved_config
from moejax.train import checkpoint as checkpoint_lib
from moejax.train import lock as lock_lib

CONFIG_FILE = 'config.json'
_ABSENT = '<absent>'
# Where a run's arrays live and how its processes meet, not what it
# computes: a work dir may be resumed with other values (another mesh).
LAYOUT_KEYS = ('mesh.', 'distributed.')


def config_diff(stored: dict, new: dict) -> list[tuple[str, Any, Any]]:
  """Differing keys of two resolved configs, as (key, stored, new).

  A key the stored config lacks counts only if the new value is not the
  base default (so configs written before a key was added still match).

  Args:
    stored: the work dir's config.json (nested dict).
    new: the new run's resolved_config (nested dict).

  Returns:
    Sorted [(dotted key, stored value or '<absent>', new value or
    '<absent>')].
  """
  old, cur = flatten(stored), flatten(new)
  defaults = flatten(base_config.get_base_config().to_dict())
  out = []
  for key in sorted(set(old) | set(cur)):
    a, b = old.get(key, _ABSENT), cur.get(key, _ABSENT)
    if a == _ABSENT and key in defaults and b == defaults[key]:
      continue
    if a != b or isinstance(a, bool) != isinstance(b, bool):  # 1 vs True
      out.append((key, a, b))
  return out


def _merged(base: dict, stored: dict) -> dict:
  """`base` with `stored`'s values (recursively; keys only in `stored` are
  kept, so validation names them)."""
  out = dict(base)
  for key, value in stored.items():
    if isinstance(value, dict) and isinstance(out.get(key), dict):
      out[key] = _merged(out[key], value)
    else:
      out[key] = value
  return out


def stored_config(workdir: str) -> Optional[tuple[dict, str]]:
  """The config a work dir's run was made with, and where it was found.

  Args:
    workdir: a run directory.

  Returns:
    (nested config dict, its source: the config.json path, or 'the config
    saved in checkpoint <step> (<path> is missing)'), or None if the work
    dir has neither.

  Raises:
    ValueError: config.json exists but cannot be read (names the path).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    try:
      with open(path, encoding='utf-8') as f:
        return json.load(f), path
    except (OSError, ValueError) as e:
      raise ValueError(f'--workdir {workdir}: the stored {path} cannot be '
                       f'read ({e})') from e
  saved = checkpoint_lib.saved_config(workdir)
  if saved is None:
    return None
  step, config = saved
  return config, f'the config saved in checkpoint {step} ({path} is missing)'


def load_stored_config(workdir: str) -> ml_collections.ConfigDict:
  """The run config stored in `<workdir>/config.json` (or, without it, in
  the newest checkpoint that carries one).

  Keys the file lacks (it was written before they existed) take the base
  default, which is what that run used.

  Args:
    workdir: a run directory.

  Returns:
    The ConfigDict (not validated).

  Raises:
    ValueError: no readable stored config (names --config and the path).
  """
  try:
    found = stored_config(workdir)
  except ValueError as e:
    raise ValueError(f'{e}; allowed: --config FILE[:VARIANT].') from e
  if found is None:
    raise ValueError(f'--config is required: --workdir {workdir} has no '
                     f'{CONFIG_FILE} to take the config from; allowed: '
                     '--config FILE[:VARIANT], or a work dir made by a run '
                     'or by experiments.convert.')
  return ml_collections.ConfigDict(
      _merged(base_config.get_base_config().to_dict(), found[0]))


def untrained(workdir: str) -> bool:
  """Whether no step has been trained in `workdir`: its checkpoints (if
  any) are all of step 0, e.g. an imported model from experiments.convert.
  A new config then mixes nothing."""
  path = os.path.join(workdir, 'checkpoints')
  steps = ([int(n) for n in os.listdir(path) if n.isdigit()]
           if os.path.isdir(path) else [])
  return all(step == 0 for step in steps)


def _fmt(value: Any) -> str:
  return value if value == _ABSENT else repr(value)


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str,
                         override: bool = False) -> list[str]:
  """Refuses a work dir whose stored config.json differs from `config`.

  The LAYOUT_KEYS (`mesh.*`, `distributed.*`) are not compared: a run may
  resume on another mesh or another number of hosts (checkpoints restore
  onto any mesh; results agree to float tolerance).

  Args:
    config: the new run's (validated) config.
    workdir: the run directory (may not exist yet).
    override: accept the differences (the caller continues the run with
      the new config).

  Returns:
    The differing keys as 'key: stored -> new' lines ([] if none or no
    stored config: neither config.json nor a checkpoint that carries one).

  Raises:
    ValueError: the configs differ (or config.json is unreadable) and not
      `override`; the message lists every differing key.
  """
  try:
    found = stored_config(workdir)
  except ValueError as e:
    if override:
      return [f'  ({e})']
    raise ValueError(
        f'{e}; allowed: --override to continue with the new config, or '
        '--fresh to move the old run aside and start over.') from e
  if found is None:
    return []
  stored, path = found
  lines = [f'  {key}: {_fmt(a)} -> {_fmt(b)}'
           for key, a, b in config_diff(stored, resolved_config(config))
           if not key.startswith(LAYOUT_KEYS)]
  if lines and not override:
    raise ValueError(
        f'--workdir {workdir} holds a run with a different config ({path});'
        ' the differing keys (stored -> new):\n' + '\n'.join(lines) +
        '\nResuming would mix two configs in one run. Allowed: the stored '
        'values (the same command as before); --override to continue this '
        'run with the new config (the stored one is kept as config.<n>.json);'
        ' or --fresh to move the old run aside and start over.')
  return lines


def check_workdir_path(workdir: str) -> None:
  """Refuses a --workdir that cannot hold a run, in one line.

  Args:
    workdir: the --workdir value.

  Raises:
    ValueError naming the path and the problem: empty, an existing file
    (not a directory), or a directory (or, for a new one, the nearest
    existing parent) that this process cannot write.
  """
  if not workdir.strip():
    raise ValueError(f'--workdir {workdir!r} is empty; allowed: a directory '
                     'path (created if missing), e.g. runs/switch_tiny.')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'--workdir {workdir} is a file, not a directory; '
                     'allowed: a directory path (new, or a run to resume).')
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f'--workdir {workdir}: {existing} is a file, so the '
                     'directory cannot be created; allowed: a path whose '
                     'parents are directories.')
  problem = _unwritable(existing)
  if problem:
    what = ('' if existing == os.path.abspath(workdir) else
            f' (its parent {existing}, where it would be created)')
    raise ValueError(f'--workdir {workdir}{what} is not writable '
                     f'({problem}); allowed: a directory this user can '
                     'write (check its permissions, or whether the file '
                     'system is mounted read-only).')


def _unwritable(directory: str) -> Optional[str]:
  """Why `directory` cannot be written (None if a file can be created in
  it). Creates and removes a probe file: permission bits do not tell
  (root, read-only mounts, immutable directories)."""
  probe = os.path.join(directory, f'.moejax_probe_{os.getpid()}')
  try:
    with open(probe, 'w', encoding='utf-8'):
      pass
    os.remove(probe)
  except OSError as e:
    return e.strerror or str(e)
  return None


def _next_free(pattern: str) -> str:
  """pattern.format(n) for the smallest n >= 1 that does not exist."""
  n = 1
  while os.path.exists(pattern.format(n)):
    n += 1
  return pattern.format(n)


def keep_stored_config(workdir: str) -> Optional[str]:
  """Copies config.json to config.<n>.json (before an --override run).

  Returns:
    The copy's path, or None if there is no config.json.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  target = _next_free(os.path.join(workdir, 'config.{}.json'))
  shutil.copyfile(path, target)
  return target


def move_run_aside(workdir: str) -> Optional[str]:
  """Renames a work dir that holds a run to `<workdir>.old-<n>` (--fresh).

  Nothing is deleted; the caller starts a new run in `workdir`. A work dir
  that holds nothing but its lock file (`run.lock`) is not a run.

  Returns:
    The new name of the old run, or None if there was nothing to move.
  """
  workdir = os.path.normpath(workdir)
  if not os.path.isdir(workdir) or not (
      set(os.listdir(workdir)) - {lock_lib.LOCK_FILE}):
    return None
  target = _next_free(workdir + '.old-{}')
  os.rename(workdir, target)
  return target


ERRORS_LOG = 'errors.log'  # library warnings and tracebacks of a run


class LibraryLog:
  """Keeps library noise off the terminal while a run is set up and trains.

  Log records of WARNING and up from `absl` (orbax logs through it) and
  `asyncio`, unraisable exceptions ('Event loop is closed' from tensorstore
  callbacks, coroutines that failed after their loop closed) and uncaught
  exceptions of threads go to `<workdir>/errors.log` (created on the first
  record; an unwritable file drops them). JAX's INFO lines ('Unable to
  initialize backend ...') are dropped; its warnings still show. Everything
  is restored on exit. Used by `experiments.train` only: the library
  changes no logger.
  """
  LOGGERS = ('absl', 'asyncio')

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ERRORS_LOG)
    self.count = 0  # records written by this run
    self._handler = logging.Handler(logging.WARNING)
    self._handler.emit = lambda r: self.write(self._handler.format(r))
    self._handler.setFormatter(logging.Formatter(
        '%(asctime)s %(levelname)s %(name)s: %(message)s'))
    self._saved = []

  def write(self, text: str) -> None:
    try:
      with open(self.path, 'a', encoding='utf-8') as f:
        f.write(text.rstrip('\n') + '\n')
      self.count += 1
    except OSError:
      pass  # e.g. the disk is full: the error line says what failed

  def exception(self, error: BaseException, what: str = '') -> None:
    self.write(f'{what}' + ''.join(traceback.format_exception(error)))

  def __enter__(self):
    jax_info = logging.getLogger('jax._src.xla_bridge')
    self._saved = [(jax_info, jax_info.propagate, jax_info.level)]
    jax_info.setLevel(max(jax_info.getEffectiveLevel(), logging.WARNING))
    for name in self.LOGGERS:
      logger = logging.getLogger(name)
      self._saved.append((logger, logger.propagate, logger.level))
      logger.addHandler(self._handler)
      logger.propagate = False
    self._hooks = sys.unraisablehook, threading.excepthook
    sys.unraisablehook = lambda u: self.exception(
        u.exc_value, f'unraisable ({u.err_msg or "exception"} in '
        f'{u.object!r}): ')
    threading.excepthook = lambda a: self.exception(
        a.exc_value, f'in thread {a.thread.name if a.thread else "?"}: ')
    return self

  def __exit__(self, *exc):
    for logger, propagate, level in self._saved:
      logger.removeHandler(self._handler)
      logger.propagate = propagate
      logger.setLevel(level)  # (not .level =: that keeps a stale cache)
    sys.unraisablehook, threading.excepthook = self._hooks
