"""Router losses and routing metrics.

Axis letters: G groups, S tokens per group, E experts, K chosen experts.

Every quantity ignores padding (`valid[G, S] == False`). Scores are turned
into a distribution over experts first (`expert_probs`): softmax scores are
already one; sigmoid scores are divided by their sum over E (DeepSeek-V3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # routing.py imports this module.
  from moejax.routing import RoutingDecision


def expert_probs(scores: jax.Array, score_fn: str) -> jax.Array:
  """[G, S, E] scores -> [G, S, E] probabilities over experts."""
  if score_fn == 'sigmoid':
    return scores / jnp.maximum(scores.sum(-1, keepdims=True), 1e-9)
  return scores


def choice_counts(decision: RoutingDecision, valid: jax.Array) -> jax.Array:
  """[G, E]: token-choices per expert before capacity (padding excluded)."""
  onehot = jax.nn.one_hot(decision.expert_index, decision.num_experts,
                          dtype=jnp.float32)  # [G, S, K, E]
  return jnp.einsum('GSKE,GS->GE', onehot, valid.astype(jnp.float32))


def load_balance_loss(probs: jax.Array, decision: RoutingDecision,
                      valid: jax.Array) -> jax.Array:
  """Switch load-balance loss `E * sum_e f_e * P_e`, per group, averaged.

  f_e is the fraction of the group's (non-padding) token-choices that
  selected e before capacity (all K choices count, so sum_e f_e = 1); P_e the
  mean router probability of e. A perfectly balanced router gives 1.0.
  flaxformer's top-K variant is K times this value.

  Args:
    probs: [G, S, E] router probabilities.
    decision: the routing decision (its expert_index is used).
    valid: [G, S] bool.

  Returns:
    Scalar float32; groups with no valid token are left out of the mean.
  """
  k = decision.expert_index.shape[-1]
  valid_f = valid.astype(jnp.float32)
  tokens = valid_f.sum(-1)  # [G]
  f = choice_counts(decision, valid) / jnp.maximum(tokens * k, 1)[:, None]
  p = jnp.einsum('GSE,GS->GE', probs, valid_f) / jnp.maximum(tokens, 1)[:, None]
  per_group = decision.num_experts * jnp.sum(f * p, axis=-1)  # [G]
  has_tokens = (tokens > 0).astype(jnp.float32)
  return jnp.sum(per_group * has_tokens) / jnp.maximum(has_tokens.sum(), 1)


def z_loss(logits: jax.Array, valid: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean over valid tokens of logsumexp(logits)^2.

  Args:
    logits: [G, S, E] float32 router logits.
    valid: [G, S] bool.

  Returns:
    Scalar float32. Example: logits [[0, 0]] -> (ln 2)^2 = 0.480453.
  """
  lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # [G, S]
  valid_f = valid.astype(jnp.float32)
  return jnp.sum(lse ** 2 * valid_f) / jnp.maximum(valid_f.sum(), 1)


def routing_metrics(probs: jax.Array, decision: RoutingDecision,
                    valid: jax.Array) -> dict:
  """Per-layer routing metrics over all valid tokens of all groups.

  Args:
    probs: [G, S, E] router probabilities.
    decision: the routing decision.
    valid: [G, S] bool.

  Returns:
    dict of float32 arrays:
      expert_load [E]: fraction of token-choices per expert before capacity
        (sums to 1);
      max_violation: max_e load_e / mean_e load_e - 1 (0 = balanced);
      drop_fraction: requested assignments that found no slot / requested;
      fully_dropped_fraction: valid tokens with no kept assignment / valid;
      router_entropy: mean entropy (nats) of the router distribution;
      top1_prob: mean of the largest router probability;
      capacity: the effective C.
  """
  e = decision.num_experts
  valid_f = valid.astype(jnp.float32)
  num_valid = jnp.maximum(valid_f.sum(), 1)
  counts = choice_counts(decision, valid).sum(0)  # [E]
  load = counts / jnp.maximum(counts.sum(), 1)
  num_requested = decision.request.astype(jnp.float32).sum()
  num_kept = decision.kept.astype(jnp.float32).sum()
  token_kept = decision.kept.any(-1).astype(jnp.float32)  # [G, S]
  entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
  return {
      'expert_load': load,
      'max_violation': e * jnp.max(load) - 1.0,
      'drop_fraction': (num_requested - num_kept) / jnp.maximum(
          num_requested, 1),
      'fully_dropped_fraction': jnp.sum((1 - token_kept) * valid_f) /
                                num_valid,
      'router_entropy': jnp.sum(entropy * valid_f) / num_valid,
      'top1_prob': jnp.sum(probs.max(-1) * valid_f) / num_valid,
      'capacity': jnp.asarray(decision.capacity, jnp.float32),
  }
