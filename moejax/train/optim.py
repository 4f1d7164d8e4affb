"""AdamW with linear warmup, cosine decay and global-norm clipping.

Weight decay applies only to matrices (kernels, embeddings, expert banks:
ndim >= 2); norm scales and biases (ndim < 2) are not decayed. With a
`FinetunePlan` (moejax.train.finetune) only the params it trains get
optimizer state and updates.

Mixed precision (`master_weights=True`): params stored in bfloat16 (or
float16) keep a float32 master copy in the optimizer state. The optimizer
(clipping, AdamW moments, weight decay) sees float32 gradients and the
master copy; the stored param becomes the updated master rounded to its
dtype. Without it, an update smaller than half the param's rounding step
(bfloat16 has 8 significant bits: 1/256 relative) is lost every step.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
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
                   plan: Optional[finetune.FinetunePlan] = None,
                   master_weights: bool = False
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
    master_weights: keep float32 master copies of the trained params that
      are stored in a lower precision (`with_float32_master`).

  Returns:
    An optax GradientTransformation.
  """
  optimizer = _clipped_adamw(learning_rate, warmup_steps, total_steps,
                             weight_decay, grad_clip, b1, b2, eps,
                             min_lr_ratio, plan)
  if not master_weights:
    return optimizer
  trained = None
  if plan is not None and not plan.trains_everything:
    trained = lambda params: jax.tree.map(
        lambda label: label != finetune.FROZEN,
        finetune.param_labels(params, plan))
  return with_float32_master(optimizer, trained)


def _clipped_adamw(learning_rate, warmup_steps, total_steps, weight_decay,
                   grad_clip, b1, b2, eps, min_lr_ratio, plan):
  """make_optimizer's chain without master copies."""
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


class MasterState(NamedTuple):
  """State of `with_float32_master`: float32 copies of the params it keeps
  (optax.MaskedNode at the others) and the wrapped optimizer's state."""
  master: Any
  inner: Any


def _keeps_master(params: Any, trained: Optional[Any]) -> Any:
  """True for the leaves with a master copy: not float32, and trained
  (`trained`: a bool tree, None = all)."""
  low = jax.tree.map(lambda p: jnp.dtype(p.dtype) != jnp.float32, params)
  if trained is None:
    return low
  return jax.tree.map(lambda a, b: bool(a and b), low, trained)


def with_float32_master(
    inner: optax.GradientTransformation,
    trained: Optional[Callable[[Any], Any]] = None
) -> optax.GradientTransformation:
  """`inner` on float32 master copies of the low-precision params.

  For every param leaf that is not float32 (and that `trained` marks), the
  state holds a float32 copy m. An update casts its gradient to float32,
  runs `inner` on m (other leaves: on the param itself, as without the
  wrapper), sets m <- m + u, and returns the float32 update m - p, so that
  `optax.apply_updates` (p + u in float32, cast to p's dtype) stores m
  rounded to p's dtype. Float32 leaves get `inner`'s updates unchanged.

  Args:
    inner: the optimizer (e.g. make_optimizer's chain).
    trained: params -> bool tree of the leaves that train (frozen leaves
      need no master copy); None = all.

  Returns:
    An optax GradientTransformation whose state is a MasterState.
  """

  def layout(params):
    keep = _keeps_master(params, trained(params) if trained else None)
    return keep, jax.tree_util.tree_structure(params)

  def view(params, master, keep, treedef):  # what `inner` sees
    leaves = zip(treedef.flatten_up_to(params), treedef.flatten_up_to(master),
                 treedef.flatten_up_to(keep))
    return treedef.unflatten([m if k else p for p, m, k in leaves])

  def init_fn(params):
    keep, _ = layout(params)
    master = jax.tree.map(
        lambda p, k: p.astype(jnp.float32) if k else optax.MaskedNode(),
        params, keep)
    return MasterState(master, inner.init(jax.tree.map(
        lambda p, k: p.astype(jnp.float32) if k else p, params, keep)))

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError('with_float32_master needs the params.')
    keep, treedef = layout(params)
    full = view(params, state.master, keep, treedef)
    grads = jax.tree.map(lambda g, k: g.astype(jnp.float32) if k else g,
                         grads, keep)
    updates, inner_state = inner.update(grads, state.inner, full)
    new = optax.apply_updates(full, updates)  # master leaves: float32
    master = jax.tree.map(lambda m, k: m if k else optax.MaskedNode(), new,
                          keep)
    updates = jax.tree.map(
        lambda m, p, u, k: m - p.astype(jnp.float32) if k else u, new,
        params, updates, keep)
    return updates, MasterState(master, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)
