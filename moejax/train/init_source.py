"""Starting a run from another run's params: the init source.

A new run may start from the params and model state of another work dir's
newest intact checkpoint (not its optimizer state or step). The source is
only read: its tree and shapes are compared with the new model's from the
saved metadata before any array is read (`check_init_source` names the
first differing leaf), only `params` and `model_state` are read (orbax
partial restore), with the same CRC check as `Checkpointer.restore`; a
corrupt checkpoint is skipped for an older one but not moved.

`moejax.train.checkpoint` re-exports both functions.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

from etils import epath
import jax
import orbax.checkpoint as ocp

from moejax.train import checkpoint as ckpt


def check_init_source(workdir: str, abstract: Mapping) -> int:
  """Checks that `workdir` can initialise a model of `abstract`'s shapes.

  Args:
    workdir: the source run directory.
    abstract: {'params': ..., 'model_state': ...} of the new run
      (ShapeDtypeStructs, e.g. of `abstract_train_state`).

  Returns:
    The newest checkpoint step whose metadata reads back.

  Raises:
    InitSourceError naming the directory, or the first differing leaf path
    and both shapes.
  """
  if not os.path.isdir(workdir):
    raise ckpt.InitSourceError(workdir, 'is not a directory')
  steps = ckpt.checkpoint_steps(workdir)
  if not steps:
    raise ckpt.InitSourceError(
        workdir, 'holds no checkpoint (no '
        f'{os.path.join(workdir, "checkpoints", "<step>")})')
  for step in reversed(steps):
    step_dir = epath.Path(workdir) / 'checkpoints' / str(step)
    try:
      saved = ckpt.saved_variables(step_dir)
    except Exception:  # pylint: disable=broad-except
      continue  # unreadable metadata: an older checkpoint may do
    problem = ckpt.variables_mismatch(saved, abstract)
    if problem:
      raise ckpt.InitSourceError(
          workdir, f'does not fit this run\'s model: in its checkpoint '
          f'{step}, {problem}')
    return step
  raise ckpt.InitSourceError(
      workdir, f'has no checkpoint with readable metadata (steps {steps})')


def _restore_variables(step_dir: epath.Path, abstract: Mapping) -> dict:
  """Partial restore of params and model state (saved dtypes, `abstract`'s
  shardings), CRC-checked, then cast to `abstract`'s dtypes."""
  saved = ckpt.variable_table(ckpt.saved_variables(step_dir))
  dtypes = {name: leaf.dtype for name, leaf in saved.items()}
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def target(item):
    def leaf(path, x):
      name = '/'.join([item] + [str(k.key) for k in path])
      return jax.ShapeDtypeStruct(x.shape, dtypes[name],
                                  sharding=x.sharding or default)
    return jax.tree_util.tree_map_with_path(leaf, abstract[item])

  tree = {item: target(item) for item in ckpt.VARIABLE_ITEMS}
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
    restored = reader.restore(step_dir / 'state', args=ocp.args.PyTreeRestore(
        tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree),
        partial_restore=True))
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as reader:
    saved_crc = dict(reader.restore(step_dir / 'integrity')['crc32'])
  for item in ckpt.VARIABLE_ITEMS:
    for path, crc in ckpt.tree_crc32(restored[item]):
      want = saved_crc.get(f'.{item}{path}')
      if None not in (want, crc) and want != crc:
        raise ckpt.CheckpointCorruptError(
            f'checkpoint {step_dir.name} is corrupt: leaf .{item}{path} has '
            f'CRC-32 {crc:#010x}, saved as {want:#010x}')
  return jax.tree.map(lambda x, a: x if x.dtype == a.dtype else
                      x.astype(a.dtype), restored,
                      {item: abstract[item] for item in ckpt.VARIABLE_ITEMS})


def restore_init_variables(workdir: str, abstract: Mapping,
                           log: Callable[[str], None] = lambda m: print(
                               m, flush=True)) -> tuple[int, dict]:
  """Params and model state of `workdir`'s newest intact checkpoint.

  Nothing else is read (no optimizer state) and nothing in `workdir` is
  changed: a corrupt checkpoint is logged and an older one tried.

  Args:
    workdir: the source run directory.
    abstract: {'params': ..., 'model_state': ...} ShapeDtypeStructs of the
      new run, with the shardings to place the arrays with (see
      `sharding.abstract_with_shardings`); their dtypes are the restored
      ones (a float32 source initialises a bfloat16 run).

  Returns:
    (the checkpoint's step, {'params': ..., 'model_state': ...}).

  Raises:
    InitSourceError: see `check_init_source`, or no checkpoint intact.
  """
  check_init_source(workdir, abstract)
  failures = []
  for step in reversed(ckpt.checkpoint_steps(workdir)):
    step_dir = epath.Path(workdir) / 'checkpoints' / str(step)
    try:
      return step, _restore_variables(step_dir, abstract)
    except Exception as e:  # pylint: disable=broad-except
      reason = f'{type(e).__name__}: {ckpt.first_line(e)}'
      log(f'warning: checkpoint {step} of {workdir} is unreadable or '
          f'corrupt ({reason}); trying an older one')
      failures.append(f'step {step}: {reason}')
  raise ckpt.InitSourceError(
      workdir, 'has no checkpoint that reads back intact '
      f'({"; ".join(failures)})')


def saved_abstract(workdir: str) -> dict:
  """{'params', 'model_state'} ShapeDtypeStructs of `workdir`'s newest
  checkpoint whose metadata reads back (its own tree, shapes and dtypes;
  no array is read), e.g. to restore another model's checkpoint with
  `restore_init_variables` and map it (upcycling, adapters).

  Raises:
    InitSourceError: no directory, no checkpoint, or no readable metadata.
  """
  if not os.path.isdir(workdir):
    raise ckpt.InitSourceError(workdir, 'is not a directory')
  steps = ckpt.checkpoint_steps(workdir)
  for step in reversed(steps):
    step_dir = epath.Path(workdir) / 'checkpoints' / str(step)
    try:
      saved = ckpt.saved_variables(step_dir)
    except Exception:  # pylint: disable=broad-except
      continue
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                        saved, is_leaf=lambda x: hasattr(x, 'shape'))
  raise ckpt.InitSourceError(
      workdir, 'holds no checkpoint with readable metadata' if steps else
      'holds no checkpoint (no '
      f'{os.path.join(workdir, "checkpoints", "<step>")})')
