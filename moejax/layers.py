"""MoeLayer: router + dispatcher + expert bank.

Axis letters: B batch, L sequence length, D model width, F expert hidden
width, E experts, K experts chosen per token, G groups, S tokens per group,
C capacity (slots per expert per group).

Flow: x [B, L, D] -> groups [G, S, D] -> router -> RoutingDecision
      -> dispatch [G, E, C, D] -> ExpertBank -> combine [G, S, D] -> [B, L, D]
      (+ shared experts on every token).

Routers ('router'), looked up by name in the registry (moejax.routers: the
plug-in protocol, RouterSpec, register); the built-in ones:
  'topk'           token choice (Switch, GShard, DeepSeek-style with sigmoid
                   scores, group-limited selection and loss-free balancing);
  'expert_choice'  each expert takes its top-C tokens (Zhou et al. 2022);
  'soft_moe'       slots are softmax mixtures of tokens (Puigcerver et al.
                   2023); its own dense dispatch, never drops.
Dispatchers ('dispatcher'): 'gather' (default), 'einsum' (one-hot
reference), 'ragged' (sorted rows + grouped matmuls; dropless with
capacity_factor=None), 'per_token' (each token's K experts' weights
gathered: for decoding, where few tokens meet many experts), 'blocked'
(expert-sorted rows padded to blocks of one expert; the fast dropless path
on CPU, moejax.blocked). Fine-grained experts (`granularity` m) turn E experts
of width F, K chosen, into m*E experts of width F/m, m*K chosen; below, E,
F and K are those effective values.

Param tree of one MoeLayer (checkpoint converters rely on these names):

    router/kernel    [D, E]  float32 always ([D, E, C] for 'soft_moe', plus
                     router/scale [] when soft_normalize; [D, E + N]
                     with num_null_experts N)
    experts/wi       [E, D, F]  (activation 'relu' | 'gelu')
    experts/wi_0     [E, D, F]  (gated 'swiglu' | 'geglu': through the nonlinearity)
    experts/wi_1     [E, D, F]  (gated: the linear branch)
    experts/wo       [E, F, D]
    experts/<w>_lora_a, experts/<w>_lora_b   with lora_rank r > 0 and
                     'experts' in lora_targets: [E, in, r], [E, r, out] for
                     each kernel <w> above (moejax.lora)
    shared/...       DenseFfn of width num_shared_experts * shared_d_ff
                     (its adapters with 'shared' in lora_targets)
    shared_gate      [D, 1] (when shared_gate)
State (collection 'moe_state', when bias_update_rate > 0 or selection_bias):
    router/bias      [E] float32, the selection bias (loss-free balancing,
                     or fixed)
    router/l1_coeff  [] float32, ReMoE's adaptive L1 coefficient
                     (router='relu', always)

RNG streams: 'router' (jitter and the 'random' second-expert policy), used
only when `deterministic=False`.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import blocked
from moejax import capacity as capacity_lib
from moejax import dispatch as dispatch_lib
from moejax import grouping
from moejax import losses
from moejax import lora as lora_lib
from moejax import routers
from moejax import routing
from moejax import soft_moe
from moejax.experts import ACTIVATIONS, DenseFfn, ExpertBank, RaggedExpertBank
from moejax.experts import BlockedExpertBank, TokenExpertBank

# The built-in routers (a snapshot at import; `routers.names()` is live and
# holds any router registered later).
ROUTERS = routers.names()
NONCAUSAL_ROUTERS = tuple(n for n in ROUTERS if not routers.get(n).causal_safe)


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f'{name} must be an int >= {minimum}, got {value!r}.')


def _check_group_sequences(k) -> None:
  """group_sequences: None, an int >= 1, or -1 (grouping.WHOLE_BATCH)."""
  if k is not None and k != grouping.WHOLE_BATCH and (
      isinstance(k, bool) or not isinstance(k, int) or k < 1):
    raise ValueError('group_sequences must be None (one group per '
                     'sequence), an int >= 1, or -1 (one group of the '
                     f'whole batch); got {k!r}.')


def _check_capacity_factor(name: str, value) -> None:
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      not value > 0):
    raise ValueError(f'{name} must be a number > 0, or None for dropless; '
                     f'got {value!r}.')


def _validate_router_options(layer: 'MoeLayer') -> None:
  """Checks the router against its RouterSpec: registered, the options other
  routers own left at their defaults, the dispatcher, causality."""
  spec = routers.get(layer.router)
  routers.check_options(layer, spec)
  routers.check_dispatcher(spec, layer.dispatcher)
  if spec.validate is not None:
    spec.validate(layer)
  leak = routers.causal_leak(layer, spec)
  if leak and layer.causal and not layer.allow_noncausal_routing:
    raise ValueError(
        f'{leak} lets a token\'s routing depend on later tokens, which a '
        'causal model must not see; allowed values in a causal model: '
        f'{routers.causal_choices()} (or set allow_noncausal_routing=True '
        'to accept the leak).')


def _validate_groups(layer: 'MoeLayer') -> None:
  """Group-limited selection: num_groups | E and enough experts left."""
  _check_positive_int('num_groups', layer.num_groups)
  e, k = layer.effective_experts, layer.effective_top_k
  if e % layer.num_groups:
    raise ValueError(f'num_groups={layer.num_groups} must divide the '
                     f'{e} (effective) experts.')
  if layer.topk_groups is None:
    return
  _check_positive_int('topk_groups', layer.topk_groups)
  if layer.topk_groups > layer.num_groups:
    raise ValueError(f'topk_groups={layer.topk_groups} must be <= '
                     f'num_groups={layer.num_groups}.')
  if layer.topk_groups * (e // layer.num_groups) < k:
    raise ValueError(
        f'topk_groups={layer.topk_groups} groups of {e // layer.num_groups} '
        f'experts leave fewer than the {k} experts each token chooses; '
        f'topk_groups must be >= {-(-k // (e // layer.num_groups))}.')


def validate_moe_args(layer: 'MoeLayer') -> None:
  """Checks every MoeLayer argument; raises ValueError naming the bad one."""
  _check_positive_int('num_experts', layer.num_experts)
  _check_positive_int('d_ff', layer.d_ff)
  _check_positive_int('top_k', layer.top_k)
  if layer.top_k > layer.num_experts:
    raise ValueError(f'top_k={layer.top_k} must be <= '
                     f'num_experts={layer.num_experts}.')
  _check_positive_int('granularity', layer.granularity)
  if layer.d_ff % layer.granularity:
    raise ValueError(f'd_ff={layer.d_ff} must be divisible by '
                     f'granularity={layer.granularity} (experts of width '
                     'd_ff / granularity).')
  _check_capacity_factor('capacity_factor', layer.capacity_factor)
  _check_capacity_factor('eval_capacity_factor', layer.eval_capacity_factor)
  _check_positive_int('min_capacity', layer.min_capacity, minimum=0)
  _check_positive_int('capacity_multiple_of', layer.capacity_multiple_of)
  if layer.group_size is not None:
    _check_positive_int('group_size', layer.group_size)
  _check_group_sequences(layer.group_sequences)
  grouping.group_tokens(layer.group_size, layer.group_sequences, 1, 1)
  grouping.check_group_order(layer.group_order)
  routing.check_choice('score_fn', layer.score_fn, routing.SCORE_FNS)
  routing.check_choice('priority', layer.priority, routing.PRIORITIES)
  routing.check_choice('aux_loss_scope', layer.aux_loss_scope,
                       losses.AUX_LOSS_SCOPES)
  routing.check_choice('group_score', layer.group_score,
                       routing.GROUP_SCORES)
  routing.check_choice('second_expert_policy', layer.second_expert_policy,
                       routing.SECOND_EXPERT_POLICIES)
  routing.check_choice('dispatcher', layer.dispatcher,
                       dispatch_lib.DISPATCHER_NAMES)
  routing.check_choice('activation', layer.activation, ACTIVATIONS)
  if not 0 <= layer.jitter_eps < 1:
    raise ValueError(f'jitter_eps must be in [0, 1), got {layer.jitter_eps!r}.')
  if not layer.second_expert_threshold > 0:
    raise ValueError('second_expert_threshold must be > 0, got '
                     f'{layer.second_expert_threshold!r}.')
  if not layer.bias_update_rate >= 0:
    raise ValueError('bias_update_rate must be >= 0 (0 = no loss-free '
                     f'balancing), got {layer.bias_update_rate!r}.')
  _check_positive_int('slots_per_expert', layer.slots_per_expert)
  _check_positive_int('num_shared_experts', layer.num_shared_experts, 0)
  if layer.shared_d_ff is not None:
    _check_positive_int('shared_d_ff', layer.shared_d_ff)
  lora_lib.check_lora_options(layer.lora_rank, layer.lora_alpha,
                              layer.lora_targets, lora_lib.LAYER_TARGETS)
  _validate_router_options(layer)
  _validate_groups(layer)
  if (layer.group_sequences == grouping.WHOLE_BATCH and
      layer.router == 'soft_moe'):  # its slots per token would follow B
    raise ValueError("group_sequences=-1 (one group of the whole batch) is "
                     "not supported with router='soft_moe'; allowed: None "
                     'or an int >= 1.')


class MoeLayer(nn.Module):
  """Sparse Mixture-of-Experts FFN: x [B, L, D] -> (y [B, L, D], aux).

  Attributes:
    num_experts: E (before `granularity`).
    d_ff: F, hidden width of each expert (before `granularity`).
    top_k: K (Switch 1, GShard 2; 'topk' router only).
    capacity_factor: training cf (1.25: Switch's train setting); None =
      dropless. For 'expert_choice' it is the mean number of experts per
      token (Zhou et al.: 2); 'soft_moe' ignores it.
    eval_capacity_factor: cf when `deterministic=True` (2.0: Switch eval).
    min_capacity: lower bound on C (4, as flaxformer).
    capacity_multiple_of: round C up to a multiple of this.
    router: a registered router name, `moejax.routers.names()`: 'topk' |
      'expert_choice' | 'soft_moe' | 'relu' built in (module docstring). Its
      RouterSpec says which dispatchers it supports, whether it is
      causal-safe, and which options it owns (the options another router
      owns must stay at their defaults).
    score_fn: 'softmax' | 'sigmoid' (DeepSeek-V3).
    priority: overflow priority 'choice' | 'token' | 'score'.
    renormalize: renormalise the K combine weights to sum to 1.
    routed_scaling: factor applied to the combine weights.
    second_expert_policy: 'all' | 'random' (GShard; training only).
    second_expert_threshold: the 'random' policy's threshold (0.2).
    jitter_eps: multiplicative router-input jitter (training only); 0 = off.
    num_groups: expert groups for group-limited selection (1 = off).
    topk_groups: groups each token may choose from (None = all).
    group_score: a group's score in group-limited selection: 'top2_sum'
      (DeepSeek-V3) | 'max' (DeepSeek-V2 group_limited_greedy).
    bias_update_rate: loss-free balancing speed gamma (DeepSeek-V3: 0.001);
      0 = off. The bias is state in 'moe_state' (see routing.Router).
    selection_bias: keep a selection bias in 'moe_state' even with
      bias_update_rate 0: a fixed bias, read and never updated (an imported
      DeepSeek-V3 e_score_correction_bias).
    aux_loss_scope: the load-balance loss per routing group ('group':
      Switch, GShard) or over the whole batch ('batch': global-batch
      balancing, Qiu et al. 2025; see losses.load_balance_loss).
    num_null_experts: N zero-compute experts in the top-K choice ('topk';
      AdaMoE): router/kernel [D, E + N]; a choice of a null expert takes no
      slot and adds exactly 0, so a token gets 0..K real experts (0 = off,
      params as without).
    granularity: m, fine-grained experts (m*E experts of width F/m, m*K
      chosen; DeepSeekMoE).
    num_shared_experts: dense FFNs applied to every token, added to the
      routed output (one FFN of width num_shared_experts * shared_d_ff).
    shared_d_ff: width of one shared expert (None = d_ff // granularity).
    shared_gate: multiply the shared output by sigmoid(x . w), w [D, 1].
    slots_per_expert: C of 'soft_moe'.
    soft_normalize: 'soft_moe' L2-normalises x and the slot params.
    relu_l1_alpha: 'relu' (ReMoE): the L1 controller's factor alpha > 1
      (top_k is the target number of active experts; moejax.relu_router).
    relu_l1_init: 'relu': the initial L1 coefficient lambda_0 > 0.
    relu_l1_balance: 'relu': the load-balancing L1 form (f_e-weighted).
    dispatcher: 'gather' (default, fast) | 'einsum' (one-hot reference) |
      'ragged' (grouped matmuls; dropless with capacity_factor=None) |
      'per_token' (gathers each token's K experts' weights; decoding) |
      'blocked' (block-padded sorted rows; dropless with
      capacity_factor=None, the fast dropless path on CPU).
    activation: 'relu' | 'gelu' | 'swiglu' | 'geglu'.
    group_size: S; None = one group per sequence (S = L).
    group_sequences: k, groups of k whole sequences (S = k * L for the
      layer's input rows of L tokens), or -1 (grouping.WHOLE_BATCH): one
      group of all B input rows (S = B * L); set it or group_size, not
      both.
    group_order: how groups are laid out (moejax.grouping): 'sequence'
      (the batch's tokens in order, cut every S) | 'position' (groups of
      S/L whole sequences, position-major: Switch/GShard's many-document
      groups, causal-safe). A causal layer refuses 'sequence' groups that
      span sequences (unless allow_noncausal_routing).
    pad_to_group: if B*L is not a multiple of S, pad with padding tokens
      instead of raising.
    causal: the layer sits in a causal model; non-causal routing (a router
      not causal-safe: 'expert_choice', 'soft_moe'; priority 'score'; or
      priority 'choice' with >= 2 choices per token and a capacity) is
      refused.
    allow_noncausal_routing: accept non-causal routing in a causal model.
    dtype: compute dtype of the experts (the router is always float32).
    param_dtype: storage dtype of the expert weights.
    lora_rank: r of the LoRA adapters on the FFNs in `lora_targets`
      (moejax.lora); 0 = none (params and outputs exactly as without).
    lora_alpha: the adapters' scale is lora_alpha / r (LoRA paper).
    lora_targets: which FFNs get adapters: 'experts' (the routed bank, any
      router and dispatcher) and/or 'shared' (the shared experts).

  aux: dict of float32 scalars `aux_loss`, `z_loss`, `max_violation`,
  `drop_fraction`, `fully_dropped_fraction`, `router_entropy`, `top1_prob`,
  `capacity`, and `expert_load` [E]; 'expert_choice' adds the
  `expert_choice.coverage_metrics`; 'relu' adds `reg_loss` (in the training
  loss with weight 1), `l1_penalty`, `l1_coeff`, `active_experts`,
  `kept_experts`; null experts add `active_experts`, `kept_experts`,
  `null_fraction`.
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
  num_groups: int = 1
  topk_groups: Optional[int] = None
  group_score: str = 'top2_sum'
  bias_update_rate: float = 0.0
  selection_bias: bool = False
  aux_loss_scope: str = 'group'
  num_null_experts: int = 0
  granularity: int = 1
  num_shared_experts: int = 0
  shared_d_ff: Optional[int] = None
  shared_gate: bool = False
  slots_per_expert: int = 1
  soft_normalize: bool = False
  relu_l1_alpha: float = 1.2
  relu_l1_init: float = 1e-8
  relu_l1_balance: bool = False
  dispatcher: str = 'gather'
  activation: str = 'relu'
  group_size: Optional[int] = None
  group_sequences: Optional[int] = None
  group_order: str = 'sequence'
  pad_to_group: bool = False
  causal: bool = False
  allow_noncausal_routing: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple = ('experts',)

  def __post_init__(self):
    validate_moe_args(self)
    object.__setattr__(self, 'lora_targets', tuple(self.lora_targets))
    super().__post_init__()

  def _lora(self, target: str) -> dict:
    """LoRA args of the FFN `target` ('experts' | 'shared'): rank 0 when it
    is not in lora_targets."""
    rank = self.lora_rank if target in self.lora_targets else 0
    return dict(lora_rank=rank, lora_alpha=self.lora_alpha)

  @property
  def effective_experts(self) -> int:
    """E after fine-graining: granularity * num_experts."""
    return self.granularity * self.num_experts

  @property
  def effective_top_k(self) -> int:
    """K after fine-graining: granularity * top_k."""
    return self.granularity * self.top_k

  def _group_size(self, batch: int, seq_len: int) -> Optional[int]:
    """S for B = batch input rows of L = seq_len tokens (None: one group
    per sequence)."""
    return grouping.group_tokens(self.group_size, self.group_sequences,
                                 seq_len, batch)

  def _group(self, x: jax.Array, valid: jax.Array):
    """[B, L, D], [B, L] -> [G, S, D], [G, S] (moejax.grouping; a causal
    layer refuses a layout that lets a token see later positions)."""
    group_size = self._group_size(*x.shape[:2])
    leak = grouping.causal_group_leak(group_size, self.group_order,
                                      x.shape[1])
    if leak and self.causal and not self.allow_noncausal_routing:
      raise ValueError(
          f"{leak}, which a causal model must not see; use "
          "group_order='position' (groups of whole sequences, "
          'position-major) or a group_size that divides the sequence '
          'length (or set allow_noncausal_routing=True to accept the leak).')
    return grouping.to_groups(x, valid, group_size, self.group_order,
                              self.pad_to_group)

  def _capacity(self, spec: routers.RouterSpec, s: int,
                deterministic: bool) -> Optional[int]:
    """C for groups of S tokens, with the router's K (None: no capacity)."""
    k = spec.capacity_k(self)
    if k is None:
      return None
    cf = self.eval_capacity_factor if deterministic else self.capacity_factor
    return capacity_lib.compute_capacity(
        s, self.effective_experts, k, cf, self.min_capacity,
        self.capacity_multiple_of)

  def _route(self, xg: jax.Array, valid_g: jax.Array, deterministic: bool):
    """[G, S, D] -> the registered router's output (routers protocol):
    (RoutingDecision, aux), or (dispatch, combine, aux) if dense_dispatch."""
    spec = routers.get(self.router)
    router = spec.module(**spec.kwargs(self), name='router')
    out = router(xg.astype(jnp.float32),
                 capacity=self._capacity(spec, xg.shape[1], deterministic),
                 valid=valid_g, deterministic=deterministic)
    routers.check_aux(spec, out[-1])
    if not spec.dense_dispatch and not isinstance(out[0],
                                                  routing.RoutingDecision):
      raise ValueError(f'router {spec.name!r} returned a '
                       f'{type(out[0]).__name__}; a router without '
                       'dense_dispatch returns (RoutingDecision, aux).')
    return out

  def _experts(self, kind: type = ExpertBank) -> nn.Module:
    """The expert bank module (`kind`: ExpertBank or a same-params one)."""
    return kind(num_experts=self.effective_experts,
                d_ff=self.d_ff // self.granularity,
                activation=self.activation, dtype=self.dtype,
                param_dtype=self.param_dtype, **self._lora('experts'),
                name='experts')

  def _routed(self, xg: jax.Array, valid_g: jax.Array, deterministic: bool):
    """The routed experts on groups: [G, S, D] -> ([G, S, D], aux).

    The router sees a float32 copy of x; experts see it in `dtype`.
    """
    if routers.get(self.router).dense_dispatch:
      dispatch_w, combine_w, aux = self._route(xg, valid_g, deterministic)
      buffers = soft_moe.soft_dispatch(xg.astype(self.dtype), dispatch_w)
      self.sow('intermediates', 'dispatched', buffers)
      return soft_moe.soft_combine(self._experts()(buffers), combine_w), aux
    decision, aux = self._route(xg, valid_g, deterministic)
    xg = xg.astype(self.dtype)
    if self.dispatcher == 'ragged':
      plan = dispatch_lib.ragged_plan(decision)
      rows = dispatch_lib.ragged_dispatch(xg, plan)  # [N, D]
      rows = self._experts(RaggedExpertBank)(rows, plan.group_sizes)
      return dispatch_lib.ragged_combine(rows, plan, decision), aux
    if self.dispatcher == 'blocked':
      plan = blocked.block_plan(decision)
      rows = blocked.blocked_dispatch(xg, plan)  # [P, D]
      rows = self._experts(BlockedExpertBank)(rows, plan)
      return blocked.blocked_combine(rows, plan, decision), aux
    if self.dispatcher == 'per_token':
      g, s, d = xg.shape
      # A null expert's index (>= E, never kept) reads expert E - 1; its
      # output is masked to 0 by per_token_combine.
      index = jnp.minimum(decision.expert_index, self.effective_experts - 1)
      y = self._experts(TokenExpertBank)(
          xg.reshape(g * s, d), index.reshape(g * s, -1))
      return dispatch_lib.per_token_combine(y.reshape(g, s, -1, d),
                                            decision), aux
    dispatcher = dispatch_lib.DISPATCHERS[self.dispatcher]
    buffers = dispatcher.dispatch(xg, decision)  # [G, E, C, D]
    self.sow('intermediates', 'dispatched', buffers)
    return dispatcher.combine(self._experts()(buffers), decision), aux

  def _shared(self, x: jax.Array, valid: jax.Array) -> jax.Array:
    """Shared experts on every valid token: [B, L, D] -> [B, L, D]."""
    width = (self.shared_d_ff or self.d_ff // self.granularity)
    y = DenseFfn(self.num_shared_experts * width, self.activation,
                 self.dtype, self.param_dtype, **self._lora('shared'),
                 name='shared')(x)
    if self.shared_gate:
      w = self.param('shared_gate', nn.initializers.lecun_normal(),
                     (x.shape[-1], 1), jnp.float32)
      gate = jax.nn.sigmoid(jnp.einsum(
          'BLD,DO->BLO', x.astype(jnp.float32), w,
          precision=jax.lax.Precision.HIGHEST))  # [B, L, 1]
      y = y * gate.astype(y.dtype)
    return jnp.where(valid[..., None], y, 0)

  @nn.compact
  def __call__(self, x: jax.Array, padding_mask: Optional[jax.Array] = None,
               deterministic: bool = True):
    """Applies the layer.

    Args:
      x: [B, L, D] tokens.
      padding_mask: optional [B, L] bool, True where a token is padding
        (routed nowhere, no capacity, no loss, zero output).
      deterministic: eval mode (eval capacity factor, no jitter, no random
        second-expert policy, no loss-free bias update).

    Returns:
      y [B, L, D] in `dtype`, and the aux dict (see class docstring).
    """
    b, l, d = x.shape
    valid = jnp.ones((b, l), bool)
    if padding_mask is not None:
      valid = ~padding_mask.astype(bool)
    xg, valid_g = self._group(x, valid)  # [G, S, D], [G, S]
    y, aux = self._routed(xg, valid_g, deterministic)  # [G, S, D]
    y = grouping.from_groups(y, b, l, self._group_size(b, l),
                             self.group_order)
    if self.num_shared_experts:
      y = y + self._shared(x, valid).astype(y.dtype)
    return y, aux
