"""MoeLayer: router + dispatcher + expert bank.

Axis letters: B batch, L sequence length, D model width, F expert hidden
width, E experts, K experts chosen per token, G groups, S tokens per group,
C capacity (slots per expert per group).

Flow: x [B, L, D] -> groups [G, S, D] -> Router -> RoutingDecision
      -> dispatch [G, E, C, D] -> ExpertBank -> combine [G, S, D] -> [B, L, D]

Param tree of one MoeLayer (checkpoint converters rely on these names):

    router/kernel    [D, E]  float32 always
    experts/wi       [E, D, F]  (activation 'relu' | 'gelu')
    experts/wi_0     [E, D, F]  (gated 'swiglu' | 'geglu': through the nonlinearity)
    experts/wi_1     [E, D, F]  (gated: the linear branch)
    experts/wo       [E, F, D]

RNG streams: 'router' (jitter and the 'random' second-expert policy), used
only when `deterministic=False`.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import capacity as capacity_lib
from moejax import routing
from moejax.dispatch import DISPATCHERS
from moejax.experts import ACTIVATIONS, ExpertBank

ROUTERS = ('topk',)
NONCAUSAL_PRIORITIES = ('score',)


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f'{name} must be an int >= {minimum}, got {value!r}.')


def _check_capacity_factor(name: str, value) -> None:
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      not value > 0):
    raise ValueError(f'{name} must be a number > 0, or None for dropless; '
                     f'got {value!r}.')


def validate_moe_args(layer: 'MoeLayer') -> None:
  """Checks every MoeLayer argument; raises ValueError naming the bad one."""
  _check_positive_int('num_experts', layer.num_experts)
  _check_positive_int('d_ff', layer.d_ff)
  _check_positive_int('top_k', layer.top_k)
  if layer.top_k > layer.num_experts:
    raise ValueError(f'top_k={layer.top_k} must be <= '
                     f'num_experts={layer.num_experts}.')
  _check_capacity_factor('capacity_factor', layer.capacity_factor)
  _check_capacity_factor('eval_capacity_factor', layer.eval_capacity_factor)
  _check_positive_int('min_capacity', layer.min_capacity, minimum=0)
  _check_positive_int('capacity_multiple_of', layer.capacity_multiple_of)
  if layer.group_size is not None:
    _check_positive_int('group_size', layer.group_size)
  routing.check_choice('router', layer.router, ROUTERS)
  routing.check_choice('score_fn', layer.score_fn, routing.SCORE_FNS)
  routing.check_choice('priority', layer.priority, routing.PRIORITIES)
  routing.check_choice('second_expert_policy', layer.second_expert_policy,
                       routing.SECOND_EXPERT_POLICIES)
  routing.check_choice('dispatcher', layer.dispatcher, tuple(DISPATCHERS))
  routing.check_choice('activation', layer.activation, ACTIVATIONS)
  if not 0 <= layer.jitter_eps < 1:
    raise ValueError(f'jitter_eps must be in [0, 1), got {layer.jitter_eps!r}.')
  if not layer.second_expert_threshold > 0:
    raise ValueError('second_expert_threshold must be > 0, got '
                     f'{layer.second_expert_threshold!r}.')
  if (layer.causal and layer.priority in NONCAUSAL_PRIORITIES and
      not layer.allow_noncausal_routing):
    raise ValueError(
        f'priority={layer.priority!r} lets a token\'s routing depend on later '
        'tokens, which a causal model must not see; allowed values in a '
        "causal model: 'choice', 'token' (or set allow_noncausal_routing=True "
        'to accept the leak).')


class MoeLayer(nn.Module):
  """Sparse Mixture-of-Experts FFN: x [B, L, D] -> (y [B, L, D], aux).

  Attributes:
    num_experts: E.
    d_ff: F, hidden width of each expert.
    top_k: K (Switch 1, GShard 2).
    capacity_factor: training cf (1.25: Switch's train setting); None =
      dropless.
    eval_capacity_factor: cf when `deterministic=True` (2.0: Switch eval).
    min_capacity: lower bound on C (4, as flaxformer).
    capacity_multiple_of: round C up to a multiple of this.
    router: 'topk' (token choice).
    score_fn: 'softmax' | 'sigmoid'.
    priority: overflow priority 'choice' | 'token' | 'score'.
    renormalize: renormalise the K combine weights to sum to 1.
    routed_scaling: factor applied to the combine weights.
    second_expert_policy: 'all' | 'random' (GShard; training only).
    second_expert_threshold: the 'random' policy's threshold (0.2).
    jitter_eps: multiplicative router-input jitter (training only); 0 = off.
    dispatcher: 'gather' (default, fast) | 'einsum' (one-hot reference).
    activation: 'relu' | 'gelu' | 'swiglu' | 'geglu'.
    group_size: S; None = one group per sequence (S = L).
    pad_to_group: if B*L is not a multiple of S, pad with padding tokens
      instead of raising.
    causal: the layer sits in a causal model; non-causal routing is refused.
    allow_noncausal_routing: accept non-causal routing in a causal model.
    dtype: compute dtype of the experts (the router is always float32).
    param_dtype: storage dtype of the expert weights.

  aux: dict of float32 scalars `aux_loss`, `z_loss`, `max_violation`,
  `drop_fraction`, `fully_dropped_fraction`, `router_entropy`, `top1_prob`,
  `capacity`, and `expert_load` [E].
  """
  num_experts: int
  d_ff: int
  top_k: int = 1
  capacity_factor: Optional[float] = 1.25
  eval_capacity_factor: Optional[float] = 2.0
  min_capacity: int = 4
  capacity_multiple_of: int = 1
  router: str = 'topk'
  score_fn: str = 'softmax'
  priority: str = 'choice'
  renormalize: bool = False
  routed_scaling: float = 1.0
  second_expert_policy: str = 'all'
  second_expert_threshold: float = 0.2
  jitter_eps: float = 0.0
  dispatcher: str = 'gather'
  activation: str = 'relu'
  group_size: Optional[int] = None
  pad_to_group: bool = False
  causal: bool = False
  allow_noncausal_routing: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    validate_moe_args(self)
    super().__post_init__()

  def _group(self, x: jax.Array, valid: jax.Array):
    """[B, L, D], [B, L] -> [G, S, D], [G, S] (padding groups if asked)."""
    b, l, d = x.shape
    s = self.group_size or l
    tokens = b * l
    pad = -tokens % s
    if pad and not self.pad_to_group:
      raise ValueError(
          f'group_size={s} does not divide the {tokens} tokens of a '
          f'[{b}, {l}] batch; choose a divisor of {tokens} or set '
          'pad_to_group=True.')
    x = jnp.pad(x.reshape(tokens, d), ((0, pad), (0, 0)))
    valid = jnp.pad(valid.reshape(tokens), (0, pad))  # padded: invalid
    return x.reshape(-1, s, d), valid.reshape(-1, s)

  @nn.compact
  def __call__(self, x: jax.Array, padding_mask: Optional[jax.Array] = None,
               deterministic: bool = True):
    """Applies the layer.

    Args:
      x: [B, L, D] tokens.
      padding_mask: optional [B, L] bool, True where a token is padding
        (routed nowhere, no capacity, no loss, zero output).
      deterministic: eval mode (eval capacity factor, no jitter, no random
        second-expert policy).

    Returns:
      y [B, L, D] in `dtype`, and the aux dict (see class docstring).
    """
    b, l, d = x.shape
    valid = jnp.ones((b, l), bool)
    if padding_mask is not None:
      valid = ~padding_mask.astype(bool)
    xg, valid_g = self._group(x, valid)  # [G, S, D], [G, S]
    cf = self.eval_capacity_factor if deterministic else self.capacity_factor
    capacity = capacity_lib.compute_capacity(
        xg.shape[1], self.num_experts, self.top_k, cf, self.min_capacity,
        self.capacity_multiple_of)
    decision, aux = routing.Router(
        num_experts=self.num_experts, top_k=self.top_k,
        score_fn=self.score_fn, priority=self.priority,
        renormalize=self.renormalize, routed_scaling=self.routed_scaling,
        second_expert_policy=self.second_expert_policy,
        second_expert_threshold=self.second_expert_threshold,
        jitter_eps=self.jitter_eps, name='router')(
            xg, capacity, valid_g, deterministic)
    dispatcher = DISPATCHERS[self.dispatcher]
    buffers = dispatcher.dispatch(xg.astype(self.dtype), decision)
    self.sow('intermediates', 'dispatched', buffers)  # [G, E, C, D]
    outputs = ExpertBank(num_experts=self.num_experts, d_ff=self.d_ff,
                         activation=self.activation, dtype=self.dtype,
                         param_dtype=self.param_dtype, name='experts')(buffers)
    y = dispatcher.combine(outputs, decision)  # [G, S, D]
    y = y.reshape(-1, d)[:b * l].reshape(b, l, d)
    return y, aux
