"""AdamW with linear warmup, cosine decay and global-norm clipping.

Weight decay applies only to matrices (kernels, embeddings, expert banks:
ndim >= 2); norm scales and biases (ndim < 2) are not decayed. With a
`FinetunePlan` (moejax.train.finetune) only the params it trains get
optimizer state and updates.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import optax

from moejax.train import finetune


def lr_schedule(learning_rate: float, warmup_steps: int, total_steps: int,
                min_lr_ratio: float = 0.1) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay.

  Args:
    learning_rate: peak learning rate (> 0).
    warmup_steps: steps of linear warmup (>= 0).
    total_steps: total training steps; the cosine ends here.
    min_lr_ratio: final learning rate as a fraction of the peak.

  Returns:
    An optax schedule step -> learning rate.
  """
  warmup_steps = min(warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1),
      end_value=learning_rate * min_lr_ratio)


def decay_mask(params: Any) -> Any:
  """True for the leaves that get weight decay (ndim >= 2).

  Args:
    params: a param pytree (arrays or ShapeDtypeStructs).

  Returns:
    A pytree of bools with the structure of `params`.
  """
  return jax.tree.map(lambda p: len(p.shape) >= 2, params)


def make_optimizer(learning_rate: float, warmup_steps: int, total_steps: int,
                   weight_decay: float = 0.1, grad_clip: float = 1.0,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   min_lr_ratio: float = 0.1,
                   plan: Optional[finetune.FinetunePlan] = None
                   ) -> optax.GradientTransformation:
  """Global-norm clipping followed by AdamW on the warmup-cosine schedule.

  Args:
    learning_rate: peak learning rate.
    warmup_steps: linear warmup steps.
    total_steps: total steps (end of the cosine).
    weight_decay: decoupled weight decay on matrices only (see decay_mask).
    grad_clip: max global gradient norm; <= 0 disables clipping.
    b1: Adam beta1.
    b2: Adam beta2.
    eps: Adam epsilon.
    min_lr_ratio: final learning rate / peak.
    plan: which params train (None, or a plan that freezes nothing: all,
      with exactly the optimizer of plain training). Frozen params get no
      optimizer state and zero updates; their gradients are zeroed before
      the clipping norm (see moejax.train.finetune).

  Returns:
    An optax GradientTransformation.
  """
  schedule = lr_schedule(learning_rate, warmup_steps, total_steps,
                         min_lr_ratio)
  adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps,
                      weight_decay=weight_decay, mask=decay_mask)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  if plan is None or plan.trains_everything:
    return optax.chain(*parts, adamw)
  inner = {finetune.TRAIN: adamw, finetune.FROZEN: optax.set_to_zero()}
  if plan.expert_rows is not None:
    inner[finetune.ROWS] = finetune.select_rows(adamw, plan.expert_rows)
  return optax.chain(
      finetune.zero_frozen(plan), *parts,
      optax.multi_transform(
          inner, lambda params: finetune.param_labels(params, plan)))
