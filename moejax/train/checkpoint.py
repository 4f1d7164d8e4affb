"""Orbax checkpoints of the TrainState under `<workdir>/checkpoints`.

Saves are synchronous (a checkpoint is complete on disk when `save`
returns) and atomic: orbax writes `<step>.orbax-checkpoint-tmp` and renames
it to `<step>` when everything is written, so a run killed at any moment
leaves complete checkpoints plus at most one unfinished tmp directory,
which `remove_unfinished` deletes on the next start.

Each checkpoint holds two items: `state` (the TrainState) and `integrity`
(a JSON record of the CRC-32 of every array leaf's bytes). `restore`
recomputes the CRCs, so a checkpoint whose files were truncated, emptied or
had bits flipped is reported as corrupt (`CheckpointCorruptError`) rather
than silently loaded; `restore_latest_good` then falls back to the previous
checkpoint and moves the bad ones aside to `<workdir>/bad_checkpoints/`.

Meshes and processes: arrays are saved as they are sharded (each process
writes the shards it holds) and restore onto the shardings of the restore
target, whatever mesh saved them (`sharding.abstract_with_shardings`). The
CRC of a leaf is taken over its global value (its host copy, gathered from
its shards), so it does not depend on the mesh either: a checkpoint saved
on 8 devices is verified when restored on 1, and vice versa. Leaves that
are not fully addressable by one process (runs over several processes) are
not gathered: they get no CRC at save (None in the record) and are not
CRC-checked at restore, only by orbax's own metadata. With several
processes, process 0 alone moves and deletes checkpoint directories, and
the others wait for it.

Each checkpoint also holds `config` (the run's resolved config as JSON,
when the Checkpointer was given one): `saved_config` reads it back, so a
work dir that lost its config.json still knows what its checkpoints were
made with. Before reading any array, `restore_latest_good` compares each
checkpoint's saved param shapes with the restore target's: a checkpoint of
another model is refused with `CheckpointMismatchError` naming the first
differing param (it is not corrupt, and nothing is moved).

Initialising from another run: see `moejax.train.init_source`
(`check_init_source`, `restore_init_variables`, re-exported here).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import zlib
from typing import Any, Callable, Mapping, Optional

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from moejax.train.state import TrainState

TMP_SUFFIX = '.orbax-checkpoint-tmp'  # orbax's atomic-rename suffix
BAD_DIR = 'bad_checkpoints'


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, or no checkpoint could be read."""


class CheckpointCorruptError(CheckpointError):
  """A checkpoint restored, but its contents differ from what was saved."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint holds params of other shapes than the run's model (a run
  of another config): refused before reading any array."""


class InitSourceError(ValueError):
  """A work dir whose checkpoint cannot initialise a run: not a directory,
  no checkpoint, params of another tree or shape, or none intact.

  Attributes:
    workdir: the source.
    reason: what is wrong, a phrase that follows the source's name
      ('holds no checkpoint ...').
  """

  def __init__(self, workdir: str, reason: str):
    super().__init__(f'init source {workdir!r} {reason}')
    self.workdir = workdir
    self.reason = reason


def _leaf_bytes(leaf: Any) -> Optional[bytes]:
  """Host bytes of an array leaf (None if not fully addressable here)."""
  if isinstance(leaf, jax.Array):
    if not leaf.is_fully_addressable:
      return None
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
  return np.ascontiguousarray(np.asarray(leaf)).tobytes()


def tree_crc32(tree: Any) -> list[tuple[str, Optional[int]]]:
  """CRC-32 of every array leaf, in leaf order.

  Args:
    tree: a pytree of arrays (e.g. a TrainState).

  Returns:
    [(jax.tree_util.keystr(path), crc32 of the leaf's bytes, or None for a
    leaf not fully addressable by this process)], in jax.tree.leaves order.
  """
  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    data = _leaf_bytes(leaf)
    out.append((jax.tree_util.keystr(path),
                None if data is None else zlib.crc32(data)))
  return out


