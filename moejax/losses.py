"""Router losses and routing metrics.

Axis letters: G groups, S tokens per group, E experts, K chosen experts.

Every quantity ignores padding (`valid[G, S] == False`). Scores are turned
into a distribution over experts first (`expert_probs`): softmax scores are
already one; sigmoid scores are divided by their sum over E (DeepSeek-V3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

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


AUX_LOSS_SCOPES = ('group', 'batch')


def load_balance_loss(probs: jax.Array, decision: RoutingDecision,
                      valid: jax.Array, scope: str = 'group',
                      step_counts: Optional[tuple[jax.Array, jax.Array]]
                      = None) -> jax.Array:
  """Switch load-balance loss `E * sum_e f_e * P_e`.

  f_e is the fraction of the (non-padding) token-choices that selected e
  before capacity (all K choices count, so sum_e f_e = 1); P_e the mean
  router probability of e. A perfectly balanced router gives 1.0.
  flaxformer's top-K variant is K times this value.

  scope 'group' (Switch, GShard): f and P per group, the loss averaged over
  the groups that have a valid token. 'batch' (global-batch balancing, Qiu
  et al. 2025): f and P over every valid token of all G groups of the call,
  i.e. the whole global batch of a step (on a mesh the sums run over the
  data-parallel devices: the arrays are global), so a group may lean on a
  few experts as long as the batch is balanced. Example, E = 2, K = 1, two
  groups of two tokens: group 0 picks expert 0 twice with probs (0.9, 0.1),
  (0.8, 0.2); group 1 picks expert 1 twice with (0.3, 0.7), (0.4, 0.6):
  'group' = mean(2 * 0.85, 2 * 0.65) = 1.5; 'batch' = 2 * (0.5 * 0.6 + 0.5 *
  0.4) = 1.0.

  Args:
    probs: [G, S, E] router probabilities.
    decision: the routing decision (its expert_index is used).
    valid: [G, S] bool.
    scope: 'group' | 'batch'.
    step_counts: scope 'batch' under gradient accumulation: (counts [E],
      tokens) of the step's whole batch (every micro-batch); f is taken from
      them and P from this call's tokens, so the micro-batches' values
      weighted by their share of the valid tokens sum to the whole batch's
      loss (its gradient too: f carries none). None: f from this call.

  Returns:
    Scalar float32.
  """
  if scope not in AUX_LOSS_SCOPES:
    raise ValueError(f'aux_loss_scope={scope!r} is not supported; allowed '
                     f'values: {", ".join(map(repr, AUX_LOSS_SCOPES))}.')
  k = decision.expert_index.shape[-1]
  valid_f = valid.astype(jnp.float32)
  counts = choice_counts(decision, valid)  # [G, E]
  mass = jnp.einsum('GSE,GS->GE', probs, valid_f)  # [G, E]
  tokens = valid_f.sum(-1)  # [G]
  if scope == 'batch':
    total = tokens.sum()
    if step_counts is None:
      f = counts.sum(0) / jnp.maximum(total * k, 1)
    else:
      f = step_counts[0] / jnp.maximum(step_counts[1] * k, 1)
    p = mass.sum(0) / jnp.maximum(total, 1)
    return decision.num_experts * jnp.sum(f * p)
  f = counts / jnp.maximum(tokens * k, 1)[:, None]
  p = mass / jnp.maximum(tokens, 1)[:, None]
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


def active_expert_metrics(decision: RoutingDecision,
                          valid: jax.Array) -> dict:
  """Metrics of routers that give a token a varying number of experts.

  For ReLU routing (`relu_router`) and null experts (`routing.Router` with
  `num_null_experts`), whose choices need not all request a slot.

  Args:
    decision: the routing decision (its request and kept).
    valid: [G, S] bool.

  Returns:
    dict of float32 scalars over the valid tokens:
      active_experts: real experts requested per token, before capacity
        (the realised active FLOPs in units of one expert FFN);
      kept_experts: real experts per token after capacity;
      fully_dropped_fraction: tokens that requested an expert and kept
        none / valid (a token that requested none is not dropped).
    Example: 2 valid tokens requesting (2, 0) experts, kept (1, 0):
    active 1.0, kept 0.5, fully dropped 0.
  """
  valid_f = valid.astype(jnp.float32)
  num_valid = jnp.maximum(valid_f.sum(), 1)
  requested = decision.request.astype(jnp.float32).sum(-1) * valid_f
  kept = decision.kept.astype(jnp.float32).sum(-1) * valid_f
  starved = ((requested > 0) & (kept == 0)).astype(jnp.float32)
  return {'active_experts': requested.sum() / num_valid,
          'kept_experts': kept.sum() / num_valid,
          'fully_dropped_fraction': starved.sum() / num_valid}


def null_fraction(decision: RoutingDecision, valid: jax.Array) -> jax.Array:
  """Share of the valid tokens' K choices that chose a null expert
  (expert_index >= E); float32 scalar."""
  k = decision.expert_index.shape[-1]
  null = (decision.expert_index >= decision.num_experts).astype(jnp.float32)
  valid_f = valid.astype(jnp.float32)
  return jnp.sum(null * valid_f[..., None]) / jnp.maximum(
      valid_f.sum() * k, 1)
