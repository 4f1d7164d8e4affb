"""Dispatchers: move tokens [G, S, D] into expert buffers [G, E, C, D] and back.

Axis letters: G groups, S tokens per group, D model width, E experts,
K chosen experts per token, C capacity.

Every dispatcher is a pair of pure functions taking the same
`RoutingDecision`, and all give the same result (tests assert it):

  dispatch(x [G, S, D], decision) -> buffers [G, E, C, D]
  combine(y [G, E, C, D], decision) -> [G, S, D]
      = sum_k combine_weight[g, s, k] * y[g, e_k, c_k]

Empty slots hold zeros; a dropped assignment contributes exactly 0.

  einsum: one-hot dispatch/combine tensors [G, S, E, C] (GShard). The
    reference; O(G*S*E*C*D) FLOPs.
  gather: integer slot indices; a gather into the buffers and a gather
    back (their gradients are scatter-adds). O(G*S*K*D) data movement.
  ragged: no [G, E, C, D] buffers at all. The kept assignments are sorted
    by expert into one [N, D] array (N = G*S*K), the experts run as grouped
    matmuls (`jax.lax.ragged_dot`, `experts.RaggedExpertBank`) and the rows
    are gathered back. With capacity_factor=None nothing is dropped
    (dropless); with a capacity it honours the same drops as the others.
    Fast only where the backend has a grouped-matmul kernel (GPU/TPU); on
    CPU ragged_dot lowers to a masked dense op (~E x the FLOPs).
  blocked: sorted rows as 'ragged', each expert's run padded to blocks of
    b rows, each block's FFN run with its expert's weights in a loop
    (moejax.blocked; custom VJP). The dropless path for CPU.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from moejax.routing import RoutingDecision


class Dispatcher(NamedTuple):
  """A buffer dispatcher: `dispatch` into [G, E, C, D], `combine` back."""
  dispatch: Callable[[jax.Array, RoutingDecision], jax.Array]
  combine: Callable[[jax.Array, RoutingDecision], jax.Array]


def _one_hot_tensors(decision: RoutingDecision, weights: jax.Array):
  """[G, S, K] per-choice weights -> [G, S, E, C] (0 where not kept)."""
  expert = jax.nn.one_hot(decision.expert_index, decision.num_experts,
                          dtype=weights.dtype)  # [G, S, K, E]
  # one_hot gives an all-zero row for slots >= C (dropped choices).
  slot = jax.nn.one_hot(decision.slot, decision.capacity,
                        dtype=weights.dtype)  # [G, S, K, C]
  weights = jnp.where(decision.kept, weights, 0).astype(weights.dtype)
  return jnp.einsum('GSKE,GSKC,GSK->GSEC', expert, slot, weights)


def einsum_dispatch(x: jax.Array, decision: RoutingDecision) -> jax.Array:
  """x [G, S, D] -> expert buffers [G, E, C, D] via a one-hot einsum."""
  mask = _one_hot_tensors(decision, jnp.ones(decision.kept.shape, x.dtype))
  return jnp.einsum('GSEC,GSD->GECD', mask, x)


def einsum_combine(y: jax.Array, decision: RoutingDecision) -> jax.Array:
  """Expert outputs [G, E, C, D] -> [G, S, D] weighted by combine weights."""
  combine = _one_hot_tensors(decision, decision.gate.astype(y.dtype))
  return jnp.einsum('GSEC,GECD->GSD', combine, y)


def _flat_slot(decision: RoutingDecision) -> jax.Array:
  """[G, S, K] index e*C + c into the flattened buffers; E*C if not kept."""
  empty = decision.num_experts * decision.capacity
  flat = decision.expert_index * decision.capacity + decision.slot
  return jnp.where(decision.kept, flat, empty).astype(jnp.int32)


def _token_of_slot(flat_slot: jax.Array, num_slots: int) -> jax.Array:
  """[G, S, K] slot per choice -> [G, E*C] token per slot (S if empty)."""
  _, s, k = flat_slot.shape
  token = jnp.repeat(jnp.arange(s, dtype=jnp.int32), k)  # [S*K]

  def one_group(idx):  # [S, K] -> [E*C]
    # Index E*C collects the dropped choices and is sliced off.
    table = jnp.full((num_slots + 1,), s, jnp.int32)
    return table.at[idx.reshape(-1)].set(token)[:num_slots]

  return jax.vmap(one_group)(flat_slot)


def _append_zero_row(x: jax.Array) -> jax.Array:
  """[G, N, D] -> [G, N + 1, D] with a zero row at index N."""
  return jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)


def gather_dispatch(x: jax.Array, decision: RoutingDecision) -> jax.Array:
  """x [G, S, D] -> expert buffers [G, E, C, D] by gathering tokens."""
  g, _, d = x.shape
  e, c = decision.num_experts, decision.capacity
  token = _token_of_slot(_flat_slot(decision), e * c)  # [G, E*C]
  buffers = jnp.take_along_axis(_append_zero_row(x), token[..., None],
                                axis=1)  # [G, E*C, D]
  return buffers.reshape(g, e, c, d)


def gather_combine(y: jax.Array, decision: RoutingDecision) -> jax.Array:
  """Expert outputs [G, E, C, D] -> [G, S, D] by gathering each choice."""
  g, e, c, d = y.shape
  _, s, k = decision.slot.shape
  flat = _append_zero_row(y.reshape(g, e * c, d))  # [G, E*C + 1, D]
  index = _flat_slot(decision).reshape(g, s * k, 1)
  picked = jnp.take_along_axis(flat, index, axis=1).reshape(g, s, k, d)
  weights = decision.combine_weight.astype(y.dtype)  # [G, S, K]
  return jnp.einsum('GSKD,GSK->GSD', picked, weights)


class RaggedPlan(NamedTuple):
  """Where every assignment goes in the expert-sorted [N, D] rows."""
  order: jax.Array  # [N] int32, assignment (flat g, s, k) of each row
  group_sizes: jax.Array  # [E] int32, kept rows per expert (sorted order)
  token: jax.Array  # [N] int32, flat token (g * S + s) of each row


def ragged_plan(decision: RoutingDecision) -> RaggedPlan:
  """Sorts the N = G*S*K assignments by expert, kept ones first.

  Rows past sum(group_sizes) belong to dropped or unrequested assignments;
  `ragged_dot` leaves them zero and their combine weight is 0.
  """
  g, s, k = decision.expert_index.shape
  e = decision.num_experts
  key = jnp.where(decision.kept, decision.expert_index, e).reshape(-1)  # [N]
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  group_sizes = jnp.zeros((e + 1,), jnp.int32).at[key].add(1)[:e]
  token = jnp.repeat(jnp.arange(g * s, dtype=jnp.int32), k)[order]
  return RaggedPlan(order, group_sizes, token)


def ragged_dispatch(x: jax.Array, plan: RaggedPlan) -> jax.Array:
  """x [G, S, D] -> expert-sorted rows [N, D]."""
  return x.reshape(-1, x.shape[-1])[plan.token]


def ragged_combine(rows: jax.Array, plan: RaggedPlan,
                   decision: RoutingDecision) -> jax.Array:
  """Expert outputs in sorted rows [N, D] -> [G, S, D]."""
  g, s, k = decision.expert_index.shape
  inverse = jnp.argsort(plan.order)  # row of each assignment
  picked = rows[inverse].reshape(g, s, k, -1)  # [G, S, K, D]
  weights = decision.combine_weight.astype(rows.dtype)  # 0 where dropped
  picked = jnp.where(decision.kept[..., None], picked, 0)
  return jnp.einsum('GSKD,GSK->GSD', picked, weights)


DISPATCHERS = {
    'einsum': Dispatcher(einsum_dispatch, einsum_combine),
    'gather': Dispatcher(gather_dispatch, gather_combine),
}

def per_token_combine(y: jax.Array, decision: RoutingDecision) -> jax.Array:
  """Each choice's expert output [G, S, K, D] -> [G, S, D]; a dropped
  choice (or padding) contributes exactly 0."""
  y = jnp.where(decision.kept[..., None], y, 0)
  weights = decision.combine_weight.astype(y.dtype)  # [G, S, K]
  return jnp.einsum('GSKD,GSK->GSD', y, weights)


# 'ragged', 'per_token' and 'blocked' have no [G, E, C, D] buffers, so they
# are not `Dispatcher`s; the layer runs 'ragged' through `ragged_plan` /
# `ragged_dispatch` / `ragged_combine`, 'per_token' through
# `experts.TokenExpertBank` and `per_token_combine`, and 'blocked' through
# `moejax.blocked` and `experts.BlockedExpertBank`.
DISPATCHER_NAMES = tuple(DISPATCHERS) + ('ragged', 'per_token', 'blocked')