def _crc_mismatch(saved: list, restored: list) -> Optional[str]:
  """Describes the first difference between two tree_crc32 records
  (compared by leaf position; the paths only name the leaf)."""
  if len(saved) != len(restored):
    return (f'{len(saved)} leaves were saved, {len(restored)} were '
            'restored')
  for (path, want), (_, got) in zip(saved, restored):
    if None not in (want, got) and want != got:
      return f'leaf {path} has CRC-32 {got:#010x}, saved as {want:#010x}'
  return None


class Checkpointer:
  """Keeps the latest `keep` checkpoints of a run.

  Args (constructor):
    workdir: run directory; checkpoints go to `<workdir>/checkpoints/<step>`.
    keep: number of checkpoints to keep (older ones are deleted after a
      successful save).
    log: where warnings go (default: print).
    config: the run's resolved config (JSON-serialisable), saved in every
      checkpoint as its `config` item (see `saved_config`); None: none.
  """

  def __init__(self, workdir: str, keep: int = 2,
               log: Callable[[str], None] = lambda m: print(m, flush=True),
               config: Optional[Mapping[str, Any]] = None):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, 'checkpoints')
    self._log = log
    self._config = None if config is None else json.loads(json.dumps(
        dict(config)))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    """Steps of the checkpoints on disk, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest checkpoint's step, or None if there is none."""
    return self._manager.latest_step()

  def remove_unfinished(self) -> list[str]:
    """Deletes tmp directories left by a save that was killed; logs each.

    Returns:
      The names removed.
    """
    removed = [name for name in sorted(os.listdir(self.directory))
               if TMP_SUFFIX in name]
    _sync('listed_unfinished')  # every process has listed them
    for name in removed:
      self._log(f'checkpoint: removing {name}, an unfinished save (the '
                'run stopped while writing it)')
      if _primary():
        shutil.rmtree(os.path.join(self.directory, name))
    _sync('removed_unfinished')
    if removed:
      self._manager.reload()
    return removed

  def save(self, state: TrainState) -> bool:
    """Saves `state` under its own step (no-op if that step exists).

    Args:
      state: the TrainState; `int(state.step)` names the checkpoint.

    Returns:
      True if a checkpoint was written.

    Raises:
      CheckpointError: the write failed (disk full, read-only, ...); the
        older checkpoints are untouched and the partial write is removed.
    """
    step = int(state.step)
    if step in self._manager.all_steps():
      return False
    items = dict(state=ocp.args.StandardSave(state),
                 integrity=ocp.args.JsonSave({'crc32': tree_crc32(state)}))
    if self._config is not None:
      items['config'] = ocp.args.JsonSave(self._config)
    args = ocp.args.Composite(**items)
    try:
      saved = self._manager.save(step, args=args, force=True)
      self._manager.wait_until_finished()
      if not saved:
        raise RuntimeError('orbax skipped the save')
    except Exception as e:  # pylint: disable=broad-except
      shutil.rmtree(os.path.join(self.directory, f'{step}{TMP_SUFFIX}'),
                    ignore_errors=True)
      self._manager.reload()
      previous = self.latest_step()
      kept = ('the previous checkpoint (step {}) is untouched'.format(previous)
              if previous is not None else 'there is no earlier checkpoint')
      raise CheckpointError(
          f'could not save the checkpoint of step {step} in '
          f'{self.directory} ({type(e).__name__}: {first_line(e)}); {kept}.'
          ' Free disk space or fix the permissions, then re-run the same '
          'command to resume.') from e
    return True

  def restore(self, abstract_state: TrainState,
              step: Optional[int] = None) -> TrainState:
    """Restores and verifies a checkpoint into `abstract_state`'s structure.

    Args:
      abstract_state: TrainState of ShapeDtypeStructs (see
        `abstract_train_state`); shapes and dtypes must match the saved ones.
      step: which checkpoint; default the latest.

    Returns:
      The restored TrainState.

    Raises:
      FileNotFoundError: no checkpoint.
      CheckpointCorruptError: the restored bytes do not match the CRCs.
      Exception: whatever orbax raises for unreadable files.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        integrity=ocp.args.JsonRestore()))
    problem = _crc_mismatch(restored.integrity['crc32'],
                            tree_crc32(restored.state))
    if problem:
      raise CheckpointCorruptError(f'checkpoint {step} is corrupt: {problem}')
    return restored.state

  def restore_latest_good(self, abstract_state: TrainState
                          ) -> Optional[TrainState]:
    """Restores the newest checkpoint that reads back intact.

    Newer checkpoints that fail are logged and, once an older one restored,
    moved to `<workdir>/bad_checkpoints/<step>` (so later saves of those
    steps are not skipped). If every checkpoint fails, nothing is moved and
    CheckpointError is raised: a run never restarts from scratch silently.

    Args:
      abstract_state: the restore target (see `restore`).

    Returns:
      The restored TrainState, or None if there is no checkpoint at all.

    Raises:
      CheckpointMismatchError: a checkpoint's saved param shapes are not
        `abstract_state`'s (checked before reading its arrays).
      CheckpointError: checkpoints exist but none reads back intact.
    """
    self.remove_unfinished()
    failures = []
    for step in reversed(self.all_steps()):
      self._check_fits(abstract_state, step)
      try:
        state = self.restore(abstract_state, step)
      except Exception as e:  # pylint: disable=broad-except
        reason = f'{type(e).__name__}: {first_line(e)}'
        self._log(f'warning: checkpoint {step} in {self.directory} is '
                  f'unreadable or corrupt ({reason})')
        failures.append((step, reason))
        continue
      for bad, _ in failures:
        self._move_aside(bad)
      if failures:
        self._log(f'checkpoint: using step {step}, the newest intact one')
      return state
    if failures:
      lines = '\n'.join(f'  step {s}: {r}' for s, r in failures)
      raise CheckpointError(
          f'none of the checkpoints in {self.directory} could be restored '
          f'into this run\'s train state:\n{lines}\nRefusing to start over '
          'from step 0. If the model changed, start a fresh run (--fresh); '
          'otherwise restore the files from a backup.')
    return None

  def _check_fits(self, abstract_state: TrainState, step: int) -> None:
    """Raises CheckpointMismatchError if checkpoint `step`'s saved param
    shapes are not the target's (unreadable metadata passes: `restore`
    then reports the checkpoint as unreadable)."""
    try:
      saved = saved_variables(epath.Path(self.directory) / str(step))
    except Exception:  # pylint: disable=broad-except
      return
    problem = variables_mismatch(
        saved, {'params': abstract_state.params,
                'model_state': abstract_state.model_state})
    if problem:
      raise CheckpointMismatchError(
          f'checkpoint {step} in {self.directory} does not fit this run\'s '
          f'model: {problem}. The work dir holds a run of another model '
          'config; allowed: the config its checkpoints were made with, or '
          '--fresh to move the old run aside and start over.')

  def _move_aside(self, step: int) -> None:
    """Moves checkpoint `step` to <workdir>/bad_checkpoints/<step>[.n]."""
    target_dir = os.path.join(self.workdir, BAD_DIR)
    target, n = os.path.join(target_dir, str(step)), 1
    while os.path.exists(target):
      target, n = os.path.join(target_dir, f'{step}.{n}'), n + 1
    _sync(f'move_aside_{step}')  # every process has chosen the target
    if _primary():
      os.makedirs(target_dir, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    _sync(f'moved_aside_{step}')
    self._manager.reload()
    self._log(f'checkpoint: moved the bad checkpoint {step} to {target}')

  def close(self, timeout: float = 120.0) -> None:
    """Waits (at most `timeout` s) for pending writes and releases the
    manager. A failure or a timeout here is logged, not raised, so it
    cannot hide the error that ended a run, nor stall its exit (after a
    failed write orbax may wait on a thread that will never answer)."""
    failed = []

    def close_manager():
      try:
        self._manager.wait_until_finished()
        self._manager.close()
      except Exception as e:  # pylint: disable=broad-except
        failed.append(f'{type(e).__name__}: {first_line(e)}')

    closer = threading.Thread(target=close_manager, daemon=True,
                              name='moejax_checkpointer_close')
    closer.start()
    closer.join(timeout)
    if closer.is_alive():
      failed.append(f'no answer within {timeout:.0f} s; not waiting longer')
    if failed:
      self._log(f'warning: closing the checkpoint manager failed '
                f'({failed[0]})')


def _primary() -> bool:
  """Whether this process changes the checkpoint directory (process 0)."""
  return jax.process_index() == 0


def _sync(name: str) -> None:
  """All processes wait here (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'moejax_checkpoint_{name}')


