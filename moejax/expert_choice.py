"""Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens.

Axis letters: G groups, S tokens per group, D model width, E experts,
C capacity (tokens each expert takes per group).

Token choice asks every token for its K best experts; expert choice turns
the score matrix around: per group, expert e takes the C tokens with the
largest score[:, e]. Every expert is exactly full (perfect balance, no aux
loss), but a token may be taken by 0, 1 or several experts, and a token's
fate depends on every other token of its group, so a causal model must not
use it.

The result is an ordinary `RoutingDecision` with K = E: choice k of a token
is expert k, `slot` is the token's rank in expert k's order (kept iff rank
< C), `gate` the token's score for expert k. Every dispatcher therefore
handles expert choice unchanged.

Capacity: C = ceil(cf * S / E) (`compute_capacity` with K = 1), so cf is the
average number of experts per token (Zhou et al.'s c; 2 in their paper).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import losses
from moejax import routing


def route_expert_choice(scores: jax.Array, capacity: int,
                        valid: Optional[jax.Array] = None
                        ) -> routing.RoutingDecision:
  """Expert-choice routing from scores.

  Args:
    scores: [G, S, E] router scores (softmax over E in Zhou et al.).
    capacity: C, tokens per expert per group.
    valid: optional [G, S] bool, False for padding (never taken).

  Returns:
    A RoutingDecision with K = E (see the module docstring). Ties between
    tokens go to the earlier position.

  Example (E=3, C=2): probs [[.4,0,.2],[.5,.1,.4],[.3,.2,.6]]: expert 0
  takes tokens 1, 0; expert 1 takes 2, 1; expert 2 takes 2, 1. Token 0 is
  processed by one expert, token 1 by three, token 2 by two.
  """
  g, s, e = scores.shape
  valid = jnp.ones((g, s), bool) if valid is None else valid.astype(bool)
  # Padding sorts after every real token (scores are finite).
  selection = jnp.where(valid[..., None], scores, -jnp.inf)  # [G, S, E]
  order = jnp.argsort(-selection, axis=1, stable=True)  # [G, S, E] tokens
  rank = jnp.argsort(order, axis=1).astype(jnp.int32)  # [G, S, E]
  kept = valid[..., None] & (rank < capacity)
  expert_index = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (g, s, e))
  return routing.RoutingDecision(
      expert_index=expert_index, slot=rank, gate=scores.astype(jnp.float32),
      request=jnp.broadcast_to(valid[..., None], (g, s, e)), kept=kept,
      num_experts=e, capacity=capacity)


def coverage_metrics(decision: routing.RoutingDecision,
                     valid: jax.Array) -> dict:
  """How many experts processed each valid token.

  Args:
    decision: an expert-choice decision (K = E).
    valid: [G, S] bool.

  Returns:
    float32 scalars: `tokens_by_0_experts`, `tokens_by_1_expert`,
    `tokens_by_2plus_experts` (fractions of valid tokens; they sum to 1),
    `experts_per_token` (mean), `min_experts_per_token`,
    `max_experts_per_token`.
  """
  valid_f = valid.astype(jnp.float32)
  n = jnp.maximum(valid_f.sum(), 1)
  per_token = decision.kept.sum(-1).astype(jnp.float32)  # [G, S]
  frac = lambda m: jnp.sum(m.astype(jnp.float32) * valid_f) / n
  big = jnp.float32(decision.num_experts + 1)
  return {
      'tokens_by_0_experts': frac(per_token == 0),
      'tokens_by_1_expert': frac(per_token == 1),
      'tokens_by_2plus_experts': frac(per_token >= 2),
      'experts_per_token': jnp.sum(per_token * valid_f) / n,
      'min_experts_per_token': jnp.min(jnp.where(valid, per_token, big)),
      'max_experts_per_token': jnp.max(jnp.where(valid, per_token, -1.0)),
  }


def expert_choice_metrics(probs: jax.Array,
                          decision: routing.RoutingDecision,
                          valid: jax.Array) -> dict:
  """The per-layer metrics of `losses.routing_metrics`, for expert choice.

  `expert_load` counts the kept assignments (uniform when every expert can
  fill its C slots); `drop_fraction` and `fully_dropped_fraction` are both
  the fraction of valid tokens no expert took (a token "requests" nothing
  in expert choice). Plus the `coverage_metrics`.

  Args:
    probs: [G, S, E] router probabilities.
    decision: the expert-choice decision.
    valid: [G, S] bool.

  Returns:
    dict of float32 arrays (`expert_load` [E], the rest scalars).
  """
  metrics = losses.routing_metrics(probs, decision, valid)
  counts = jnp.einsum('GSE,GS->E', decision.kept.astype(jnp.float32),
                      valid.astype(jnp.float32))
  load = counts / jnp.maximum(counts.sum(), 1)
  coverage = coverage_metrics(decision, valid)
  metrics.update(
      expert_load=load,
      max_violation=decision.num_experts * jnp.max(load) - 1.0,
      drop_fraction=coverage['tokens_by_0_experts'],
      fully_dropped_fraction=coverage['tokens_by_0_experts'])
  metrics.update(coverage)
  return metrics


class ExpertChoiceRouter(nn.Module):
  """Linen expert-choice router: x [G, S, D] -> (RoutingDecision, aux).

  Params: `kernel` [D, E] float32 (the same name, shape and init as the
  token-choice `Router`). aux: `aux_loss` = 0 (expert choice needs none),
  `z_loss`, and `expert_choice_metrics`.
  """
  num_experts: int
  score_fn: str = 'softmax'
  kernel_init: nn.initializers.Initializer = nn.initializers.variance_scaling(
      0.1, 'fan_in', 'truncated_normal')

  @nn.compact
  def __call__(self, x: jax.Array, capacity: int,
               valid: Optional[jax.Array] = None,
               deterministic: bool = True):
    """Routes x [G, S, D]; valid [G, S] bool (False = padding)."""
    del deterministic  # Expert choice has no training-only randomness.
    g, s, d = x.shape
    valid = jnp.ones((g, s), bool) if valid is None else valid
    kernel = self.param('kernel', self.kernel_init, (d, self.num_experts),
                        jnp.float32)
    logits = routing.router_logits(x, kernel)  # [G, S, E]
    scores = routing.scores_from_logits(logits, self.score_fn)
    decision = route_expert_choice(scores, capacity, valid)
    probs = losses.expert_probs(scores, self.score_fn)
    aux = {'aux_loss': jnp.zeros((), jnp.float32),
           'z_loss': losses.z_loss(logits, valid)}
    aux.update(expert_choice_metrics(probs, decision, valid))
    return decision, aux
