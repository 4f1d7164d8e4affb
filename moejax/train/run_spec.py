"""RunSpec: the plain settings of one training run, in one frozen value.

`train_and_evaluate(model, spec, train_loader=..., eval_data=...,
optimizer=...)` takes the objects a run is built from as arguments and
everything else (where the run lives, how long it trains, the loss weights,
how often it logs, evaluates and saves) as a RunSpec:

    spec = RunSpec(workdir='runs/switch_tiny', steps=300, seed=0,
                   aux_loss_weight=0.01, log_every=25, eval_every=100,
                   checkpoint_every=100)

`experiments.train.run_spec(config, workdir)` builds it from a run config.
The library reads no config: a RunSpec holds plain Python values only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """What a run is, apart from its model, data and optimizer.

  Attributes:
    workdir: run directory (created): config.json, metrics.jsonl,
      tensorboard/, checkpoints/, plots/.
    steps: total number of updates (a resumed run continues to it).
    seed: run seed (param init and step RNGs).
    aux_loss_weight: load-balancing loss weight.
    z_loss_weight: router z-loss weight.
    pad_id: padding token id, or None.
    log_every: steps between train records (the last step is always one).
    eval_every: steps between evals (the last step always evaluates).
    checkpoint_every: steps between checkpoints (and the last step).
    keep_checkpoints: checkpoints kept on disk.
    config: the resolved run config (JSON-serialisable), written to
      config.json and into every checkpoint (so a work dir that lost its
      config.json still knows what its checkpoints were made with).
    init_from: a work dir whose newest intact checkpoint's params and model
      state start the run at step 0 (ignored when `workdir` has
      checkpoints: a resume).
    num_domains: N > 0: eval batches carry 'domain' ids in [0, N) and each
      eval records the specialisation score of every token-choice MoE layer.
    token_vocab: V > 0: each eval also records every token-choice MoE
      layer's token specialisation, the NMI of its top-1 expert with the
      input token id (ids in [0, V)), and its chance level.
    progress_bar: a tqdm bar; None: whether stderr is a terminal.
    grad_accum_steps: M >= 1: each step's batch in M micro-batches, their
      gradients summed (moejax.train.accumulate); M divides the batch.
  """
  workdir: str
  steps: int
  seed: int = 0
  aux_loss_weight: float = 0.0
  z_loss_weight: float = 0.0
  pad_id: Optional[int] = None
  log_every: int = 50
  eval_every: int = 200
  checkpoint_every: int = 500
  keep_checkpoints: int = 2
  config: Optional[Mapping[str, Any]] = None
  init_from: Optional[str] = None
  num_domains: int = 0
  token_vocab: int = 0
  progress_bar: Optional[bool] = None
  grad_accum_steps: int = 1

  def __post_init__(self):
    if not isinstance(self.workdir, str) or not self.workdir:
      raise ValueError(f'RunSpec.workdir={self.workdir!r}; allowed: a '
                       'non-empty directory path.')
    for name in ('steps', 'log_every', 'eval_every', 'checkpoint_every',
                 'num_domains', 'token_vocab'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 0:
        raise ValueError(f'RunSpec.{name}={value!r}; allowed: an int >= 0.')
    if (isinstance(self.grad_accum_steps, bool) or
        not isinstance(self.grad_accum_steps, int) or
        self.grad_accum_steps < 1):
      raise ValueError(f'RunSpec.grad_accum_steps={self.grad_accum_steps!r}; '
                       'allowed: an int >= 1.')
    if not isinstance(self.keep_checkpoints, int) or self.keep_checkpoints < 1:
      raise ValueError(f'RunSpec.keep_checkpoints={self.keep_checkpoints!r};'
                       ' allowed: an int >= 1.')

  @property
  def every(self) -> tuple[int, int, int]:
    """(log_every, eval_every, checkpoint_every)."""
    return self.log_every, self.eval_every, self.checkpoint_every