def first_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [''])[0][:300]


# ------------------------------------------- what a checkpoint says it holds
VARIABLE_ITEMS = ('params', 'model_state')  # what an init source gives


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the finished checkpoints in `<workdir>/checkpoints`, ascending
  ([] when there is none; nothing is created)."""
  path = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(path):
    return []
  return sorted(int(n) for n in os.listdir(path) if n.isdigit())


def _leaf_table(tree: Mapping, prefix: str) -> dict[str, Any]:
  """{'params/block_0/attn/query': leaf} of a nested mapping."""
  out = {}
  for key, value in (tree or {}).items():
    if isinstance(value, Mapping):
      out.update(_leaf_table(value, f'{prefix}/{key}'))
    else:
      out[f'{prefix}/{key}'] = value
  return out


def variable_table(tree: Mapping) -> dict[str, Any]:
  """_leaf_table of a {'params': ..., 'model_state': ...} tree."""
  out = {}
  for item in VARIABLE_ITEMS:
    out.update(_leaf_table(tree.get(item) or {}, item))
  return out


def variables_mismatch(saved: Mapping, expected: Mapping) -> Optional[str]:
  """The first difference in leaf paths or shapes between two
  {'params': ..., 'model_state': ...} trees (leaves with a `.shape`), in
  `expected`'s order; None if they match (dtypes are not compared)."""
  got, want = variable_table(saved), variable_table(expected)
  for name, leaf in want.items():
    if name not in got:
      return (f'{name} (shape {tuple(leaf.shape)} in this run\'s model) is '
              'not in the checkpoint')
    if tuple(got[name].shape) != tuple(leaf.shape):
      return (f'{name} has shape {tuple(got[name].shape)} in the checkpoint '
              f'but {tuple(leaf.shape)} in this run\'s model')
  extra = [name for name in got if name not in want]
  if extra:
    return (f'the checkpoint holds {extra[0]} (shape '
            f'{tuple(got[extra[0]].shape)}), which this run\'s model lacks')
  return None


