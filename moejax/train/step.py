"""Loss, jitted train step and eval step.

Axis letters: B batch, L sequence length (inputs), V vocab.

A batch is `tokens` [B, L + 1] int32: inputs `tokens[:, :-1]`, targets
`tokens[:, 1:]`. The loss is

    lm_loss + aux_loss_weight * aux['aux_loss'] + z_loss_weight * aux['z_loss']

where lm_loss is the mean next-token cross-entropy over the non-padding
target positions. The train step's RNG is `fold_in(key(seed), step)`, so a
step is a pure function of (state, batch, seed): resumed runs are bitwise
identical to uninterrupted ones.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from moejax.train.state import TrainState

Metrics = dict[str, jax.Array]


def step_rng(seed: int, step: jax.Array) -> jax.Array:
  """The 'router' RNG key of training step `step`: fold_in(key(seed), step).

  Args:
    seed: run seed.
    step: int scalar (traced or concrete).

  Returns:
    A typed PRNG key.
  """
  return jax.random.fold_in(jax.random.key(seed), step)


def split_tokens(tokens: jax.Array, pad_id: Optional[int] = None):
  """Splits [B, L + 1] tokens into model inputs, targets and loss weights.

  Args:
    tokens: [B, L + 1] int32.
    pad_id: padding token id, or None if nothing is padding.

  Returns:
    inputs [B, L] int32, targets [B, L] int32, weights [B, L] float32 (0 at
    padding targets), padding_mask [B, L] bool (True where the input is
    padding) or None.
  """
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  if pad_id is None:
    return inputs, targets, jnp.ones(targets.shape, jnp.float32), None
  weights = (targets != pad_id).astype(jnp.float32)
  return inputs, targets, weights, inputs == pad_id


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Weighted next-token cross-entropy, summed.

  Args:
    logits: [B, L, V] float32.
    targets: [B, L] int32.
    weights: [B, L] float32.

  Returns:
    (sum of weighted per-token NLL, sum of weights), float32 scalars.
  """
  nll = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  return jnp.sum(nll * weights), jnp.sum(weights)


def layer_metrics(aux: dict, prefix: str = 'moe') -> Metrics:
  """Flattens the per-layer MoE aux into '<prefix>/<block>/<name>' entries.

  Args:
    aux: the model's aux dict with aux['layers'] = {block: MoeLayer aux}.
    prefix: key prefix.

  Returns:
    {'moe/block_i/aux_loss': scalar, ..., 'moe/block_i/expert_load': [E]}.
  """
  return {f'{prefix}/{block}/{name}': value
          for block, layer in aux.get('layers', {}).items()
          for name, value in layer.items()}


def compute_loss(params: Any, model: nn.Module, tokens: jax.Array, *,
                 deterministic: bool, rng: Optional[jax.Array] = None,
                 aux_loss_weight: float = 0.0, z_loss_weight: float = 0.0,
                 pad_id: Optional[int] = None) -> tuple[jax.Array, Metrics]:
  """Total training loss of one batch and its parts.

  Args:
    params: the model's params.
    model: a TransformerLM-like module returning (logits [B, L, V], aux).
    tokens: [B, L + 1] int32.
    deterministic: eval mode of the MoE layers.
    rng: 'router' key (needed when deterministic=False).
    aux_loss_weight: weight of aux['aux_loss'].
    z_loss_weight: weight of aux['z_loss'].
    pad_id: padding token id or None.

  Returns:
    loss (float32 scalar) and metrics: 'loss', 'lm_loss', 'aux_loss',
    'z_loss', 'drop_fraction', 'max_violation', 'nll_sum', 'tokens', plus
    the per-layer 'moe/...' entries.
  """
  inputs, targets, weights, padding_mask = split_tokens(tokens, pad_id)
  rngs = {'router': rng} if rng is not None else {}
  logits, aux = model.apply({'params': params}, inputs,
                            padding_mask=padding_mask,
                            deterministic=deterministic, rngs=rngs)
  nll_sum, count = cross_entropy(logits, targets, weights)
  lm_loss = nll_sum / jnp.maximum(count, 1.0)
  loss = (lm_loss + aux_loss_weight * aux['aux_loss'] +
          z_loss_weight * aux['z_loss'])
  metrics = {'loss': loss, 'lm_loss': lm_loss, 'nll_sum': nll_sum,
             'tokens': count}
  for key in ('aux_loss', 'z_loss', 'drop_fraction', 'max_violation'):
    metrics[key] = aux[key]
  metrics.update(layer_metrics(aux))
  return loss, metrics


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    *, seed: int, aux_loss_weight: float = 0.0,
                    z_loss_weight: float = 0.0, pad_id: Optional[int] = None,
                    learning_rate_fn: Optional[optax.Schedule] = None
                    ) -> Callable[[TrainState, jax.Array],
                                  tuple[TrainState, Metrics]]:
  """Builds the jitted train step (the state argument is donated).

  Args:
    model: the flax module.
    optimizer: the optax transformation.
    seed: run seed; step t uses step_rng(seed, t).
    aux_loss_weight: weight of the load-balancing loss.
    z_loss_weight: weight of the router z-loss.
    pad_id: padding token id or None.
    learning_rate_fn: schedule, only to report 'learning_rate'.

  Returns:
    step(state, tokens [B, L + 1]) -> (new state, metrics) where metrics
    holds the compute_loss metrics (per-layer ones too) plus 'grad_norm'
    (before clipping), 'param_norm' (after the update) and 'learning_rate'.
  """

  def train_step(state: TrainState, tokens: jax.Array):
    """One AdamW update on tokens [B, L + 1]; returns (state, metrics)."""
    loss_fn = lambda p: compute_loss(
        p, model, tokens, deterministic=False,
        rng=step_rng(seed, state.step), aux_loss_weight=aux_loss_weight,
        z_loss_weight=z_loss_weight, pad_id=pad_id)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state,
                                          state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    metrics['param_norm'] = optax.tree.norm(params)
    if learning_rate_fn is not None:
      metrics['learning_rate'] = jnp.asarray(learning_rate_fn(state.step),
                                             jnp.float32)
    new_state = TrainState(step=state.step + 1, params=params,
                           opt_state=opt_state)
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=0)


def make_eval_step(model: nn.Module, *, aux_loss_weight: float = 0.0,
                   z_loss_weight: float = 0.0, pad_id: Optional[int] = None
                   ) -> Callable[[Any, jax.Array], Metrics]:
  """Builds the jitted eval step (deterministic=True: eval capacity factor).

  Args:
    model: the flax module.
    aux_loss_weight: as in training (for the reported total 'loss').
    z_loss_weight: as in training.
    pad_id: padding token id or None.

  Returns:
    step(params, tokens [B, L + 1]) -> the compute_loss metrics of the batch.
  """

  def eval_step(params: Any, tokens: jax.Array) -> Metrics:
    """Deterministic metrics of tokens [B, L + 1]."""
    return compute_loss(params, model, tokens, deterministic=True,
                        aux_loss_weight=aux_loss_weight,
                        z_loss_weight=z_loss_weight, pad_id=pad_id)[1]

  return jax.jit(eval_step)
