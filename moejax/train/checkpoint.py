"""Orbax checkpoints of the TrainState under `<workdir>/checkpoints`.

Saves are synchronous (a checkpoint is complete on disk when `save`
returns) and atomic (orbax writes a temporary directory and renames it), so
a run killed at any moment leaves only complete checkpoints behind.
"""

from __future__ import annotations

import os
from typing import Optional

import orbax.checkpoint as ocp

from moejax.train.state import TrainState


class Checkpointer:
  """Keeps the latest `keep` checkpoints of a run.

  Args (constructor):
    workdir: run directory; checkpoints go to `<workdir>/checkpoints/<step>`.
    keep: number of checkpoints to keep (older ones are deleted).
  """

  def __init__(self, workdir: str, keep: int = 2):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    """Steps of the checkpoints on disk, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest checkpoint's step, or None if there is none."""
    return self._manager.latest_step()

  def save(self, state: TrainState) -> bool:
    """Saves `state` under its own step (no-op if that step exists).

    Args:
      state: the TrainState; `int(state.step)` names the checkpoint.

    Returns:
      True if a checkpoint was written.
    """
    step = int(state.step)
    if step in self._manager.all_steps():
      return False
    self._manager.save(step, args=ocp.args.StandardSave(state))
    self._manager.wait_until_finished()
    return True

  def restore(self, abstract_state: TrainState,
              step: Optional[int] = None) -> TrainState:
    """Restores a checkpoint into the structure of `abstract_state`.

    Args:
      abstract_state: TrainState of ShapeDtypeStructs (see
        `abstract_train_state`); shapes and dtypes must match the saved ones.
      step: which checkpoint; default the latest.

    Returns:
      The restored TrainState.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    return self._manager.restore(
        step, args=ocp.args.StandardRestore(abstract_state))

  def close(self) -> None:
    """Waits for pending writes and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
