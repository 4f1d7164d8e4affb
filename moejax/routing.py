"""Token-choice routing: router logits -> a routing decision, losses, metrics.

Axis letters (used in every shape comment and einsum):
  G groups, S tokens per group, D model width, E experts,
  K experts chosen per token, C capacity (slots per expert per group).

A router maps tokens `[G, S, D]` to a `RoutingDecision`: for every token and
each of its K choices, the chosen expert, the slot it occupies in that
expert's buffer, its combine weight, and whether it was kept. Dispatchers
(`moejax.dispatch`) consume the decision; routing never touches the experts.

Semantics (Switch / GShard defaults; every difference is an option):
  * logits are computed in float32 from a float32 copy of x;
  * jitter multiplies the router's copy of x by U[1-eps, 1+eps] (training);
  * selection is top-K over `scores + bias`; gates come from unbiased scores;
    `bias` is the loss-free balancing bias (DeepSeek-V3) when that is on;
  * group-limited selection (DeepSeek-V3) splits the E experts into
    `num_groups` contiguous groups, keeps the `topk_groups` groups with the
    largest sum of their top-2 selection scores and masks the others out;
  * overflow priority: 'choice' (all first choices in position order, then
    all second choices, ...), 'token' (position order, a token's K choices
    together), 'score' (tokens sorted by top-1 score, descending, then
    choice-major as in 'choice');
  * a dropped assignment contributes 0 and the surviving weights are not
    renormalised;
  * padding tokens request nothing, take no capacity, and count in no loss
    or metric.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from moejax import losses

SCORE_FNS = ('softmax', 'sigmoid')
PRIORITIES = ('choice', 'token', 'score')
SECOND_EXPERT_POLICIES = ('all', 'random')
# How group-limited selection scores a group: the sum of its two best
# selection scores (DeepSeek-V3) or its best one (DeepSeek-V2's
# 'group_limited_greedy').
GROUP_SCORES = ('top2_sum', 'max')
# Gradient accumulation (moejax.train.step): routers whose loss or state
# uses the counts of the whole step's batch sow their per-call counts into
# SOWN_COUNTS in a counting pass over the micro-batches, then read the
# step's totals from STEP_COUNTS in each micro-batch's forward pass.
SOWN_COUNTS = 'routing_counts'
STEP_COUNTS = 'step_routing_counts'


def step_totals(module: nn.Module, counts: jax.Array,
                valid: jax.Array) -> Optional[tuple]:
  """A router's side of gradient accumulation's counting pass.

  Sows this call's `counts` [E'] and valid-token count ([G, S] `valid`)
  into `SOWN_COUNTS` when that collection is mutable (the train step's
  counting pass over the micro-batches), and returns the step's totals
  (counts [E'], tokens) when the step passes them in `STEP_COUNTS`; None
  otherwise (the caller then uses its own call's counts).
  """
  if module.is_mutable_collection(SOWN_COUNTS):
    module.sow(SOWN_COUNTS, 'counts', counts)
    module.sow(SOWN_COUNTS, 'tokens', valid.astype(jnp.float32).sum())
  if not module.has_variable(STEP_COUNTS, 'counts'):
    return None
  return (module.get_variable(STEP_COUNTS, 'counts'),
          module.get_variable(STEP_COUNTS, 'tokens'))


@struct.dataclass
class RoutingDecision:
  """Where every token-choice goes. All arrays are [G, S, K]."""
  expert_index: jax.Array  # [G, S, K] int32, chosen expert per choice
  slot: jax.Array  # [G, S, K] int32, position in the expert buffer (< C if kept)
  gate: jax.Array  # [G, S, K] float32, combine weight before drops
  request: jax.Array  # [G, S, K] bool, asked for a slot (valid, not sampled out)
  kept: jax.Array  # [G, S, K] bool, request and got a slot (slot < C)
  num_experts: int = struct.field(pytree_node=False)
  capacity: int = struct.field(pytree_node=False)

  @property
  def combine_weight(self) -> jax.Array:
    """[G, S, K] float32: the gate where kept, exactly 0 where dropped."""
    return jnp.where(self.kept, self.gate, 0.0)


def check_choice(name: str, value, allowed) -> None:
  """Raises ValueError naming `name` unless `value` is one of `allowed`."""
  if value not in allowed:
    raise ValueError(f'{name}={value!r} is not supported; allowed values: '
                     f'{", ".join(repr(a) for a in allowed)}.')


def router_logits(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """[G, S, D] x [D, E] -> [G, S, E] logits, computed in float32."""
  x = x.astype(jnp.float32)
  kernel = kernel.astype(jnp.float32)
  return jnp.einsum('GSD,DE->GSE', x, kernel,
                    precision=jax.lax.Precision.HIGHEST)


def jitter(x: jax.Array, rng: jax.Array, eps: float) -> jax.Array:
  """Multiplies x [..., D] by noise drawn from U[1 - eps, 1 + eps]."""
  noise = jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
  return x.astype(jnp.float32) * noise


def scores_from_logits(logits: jax.Array, score_fn: str) -> jax.Array:
  """[G, S, E] logits -> [G, S, E] scores ('softmax' or 'sigmoid' over E)."""
  check_choice('score_fn', score_fn, SCORE_FNS)
  if score_fn == 'softmax':
    return jax.nn.softmax(logits, axis=-1)
  return jax.nn.sigmoid(logits)


def top_k_indices(x: jax.Array, k: int) -> jax.Array:
  """Indices of the k largest entries of x [..., N] along the last axis.

  Best first, ties to the lower index (as `jax.lax.top_k`). Done as k rounds
  of argmax-and-mask: on a batch-sharded x the SPMD partitioner keeps every
  round local, while `lax.top_k` made it all-gather x across devices.

  Returns:
    [..., k] int32.
  """
  picked = []
  for _ in range(k):
    index = jnp.argmax(x, axis=-1).astype(jnp.int32)  # [...]
    picked.append(index)
    hit = jnp.arange(x.shape[-1]) == index[..., None]
    x = jnp.where(hit, -jnp.inf, x)
  return jnp.stack(picked, axis=-1)


def group_limited_mask(selection: jax.Array, num_groups: int,
                       topk_groups: int,
                       group_score: str = 'top2_sum') -> jax.Array:
  """Which experts group-limited selection allows (DeepSeek-V2/V3).

  The E experts form `num_groups` contiguous groups of E / num_groups. A
  group's score is the sum of its two largest selection scores (its single
  score if a group holds one expert; 'top2_sum', DeepSeek-V3) or its
  largest one ('max', DeepSeek-V2's group_limited_greedy); the
  `topk_groups` best groups stay selectable (ties go to the lower group
  index).

  Args:
    selection: [G, S, E] selection scores (scores + bias).
    num_groups: number of expert groups (divides E).
    topk_groups: groups kept per token, 1 <= topk_groups <= num_groups.
    group_score: 'top2_sum' | 'max'.

  Returns:
    [G, S, E] bool, True where the expert's group is kept.

  Example: E=4, 2 groups, topk_groups=1, selection [.1, .2, .9, 0]: group
  scores .1+.2=.3 and .9+0=.9, so only experts 2 and 3 stay selectable.
  """
  check_choice('group_score', group_score, GROUP_SCORES)
  g, s, e = selection.shape
  per_group = e // num_groups
  grouped = selection.reshape(g, s, num_groups, per_group)
  best_of = 1 if group_score == 'max' else min(2, per_group)
  best = jnp.take_along_axis(grouped, top_k_indices(grouped, best_of),
                             axis=-1)
  scored = best.sum(-1)  # [G, S, NG]
  kept_groups = top_k_indices(scored, topk_groups)  # [G, S, TG]
  keep = jax.nn.one_hot(kept_groups, num_groups, dtype=jnp.int32).sum(-2)
  return jnp.repeat(keep > 0, per_group, axis=-1)  # [G, S, E]


def select_top_k(scores: jax.Array, k: int,
                 bias: Optional[jax.Array] = None,
                 num_groups: int = 1,
                 topk_groups: Optional[int] = None,
                 group_score: str = 'top2_sum'):
  """Top-K experts per token.

  Args:
    scores: [G, S, E] router scores.
    k: K, experts per token (1 <= K <= E).
    bias: optional [E] selection bias (loss-free balancing). It changes which
      experts are chosen, never the gate of a chosen expert.
    num_groups: expert groups for group-limited selection (1 = off).
    topk_groups: groups kept per token (None = all; see
      `group_limited_mask`).
    group_score: how a group is scored ('top2_sum' | 'max').

  Returns:
    expert_index [G, S, K] int32 (best first; ties go to the lower index) and
    gate [G, S, K] float32, the *unbiased* scores of the chosen experts.
  """
  selection = scores if bias is None else scores + bias.astype(scores.dtype)
  if topk_groups is not None and topk_groups < num_groups:
    allowed = group_limited_mask(selection, num_groups, topk_groups,
                                 group_score)
    selection = jnp.where(allowed, selection, -jnp.inf)
  expert_index = top_k_indices(selection, k)  # [G, S, K]
  gate = jnp.take_along_axis(scores, expert_index, axis=-1)
  return expert_index.astype(jnp.int32), gate.astype(jnp.float32)


def loss_free_bias_update(bias: jax.Array, counts: jax.Array,
                          rate: float) -> jax.Array:
  """DeepSeek-V3 loss-free balancing: `b_e += rate * sign(mean - load_e)`.

  Args:
    bias: [E] current selection bias.
    counts: [E] token-choices per expert before capacity, over the global
      batch (padding excluded).
    rate: the update speed gamma (DeepSeek-V3: 0.001).

  Returns:
    [E] float32 updated bias: underloaded experts go up, overloaded down,
    experts exactly at the mean stay.
  """
  counts = counts.astype(jnp.float32)
  return bias + rate * jnp.sign(counts.mean() - counts)


def normalize_gates(gate: jax.Array, renormalize: bool,
                    scale: float = 1.0) -> jax.Array:
  """[G, S, K] gates, optionally renormalised to sum to 1, times `scale`."""
  if renormalize:
    gate = gate / jnp.maximum(gate.sum(-1, keepdims=True), 1e-9)
  return gate * scale


def random_second_expert(gate: jax.Array, rng: jax.Array,
                         threshold: float = 0.2) -> jax.Array:
  """GShard 'random' policy: which choices request a slot at all.

  The first choice always does. Choice k >= 1 does with probability
  min(1, g_k / threshold), g_k its gate renormalised over the K choices.

  Args:
    gate: [G, S, K] gates before any renormalisation or scaling.
    rng: PRNG key.
    threshold: GShard's 0.2.

  Returns:
    [G, S, K] bool.
  """
  normalized = gate / jnp.maximum(gate.sum(-1, keepdims=True), 1e-9)
  uniform = jax.random.uniform(rng, gate.shape, jnp.float32)
  keep = uniform < normalized / threshold
  return keep.at[..., 0].set(True)


def _order_requests(onehot: jax.Array, priority: str) -> jax.Array:
  """[G, S, K, E] -> [G, S*K, E] in the order that claims slots first."""
  g, s, k, e = onehot.shape
  if priority == 'token':
    return onehot.reshape(g, s * k, e)
  return onehot.transpose(0, 2, 1, 3).reshape(g, k * s, e)


def _unorder_positions(position: jax.Array, priority: str, s: int,
                       k: int) -> jax.Array:
  """Inverse of `_order_requests` for [G, S*K] positions -> [G, S, K]."""
  g = position.shape[0]
  if priority == 'token':
    return position.reshape(g, s, k)
  return position.reshape(g, k, s).transpose(0, 2, 1)


def assign_slots(expert_index: jax.Array, request: jax.Array,
                 num_experts: int, capacity: int, priority: str = 'choice',
                 priority_score: Optional[jax.Array] = None):
  """Gives every requesting token-choice a slot in its expert's buffer.

  Args:
    expert_index: [G, S, K] int, chosen experts.
    request: [G, S, K] bool, False for padding and for choices the random
      policy removed; those take no capacity.
    num_experts: E.
    capacity: C.
    priority: 'choice' | 'token' | 'score' (see module docstring).
    priority_score: [G, S], used by 'score' (the top-1 score).

  Returns:
    slot [G, S, K] int32 (the claim order among the expert's requests) and
    kept [G, S, K] bool (request and slot < C).
  """
  check_choice('priority', priority, PRIORITIES)
  g, s, k = expert_index.shape
  onehot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)
  onehot = onehot * request[..., None].astype(jnp.int32)  # [G, S, K, E]
  if priority == 'score':
    if priority_score is None:
      raise ValueError("priority='score' needs priority_score [G, S].")
    # Stable sort: equal scores keep position order.
    perm = jnp.argsort(-priority_score, axis=1, stable=True)  # [G, S]
    onehot = jnp.take_along_axis(onehot, perm[:, :, None, None], axis=1)
  ordered = _order_requests(onehot, priority)  # [G, S*K, E]
  position = jnp.cumsum(ordered, axis=1) - 1
  position = jnp.sum(position * ordered, axis=-1)  # [G, S*K]
  slot = _unorder_positions(position, priority, s, k)  # [G, S, K]
  if priority == 'score':
    inverse = jnp.argsort(perm, axis=1)
    slot = jnp.take_along_axis(slot, inverse[:, :, None], axis=1)
  kept = request & (slot < capacity)
  return slot.astype(jnp.int32), kept


def route_top_k(scores: jax.Array, k: int, capacity: int,
                priority: str = 'choice',
                valid: Optional[jax.Array] = None,
                bias: Optional[jax.Array] = None,
                renormalize: bool = False, scale: float = 1.0,
                second_expert_rng: Optional[jax.Array] = None,
                second_expert_threshold: float = 0.2,
                num_groups: int = 1,
                topk_groups: Optional[int] = None,
                group_score: str = 'top2_sum',
                num_null: int = 0) -> RoutingDecision:
  """Token-choice top-K routing with capacity, from scores.

  Args:
    scores: [G, S, E] router scores (probabilities for softmax).
    k: K.
    capacity: C.
    priority: overflow priority, 'choice' | 'token' | 'score'.
    valid: optional [G, S] bool, False for padding tokens.
    bias: optional [E] selection bias.
    renormalize: renormalise the K gates to sum to 1.
    scale: routed scaling factor applied to the gates.
    second_expert_rng: if given, apply GShard's 'random' policy to choices
      k >= 1 with this key (training only; the caller decides).
    second_expert_threshold: the policy's threshold (0.2).
    num_groups, topk_groups, group_score: group-limited selection (see
      `select_top_k`).
    num_null: N, the last N of the scores' E + N columns are null experts
      (AdaMoE): a choice of one (expert_index >= E) requests no slot and
      is never kept; `renormalize` then divides by the real choices' gates
      only (AdaMoE's code). 0: every column is a real expert.

  Returns:
    A RoutingDecision (num_experts = E, the real experts).

  Example (3 tokens, E=3, K=2, C=2, 'choice'): probs
  [[.4,0,.2],[.5,.1,.4],[.3,.2,.6]] give token 0 -> (expert 0, slot 0) and
  (2, 1); token 1 -> (0, 1) and expert 2 dropped; token 2 -> (2, 0) and
  expert 0 dropped.
  """
  g, s, e = scores.shape
  e -= num_null
  expert_index, gate = select_top_k(scores, k, bias, num_groups, topk_groups,
                                    group_score)
  valid = jnp.ones((g, s), bool) if valid is None else valid.astype(bool)
  request = jnp.broadcast_to(valid[..., None], (g, s, k))
  if num_null:
    request = request & (expert_index < e)
  if second_expert_rng is not None and k > 1:
    request = request & random_second_expert(gate, second_expert_rng,
                                              second_expert_threshold)
  slot, kept = assign_slots(expert_index, request, e, capacity, priority,
                            priority_score=gate[..., 0])
  if num_null and renormalize:
    real = jnp.where(expert_index < e, gate, 0.0)
    gate = jnp.where(expert_index < e, normalize_gates(real, True), gate)
    renormalize = False
  gate = normalize_gates(gate, renormalize, scale)
  return RoutingDecision(expert_index=expert_index, slot=slot, gate=gate,
                         request=request, kept=kept, num_experts=e,
                         capacity=capacity)


class Router(nn.Module):
  """Linen token-choice router: x [G, S, D] -> (RoutingDecision, aux).

  Params: `kernel` [D, E], always float32 (Switch: a low-precision router
  is unstable). Randomness (jitter, the 'random' second-expert policy) is
  drawn from the 'router' RNG stream and used only when
  `deterministic=False`.

  A fixed selection bias (`selection_bias=True`, rate 0: DeepSeek-V3's
  e_score_correction_bias at inference) lives in the same place and is only
  read.

  Loss-free balancing (`bias_update_rate` > 0): a selection bias [E] lives
  in the 'moe_state' collection (`moe_state/.../router/bias`, zeros at
  init): state, not a parameter, so outside the optimizer and inside the
  checkpoint. A training call (`deterministic=False`) with 'moe_state'
  mutable routes with the current bias, then stores
  `loss_free_bias_update(bias, counts, rate)` with the counts of this call's
  whole (global) batch; otherwise the bias is only read.

  aux holds `aux_loss` (Switch load balance; with sigmoid scores and one
  group per sequence this is DeepSeek-V3's sequence-wise balance loss;
  `aux_loss_scope='batch'`: over the whole batch, see
  `losses.load_balance_loss`),
  `z_loss` and the metrics of `moejax.losses.routing_metrics`.

  Null experts (`num_null_experts` N > 0, AdaMoE, Zeng et al. 2024): the
  kernel is [D, E + N] and top-K runs over all E + N scores; a null choice
  (expert_index >= E) takes no slot and adds exactly 0, so a token gets 0
  to K real experts. The balance loss counts the N null experts as experts
  (E + N of them, AdaMoE's loss); `expert_load` stays over the E real
  ones; aux adds `losses.active_expert_metrics` and `null_fraction`.
  """
  num_experts: int
  top_k: int = 1
  score_fn: str = 'softmax'
  priority: str = 'choice'
  renormalize: bool = False
  routed_scaling: float = 1.0
  second_expert_policy: str = 'all'
  second_expert_threshold: float = 0.2
  jitter_eps: float = 0.0
  num_groups: int = 1
  topk_groups: Optional[int] = None
  group_score: str = 'top2_sum'
  bias_update_rate: float = 0.0
  selection_bias: bool = False
  aux_loss_scope: str = 'group'
  num_null_experts: int = 0
  # Switch Transformer: truncated normal with scale 0.1 / fan_in.
  kernel_init: nn.initializers.Initializer = nn.initializers.variance_scaling(
      0.1, 'fan_in', 'truncated_normal')

  def _bias(self):
    """The selection bias variable, or None when there is none."""
    if self.bias_update_rate <= 0 and not self.selection_bias:
      return None
    return self.variable('moe_state', 'bias', jnp.zeros,
                         (self.num_experts,), jnp.float32)

  @nn.compact
  def __call__(self, x: jax.Array, capacity: int,
               valid: Optional[jax.Array] = None,
               deterministic: bool = True):
    """Routes x [G, S, D]; valid [G, S] bool (False = padding)."""
    check_choice('score_fn', self.score_fn, SCORE_FNS)
    check_choice('second_expert_policy', self.second_expert_policy,
                 SECOND_EXPERT_POLICIES)
    g, s, d = x.shape
    valid = jnp.ones((g, s), bool) if valid is None else valid
    kernel = self.param('kernel', self.kernel_init,
                        (d, self.num_experts + self.num_null_experts),
                        jnp.float32)
    bias = self._bias()
    x_router = x
    if not deterministic and self.jitter_eps > 0:
      x_router = jitter(x, self.make_rng('router'), self.jitter_eps)
    logits = router_logits(x_router, kernel)  # [G, S, E]
    scores = scores_from_logits(logits, self.score_fn)
    policy_rng = None
    if not deterministic and self.second_expert_policy == 'random':
      policy_rng = self.make_rng('router')
    decision = route_top_k(
        scores, self.top_k, capacity, self.priority, valid,
        bias=None if bias is None else bias.value,
        renormalize=self.renormalize, scale=self.routed_scaling,
        second_expert_rng=policy_rng,
        second_expert_threshold=self.second_expert_threshold,
        num_groups=self.num_groups, topk_groups=self.topk_groups,
        group_score=self.group_score, num_null=self.num_null_experts)
    probs = losses.expert_probs(scores, self.score_fn)
    # Null experts: balanced as E + N experts (AdaMoE), so at balance a
    # choice is null with probability N / (E + N).
    scored = (decision.replace(num_experts=probs.shape[-1])
              if self.num_null_experts else decision)
    step_counts = self._step_counts(scored, valid, deterministic,
                                    bias is not None)
    aux = {'aux_loss': losses.load_balance_loss(probs, scored, valid,
                                                self.aux_loss_scope,
                                                step_counts),
           'z_loss': losses.z_loss(logits, valid)}
    aux.update(losses.routing_metrics(probs, decision, valid))
    if self.num_null_experts:
      aux.update(losses.active_expert_metrics(decision, valid))
      aux['null_fraction'] = losses.null_fraction(decision, valid)
    if (bias is not None and self.bias_update_rate > 0 and
        not deterministic and
        self.is_mutable_collection('moe_state')):
      counts = (losses.choice_counts(decision, valid).sum(0)  # [E]
                if step_counts is None else step_counts[0])
      bias.value = loss_free_bias_update(bias.value, counts,
                                         self.bias_update_rate)
    return decision, aux

  def _step_counts(self, scored: RoutingDecision, valid: jax.Array,
                   deterministic: bool, has_bias: bool):
    """Counts of a whole step's batch, for gradient accumulation.

    A training call whose counts reach past its own tokens (the 'batch'
    balance loss, the loss-free bias update) sows its choice counts [E']
    (E' = E + null experts) and valid-token count into `SOWN_COUNTS` when
    that collection is mutable (the train step's counting pass over the
    micro-batches), and returns the step's totals (counts [E'], tokens)
    when the caller passes them in the `STEP_COUNTS` collection; None
    otherwise (then the call's own counts are used, as without
    accumulation).
    """
    if deterministic or not (self.aux_loss_scope == 'batch' or (
        has_bias and self.bias_update_rate > 0)):
      return None
    return step_totals(self, losses.choice_counts(scored, valid).sum(0),
                       valid)
