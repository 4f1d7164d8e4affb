"""Placing host batches on the device mesh, one process's rows at a time.

Axis letters: B global batch, b this process's rows, L sequence length.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

from moejax import sharding


class Placement:
  """Puts this process's rows of global batches onto the mesh.

  Args (constructor):
    mesh: the device mesh.
    loader: the train loader; its `.batch_size` is the global B. A loader
      with `process_index` / `process_count` (data.BatchLoader) must load
      exactly this process's `sharding.process_batch_rows`.
  """

  KEYS = ('tokens', 'domain')  # what the steps read; 'domain': labels

  def __init__(self, mesh: jax.sharding.Mesh, loader: Any):
    self.mesh, self.batch_size = mesh, loader.batch_size
    rows = sharding.process_batch_rows(mesh, self.batch_size)
    if hasattr(loader, 'process_index'):
      local = self.batch_size // loader.process_count
      mine = slice(loader.process_index * local,
                   (loader.process_index + 1) * local)
      if mine != rows:
        raise ValueError(
            f'this process loads rows {mine.start}:{mine.stop} of each '
            f'global batch of {self.batch_size}, but its devices hold rows '
            f'{rows.start}:{rows.stop}; build the loader with process_index'
            f' = {rows.start // (rows.stop - rows.start)}, process_count = '
            f'{self.batch_size // (rows.stop - rows.start)}.')

  def batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """{'tokens': [b, L + 1], 'domain': [b], ...} host rows -> global
    {'tokens': [B, L + 1], 'domain': [B]} split over the batch axes."""
    return sharding.shard_batch({k: batch[k] for k in self.KEYS if k in batch},
                                self.mesh, self.batch_size)

  def eval_batches(self, batches: Sequence[Mapping[str, np.ndarray]]
                   ) -> list[dict[str, Any]]:
    """Eval batches placed once; 'optimal_nll' [B] of the global batch as a
    host array (gathered from every process), for eval/excess_loss."""
    out = []
    for b in batches:
      placed = self.batch(b)
      if 'optimal_nll' in b:
        nll = np.asarray(b['optimal_nll'])
        if jax.process_count() > 1:
          nll = multihost_utils.process_allgather(nll, tiled=True)
        placed['optimal_nll'] = nll
      out.append(placed)
    return out
