"""Soft MoE routing (Puigcerver et al. 2023): every slot is a weighted average
of the group's tokens.

Axis letters: G groups, S tokens per group, D model width, E experts,
C slots per expert (`slots_per_expert`; the capacity axis of the expert
buffers).

logits[g, s, e, c] = x[g, s] . phi[:, e, c]. Dispatch weights are a softmax
over the tokens S (for every slot, they sum to 1 over the group's valid
tokens); combine weights a softmax over the E*C slots (for every token,
they sum to 1). Slot inputs are `sum_s dispatch * x`, each expert runs on
its C slots, and a token's output is `sum_{e,c} combine * y`. Nothing is
dropped and nothing is discrete, but a slot mixes every token of the group,
so a causal model must not use it.

With `normalize=True`, x and phi are L2-normalised over D and the logits
multiplied by a learned scalar `scale` (init 1), the paper's recipe for
large D.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import losses


def soft_weights(logits: jax.Array, valid: jax.Array):
  """Dispatch and combine weights from slot logits.

  Args:
    logits: [G, S, E, C] float32.
    valid: [G, S] bool; padding gets no dispatch weight and zero combine
      weights.

  Returns:
    dispatch [G, S, E, C] (sums to 1 over S for every slot of a group with
    a valid token) and combine [G, S, E, C] (sums to 1 over E, C for every
    valid token).
  """
  g, s, e, c = logits.shape
  mask = valid[:, :, None, None]
  low = jnp.finfo(jnp.float32).min
  dispatch = jax.nn.softmax(jnp.where(mask, logits, low), axis=1)
  dispatch = jnp.where(mask, dispatch, 0.0)
  combine = jax.nn.softmax(logits.reshape(g, s, e * c), axis=-1)
  combine = jnp.where(mask, combine.reshape(g, s, e, c), 0.0)
  return dispatch, combine


def soft_metrics(logits: jax.Array, combine: jax.Array,
                 valid: jax.Array) -> dict:
  """The per-layer metric keys of `losses.routing_metrics`, for Soft MoE.

  Every expert receives exactly C slots of unit total weight, so
  `expert_load` is uniform, `max_violation` and the drop fractions are 0.
  `router_entropy` and `top1_prob` describe the combine weights of a token
  over the E*C slots.

  Args:
    logits: [G, S, E, C] float32 slot logits.
    combine: [G, S, E, C] combine weights.
    valid: [G, S] bool.

  Returns:
    dict of float32 arrays (`expert_load` [E], the rest scalars).
  """
  g, s, e, c = combine.shape
  valid_f = valid.astype(jnp.float32)
  n = jnp.maximum(valid_f.sum(), 1)
  flat = combine.reshape(g, s, e * c)
  entropy = -jnp.sum(flat * jnp.log(jnp.maximum(flat, 1e-30)), axis=-1)
  zero = jnp.zeros((), jnp.float32)
  return {
      'z_loss': losses.z_loss(logits.reshape(g, s, e * c), valid),
      'expert_load': jnp.full((e,), 1.0 / e, jnp.float32),
      'max_violation': zero,
      'drop_fraction': zero,
      'fully_dropped_fraction': zero,
      'router_entropy': jnp.sum(entropy * valid_f) / n,
      'top1_prob': jnp.sum(flat.max(-1) * valid_f) / n,
      'capacity': jnp.asarray(c, jnp.float32),
  }


class SoftRouter(nn.Module):
  """Soft MoE router: x [G, S, D] -> (dispatch, combine, aux).

  Params: `kernel` [D, E, C] float32 (the slot parameters phi), and `scale`
  [] when `normalize`. aux: `aux_loss` = 0 and `soft_metrics`.
  """
  num_experts: int
  slots_per_expert: int = 1
  normalize: bool = False
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, valid: Optional[jax.Array] = None,
               capacity: Optional[int] = None, deterministic: bool = True):
    """Returns dispatch, combine [G, S, E, C] and the aux dict.

    `capacity` and `deterministic` are the router protocol's
    (moejax.routers) and unused: C is `slots_per_expert`, nothing is random.
    """
    del capacity, deterministic
    g, s, d = x.shape
    e, c = self.num_experts, self.slots_per_expert
    valid = jnp.ones((g, s), bool) if valid is None else valid
    phi = self.param('kernel', self.kernel_init, (d, e, c), jnp.float32)
    x = x.astype(jnp.float32)
    if self.normalize:
      x = x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-6)
      phi = phi * jax.lax.rsqrt(jnp.sum(phi * phi, 0, keepdims=True) + 1e-6)
    logits = jnp.einsum('GSD,DEC->GSEC', x, phi,
                        precision=jax.lax.Precision.HIGHEST)
    if self.normalize:
      logits = logits * self.param('scale', nn.initializers.ones, (),
                                   jnp.float32)
    dispatch, combine = soft_weights(logits, valid)
    aux = {'aux_loss': jnp.zeros((), jnp.float32)}
    aux.update(soft_metrics(logits, combine, valid))
    return dispatch, combine, aux


def soft_dispatch(x: jax.Array, dispatch: jax.Array) -> jax.Array:
  """x [G, S, D] -> slot inputs [G, E, C, D] = sum_s dispatch * x."""
  return jnp.einsum('GSEC,GSD->GECD', dispatch.astype(x.dtype), x)


def soft_combine(y: jax.Array, combine: jax.Array) -> jax.Array:
  """Slot outputs [G, E, C, D] -> [G, S, D] = sum_{e,c} combine * y."""
  return jnp.einsum('GSEC,GECD->GSD', combine.astype(y.dtype), y)
