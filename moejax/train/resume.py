"""Where a run starts: its newest intact checkpoint, or step 0.

`start_state` restores the newest checkpoint that reads back intact (see
`Checkpointer.restore_latest_good`), drops the metric records written
after it and warns, step by step, of records before it that metrics.jsonl
lacks (a truncated or edited file: they cannot be recomputed). Without any
checkpoint the run starts at step 0, from `RunSpec.init_from`'s params and
model state if given, else from `RunSpec.seed`, and stale metric records
are dropped. `write_config` writes config.json atomically.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import jax

from moejax import sharding
from moejax.train import metrics as metrics_lib
from moejax.train import state as state_lib
from moejax.train.checkpoint import Checkpointer
from moejax.train.init_source import restore_init_variables
from moejax.train.run_spec import RunSpec


def start_state(model, optimizer, input_shape, spec: RunSpec,
                checkpointer: Checkpointer, mesh):
  """The state a run starts from, and its shardings.

  Args:
    model: the run's model.
    optimizer: its optax optimizer.
    input_shape: (B, L) of a train batch.
    spec: the run's RunSpec.
    checkpointer: the run's Checkpointer.
    mesh: the run's device mesh.

  Returns:
    (TrainState on the mesh, its NamedShardings).

  Raises:
    CheckpointError: checkpoints exist but none fits or reads back.
    InitSourceError: `spec.init_from` cannot initialise the model.
  """
  abstract = state_lib.abstract_train_state(model, optimizer, input_shape,
                                            mesh)
  shardings = sharding.tree_shardings(abstract, mesh)
  print(f'train state: {state_lib.tree_bytes(abstract) / 2**20:.2f} MiB '
        f'(params + optimizer + model state); mesh {dict(mesh.shape)}, '
        f'{jax.process_count()} process(es)', flush=True)
  target = sharding.abstract_with_shardings(abstract, mesh)
  state = checkpointer.restore_latest_good(target)
  if state is not None:
    _resumed(spec, int(state.step))
    return state, shardings
  metrics_path = os.path.join(spec.workdir, metrics_lib.METRICS_FILE)
  stale = len(metrics_lib.read_metrics(metrics_path))
  if jax.process_index() == 0:
    metrics_lib.truncate_metrics(metrics_path, 0)
  print(f'no checkpoint in {checkpointer.directory}: starting at step 0'
        + (f' (dropped {stale} stale metric records)' if stale else ''),
        flush=True)
  if spec.init_from:
    step, variables = restore_init_variables(
        spec.init_from, {'params': target.params,
                         'model_state': target.model_state})
    print(f'init: params and model state of {spec.init_from} (its '
          f'checkpoint {step}), a fresh optimizer state', flush=True)
    return state_lib.state_from_variables(
        variables['params'], variables['model_state'], optimizer,
        shardings, mesh), shardings
  return state_lib.create_train_state(
      model, optimizer, input_shape, spec.seed, mesh=mesh,
      initializer=state_lib.train_state_initializer(
          model, optimizer, input_shape, shardings)), shardings


def _resumed(spec: RunSpec, step: int) -> None:
  """Logs a resume at `step`: drops the metric records after it and warns
  of the records up to it that metrics.jsonl lacks (process 0 only)."""
  ignored = (f'; init from {spec.init_from} ignored (the run has its own '
             'checkpoints)' if spec.init_from else '')
  if jax.process_index() != 0:
    print(f'resumed from step {step}{ignored}', flush=True)
    return
  path = os.path.join(spec.workdir, metrics_lib.METRICS_FILE)
  kept = metrics_lib.truncate_metrics(path, step)
  print(f'resumed from step {step} ({kept} metric records kept){ignored}',
        flush=True)
  missing = metrics_lib.missing_steps(
      metrics_lib.read_metrics(path), step, spec.every[:2], spec.steps)
  for kind, steps in missing.items():
    if steps:
      print(f'warning: {path} lacks {len(steps)} {kind} record(s), of steps '
            f'{metrics_lib.format_steps(steps)} (up to the restored step '
            f'{step}): the file was truncated or edited. They are not '
            f'recomputed; the run continues from step {step} with that gap.',
            flush=True)


def write_config(workdir: str, config: Optional[Mapping[str, Any]]) -> None:
  """Writes config.json atomically (a kill leaves the old or the new one)."""
  if config is not None:
    path = os.path.join(workdir, 'config.json')
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      json.dump(dict(config), f, indent=2, sort_keys=True)
      f.write('\n')
    os.replace(path + '.tmp', path)