def saved_variables(step_dir: epath.Path) -> dict[str, Any]:
  """{'params', 'model_state'} of a checkpoint's array metadata (shape,
  dtype), read without reading any array."""
  tree = ocp.PyTreeCheckpointHandler().metadata(step_dir / 'state').tree
  return {item: tree.get(item) or {} for item in VARIABLE_ITEMS}



def saved_config(workdir: str) -> Optional[tuple[int, dict]]:
  """The resolved config saved in `workdir`'s newest checkpoint that has
  one (its `config` item, plain JSON: read without orbax or a device).

  Returns:
    (step, config dict), or None if no checkpoint carries a readable one.
  """
  for step in reversed(checkpoint_steps(workdir)):
    path = os.path.join(workdir, 'checkpoints', str(step), 'config',
                        'metadata')  # orbax JsonSave's file name
    try:
      with open(path, encoding='utf-8') as f:
        config = json.load(f)
    except (OSError, ValueError):
      continue
    if isinstance(config, dict):
      return step, config
  return None


def __getattr__(name: str):
  """The init-source functions, which live in `init_source` (imported on
  first use: it imports this module)."""
  if name in ('check_init_source', 'restore_init_variables'):
    from moejax.train import init_source  # pylint: disable=g-import-not-at-top
    return getattr(init_source, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
