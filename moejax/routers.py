"""Routers as plug-ins: the protocol, the registry, the built-in routers.

Axis letters: G groups, S tokens per group, D model width, E experts,
K choices per token, C capacity (slots per expert per group).

`MoeLayer(router=name)` looks `name` up here; nothing in the layer names a
router. A router is a Linen module plus a `RouterSpec` that says how the
layer builds it and what it may be combined with.

Protocol. MoeLayer builds the module as `spec.module(**spec.kwargs(layer),
name='router')` (so its params live under `router/...`: `router/kernel` in
checkpoints, HF interop, sharding rules and the routing capture) and calls
it with keywords:

    router(x, capacity=C, valid=valid, deterministic=deterministic)

      x              [G, S, D] float32 (the router's copy; experts see x in
                     the layer's dtype)
      capacity       C from `capacity.compute_capacity` with K =
                     `spec.capacity_k(layer)`; None when that is None
      valid          [G, S] bool, False for padding (routes nowhere, takes
                     no capacity, counts in no loss or metric)
      deterministic  eval mode: no randomness, no state update; randomness
                     comes from the 'router' RNG stream

    -> (RoutingDecision, aux)   (`routing.RoutingDecision`: expert_index,
                                slot, gate, request, kept, all [G, S, K])
    -> (dispatch [G, S, E, C], combine [G, S, E, C], aux)   when
                                `spec.dense_dispatch` (Soft MoE)

`aux` is a dict of float32 arrays holding at least `REQUIRED_AUX_KEYS`
(`aux_loss` and `z_loss` enter the training loss; the rest are the metrics
every layer reports, see `losses.routing_metrics`).

Built-in routers (`names()` lists every registered one):
  'topk'           token choice (`routing.Router`); owns the top-K options
  'expert_choice'  each expert takes its top-C tokens
                   (`expert_choice.ExpertChoiceRouter`); not causal-safe
  'soft_moe'       dense slot mixtures (`soft_moe.SoftRouter`); its own dense
                   dispatch; not causal-safe
  'relu'           ReMoE, ReLU gates with an adaptive L1 penalty
                   (`relu_router.ReluRouter`; registered there, imported at
                   the end of this module)

Adding a router: write the module, `register(RouterSpec(...))` next to it,
and test it through MoeLayer with every dispatcher it declares
(tests/test_router_registry.py does this for a test router).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn

from moejax import dispatch as dispatch_lib
from moejax import expert_choice
from moejax import routing
from moejax import soft_moe

# Keys every router's aux dict holds (MoeLayer checks them when tracing).
REQUIRED_AUX_KEYS = ('aux_loss', 'z_loss', 'expert_load', 'max_violation',
                     'drop_fraction', 'fully_dropped_fraction',
                     'router_entropy', 'top1_prob', 'capacity')


class _Unchecked:
  """Marks an owned option that other routers may set (and then ignore)."""

  def __repr__(self):
    return 'UNCHECKED'


UNCHECKED = _Unchecked()


def _effective_top_k(layer: Any) -> int:
  return layer.effective_top_k


@dataclasses.dataclass(frozen=True)
class RouterSpec:
  """What MoeLayer needs to know about one router.

  Attributes:
    name: the `MoeLayer.router` value.
    module: the Linen router class (called as in the module docstring).
    kwargs: layer -> the module's constructor arguments, read from the
      MoeLayer's fields (and `effective_experts`, `effective_top_k`).
    dispatchers: the `MoeLayer.dispatcher` values it supports (a subset of
      `dispatch.DISPATCHER_NAMES`). With `dense_dispatch` the dispatcher is
      unused, and these are the values the layer accepts anyway.
    causal_safe: a token's routing depends on no later token, whatever the
      options (below); False = refused in a causal layer unless
      `allow_noncausal_routing`.
    options: ((MoeLayer field, default), ...): the fields only this router
      reads. Any other router requires the default, unless it declares the
      field too; `UNCHECKED` as default: others may set it (ignored there).
    causal_options: ((field, causal-safe values), ...): options whose other
      values make this router leak later tokens (refused like a router that
      is not causal-safe).
    causal_check: optional layer -> None, or the clause naming a
      combination of causal-safe options that still leaks later tokens
      (e.g. `choice_order_leak`); refused like `causal_options`.
    causal_note: what `causal_check` refuses, for `causal_choices`.
    capacity_k: layer -> K of the capacity formula C = ceil(cf * S * K / E),
      or None: the router takes no capacity.
    dense_dispatch: the router returns dense dispatch and combine weights
      [G, S, E, C] instead of a RoutingDecision; MoeLayer mixes the tokens
      into the expert slots with them (`soft_moe.soft_dispatch` /
      `soft_combine`). Nothing is dropped.
    validate: optional layer -> None, run when a MoeLayer with this router
      is built (before anything compiles): ValueError naming a bad value
      of the router's own options.
  """
  name: str
  module: type
  kwargs: Callable[[Any], Mapping[str, Any]]
  dispatchers: tuple = dispatch_lib.DISPATCHER_NAMES
  causal_safe: bool = True
  options: tuple = ()
  causal_options: tuple = ()
  causal_check: Optional[Callable[[Any], Optional[str]]] = None
  causal_note: str = ''
  capacity_k: Callable[[Any], Optional[int]] = _effective_top_k
  dense_dispatch: bool = False
  validate: Optional[Callable[[Any], None]] = None


_REGISTRY: dict[str, RouterSpec] = {}


def _check_pairs(spec: RouterSpec, field: str) -> None:
  """options / causal_options: a tuple of (MoeLayer field, value) pairs."""
  pairs = getattr(spec, field)
  ok = isinstance(pairs, tuple) and all(
      isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
      for p in pairs)
  if field == 'causal_options':
    ok = ok and all(isinstance(v, tuple) and v for _, v in pairs)
  if not ok:
    what = ('(field, non-empty tuple of causal-safe values)'
            if field == 'causal_options' else '(MoeLayer field, default)')
    raise ValueError(f'RouterSpec {field} of router {spec.name!r} must be a '
                     f'tuple of {what} pairs, got {pairs!r}.')


def _check_shared_defaults(spec: RouterSpec) -> None:
  """An option two routers own must have one default."""
  for other in _REGISTRY.values():
    theirs = dict(other.options)
    for name, default in spec.options:
      if (other.name != spec.name and name in theirs and
          theirs[name] != default):
        raise ValueError(
            f'router {spec.name!r} declares option {name} with default '
            f'{default!r}, but router {other.name!r} owns it with default '
            f'{theirs[name]!r}; allowed: the same default.')


def _check_spec(spec: RouterSpec) -> None:
  """ValueError naming the RouterSpec field unless `spec` is well formed."""
  if not isinstance(spec, RouterSpec):
    raise ValueError(f'register takes a RouterSpec, got {type(spec).__name__}.')
  if not isinstance(spec.name, str) or not spec.name:
    raise ValueError(f'RouterSpec name must be a non-empty str, got '
                     f'{spec.name!r}.')
  if not (isinstance(spec.module, type) and issubclass(spec.module,
                                                       nn.Module)):
    raise ValueError(f'RouterSpec module of router {spec.name!r} must be a '
                     f'flax.linen.Module class, got {spec.module!r}.')
  if not callable(spec.kwargs) or not callable(spec.capacity_k) or not all(
      f is None or callable(f) for f in (spec.validate, spec.causal_check)):
    raise ValueError(f'RouterSpec kwargs, capacity_k, validate and '
                     'causal_check (or None) '
                     f'of router {spec.name!r} must be callables of the '
                     'MoeLayer.')
  if not isinstance(spec.dispatchers, tuple) or not spec.dispatchers:
    raise ValueError(f'RouterSpec dispatchers of router {spec.name!r} must '
                     'be a non-empty tuple, a subset of '
                     f'{dispatch_lib.DISPATCHER_NAMES}; got '
                     f'{spec.dispatchers!r}.')
  for d in spec.dispatchers:
    routing.check_choice(f'dispatchers of router {spec.name!r}: dispatcher',
                         d, dispatch_lib.DISPATCHER_NAMES)
  _check_pairs(spec, 'options')
  _check_pairs(spec, 'causal_options')
  _check_shared_defaults(spec)


def _check_fields(spec: RouterSpec) -> None:
  """The options a spec names must be MoeLayer fields."""
  from moejax.layers import MoeLayer  # pylint: disable=import-outside-toplevel
  fields = {f.name for f in dataclasses.fields(MoeLayer)}
  for name, _ in spec.options + spec.causal_options:
    if name not in fields:
      raise ValueError(f'router {spec.name!r} declares option {name!r}, '
                       'which is not a MoeLayer field; allowed values: '
                       f'{", ".join(sorted(fields))}.')


def _add(spec: RouterSpec, replace: bool = False) -> RouterSpec:
  """`register` without the MoeLayer field check."""
  _check_spec(spec)
  if spec.name in _REGISTRY and not replace:
    raise ValueError(f'router {spec.name!r} is already registered; pass '
                     'replace=True or choose a name not in '
                     f'{names()}.')
  _REGISTRY[spec.name] = spec
  return spec


def register(spec: RouterSpec, replace: bool = False) -> RouterSpec:
  """Adds `spec` to the registry under `spec.name` and returns it.

  Args:
    spec: the router's RouterSpec.
    replace: allow replacing a registered router of the same name.

  Returns:
    `spec`; `MoeLayer(router=spec.name)` now builds it.

  Raises:
    ValueError naming the bad RouterSpec field, or the taken name.
  """
  _check_fields(spec)
  return _add(spec, replace)


def unregister(name: str) -> RouterSpec:
  """Removes the router `name` from the registry and returns its spec."""
  spec = get(name)
  del _REGISTRY[name]
  return spec


def get(name: str) -> RouterSpec:
  """The RouterSpec of `name`; ValueError listing the registered names."""
  routing.check_choice('router', name, names())
  return _REGISTRY[name]


def names() -> tuple:
  """The registered router names, in registration order."""
  return tuple(_REGISTRY)


# ----------------------------------------------------------- layer checks
def _owners(exclude: RouterSpec) -> dict:
  """{field: (default, [router names])} of the checked options the other
  routers own and `exclude` does not declare."""
  own = {name for name, _ in exclude.options}
  owners = {}
  for spec in _REGISTRY.values():
    for name, default in spec.options:
      if name not in own and default is not UNCHECKED:
        owners.setdefault(name, (default, []))[1].append(spec.name)
  return owners


def check_options(layer: Any, spec: RouterSpec) -> None:
  """Options owned by other routers must stay at their default.

  Raises:
    ValueError naming the option, its owners and the value to leave.
  """
  for name, (default, who) in _owners(spec).items():
    value = getattr(layer, name)
    if value != default:
      allowed = ' or '.join(repr(w) for w in who)
      raise ValueError(
          f'{name}={value!r} applies to router={allowed} only; with '
          f'router={spec.name!r} leave it at {default!r}.')


def check_dispatcher(spec: RouterSpec, dispatcher: str) -> None:
  """ValueError unless `spec` supports `dispatcher`."""
  if dispatcher in spec.dispatchers:
    return
  allowed = ', '.join(repr(d) for d in spec.dispatchers)
  if spec.dense_dispatch:
    raise ValueError(
        f'dispatcher={dispatcher!r} needs discrete assignments, and '
        f'router={spec.name!r} has its own dense dispatch; allowed values '
        f'with {spec.name}: {allowed} (unused).')
  raise ValueError(f'dispatcher={dispatcher!r} is not supported by '
                   f'router={spec.name!r}; allowed values with '
                   f'{spec.name}: {allowed}.')


def causal_leak(layer: Any, spec: RouterSpec) -> Optional[str]:
  """'name=value' of what lets a token see later tokens, or None."""
  if not spec.causal_safe:
    return f'router={spec.name!r}'
  for name, safe in spec.causal_options:
    value = getattr(layer, name)
    if value not in safe:
      return f'{name}={value!r}'
  return spec.causal_check(layer) if spec.causal_check else None


def choice_order_leak(layer: Any, choices: int) -> Optional[str]:
  """The leak of choice-major slot order, or None.

  With priority='choice' every token's 1st choice claims a slot before any
  token's 2nd choice, so when a token has `choices` >= 2 choices and the
  experts have a capacity (training or eval), whether its 2nd choice keeps
  a slot depends on the 1st choices of later tokens of its group.
  priority='token' (a token's choices together, in position order), one
  choice per token, or no capacity (dropless) leak nothing.
  """
  capped = [f'{name}={getattr(layer, name)!r}'
            for name in ('capacity_factor', 'eval_capacity_factor')
            if getattr(layer, name) is not None]
  if layer.priority != 'choice' or choices < 2 or not capped:
    return None
  return (f"priority='choice' with {choices} choices per token and a "
          f"capacity ({', '.join(capped)}; a 2nd choice keeps its slot only "
          "if later tokens' 1st choices left one)")


def causal_choices() -> str:
  """The causal-safe settings, for error messages: "router='topk' with
  priority 'choice' or 'token' (<its causal_note>)"."""
  parts = []
  for spec in _REGISTRY.values():
    if spec.causal_safe:
      text = f'router={spec.name!r}'
      for name, safe in spec.causal_options:
        text += f' with {name} ' + ' or '.join(repr(v) for v in safe)
      parts.append(text + (f' ({spec.causal_note})' if spec.causal_note
                           else ''))
  return ', or '.join(parts) or 'none registered'


def check_aux(spec: RouterSpec, aux: Mapping[str, Any]) -> None:
  """ValueError naming the router and the missing `REQUIRED_AUX_KEYS`."""
  missing = [k for k in REQUIRED_AUX_KEYS if k not in aux]
  if missing:
    raise ValueError(f'router {spec.name!r} returned an aux dict without '
                     f'{missing}; every router reports {REQUIRED_AUX_KEYS}.')


# ---------------------------------------------------------- built-in routers
# Added with `_add`: moejax.layers imports this module before it defines
# MoeLayer, so `register`'s field check cannot run yet
# (tests/test_router_registry.py checks these options are fields).
TOPK_OPTIONS = (('top_k', 1), ('priority', 'choice'),
                ('second_expert_policy', 'all'), ('renormalize', False),
                ('routed_scaling', 1.0), ('jitter_eps', 0.0),
                ('num_groups', 1), ('topk_groups', None),
                ('group_score', 'top2_sum'), ('bias_update_rate', 0.0),
                ('selection_bias', False), ('aux_loss_scope', 'group'),
                ('num_null_experts', 0))


def _topk_kwargs(layer: Any) -> dict:
  return dict(
      num_experts=layer.effective_experts, top_k=layer.effective_top_k,
      score_fn=layer.score_fn, priority=layer.priority,
      renormalize=layer.renormalize, routed_scaling=layer.routed_scaling,
      second_expert_policy=layer.second_expert_policy,
      second_expert_threshold=layer.second_expert_threshold,
      jitter_eps=layer.jitter_eps, num_groups=layer.num_groups,
      topk_groups=layer.topk_groups, group_score=layer.group_score,
      bias_update_rate=layer.bias_update_rate,
      selection_bias=layer.selection_bias,
      aux_loss_scope=layer.aux_loss_scope,
      num_null_experts=layer.num_null_experts)


def _check_null_experts(layer: Any) -> None:
  """num_null_experts: an int >= 0, and with null experts none of the
  options that assume every scored expert is a real one."""
  n = layer.num_null_experts
  if isinstance(n, bool) or not isinstance(n, int) or n < 0:
    raise ValueError(f'num_null_experts must be an int >= 0 (0 = no null '
                     f'experts), got {n!r}.')
  if not n:
    return
  for name, default in (('bias_update_rate', 0.0), ('selection_bias', False),
                        ('num_groups', 1)):
    if getattr(layer, name) != default:
      raise ValueError(
          f'num_null_experts={n} does not combine with {name}='
          f'{getattr(layer, name)!r} (a bias or expert groups over the real '
          f'experts only); allowed with null experts: {name}={default!r}.')


_add(RouterSpec(
    name='topk', module=routing.Router, kwargs=_topk_kwargs,
    options=TOPK_OPTIONS, validate=_check_null_experts,
    # 'score' priority sorts a group's tokens by score: later tokens first.
    causal_options=(('priority', ('choice', 'token')),),
    causal_check=lambda layer: choice_order_leak(layer,
                                                 layer.effective_top_k),
    causal_note=("'choice' only with one choice per token or no capacity: "
                 'capacity_factor=None and eval_capacity_factor=None')))
_add(RouterSpec(
    name='expert_choice', module=expert_choice.ExpertChoiceRouter,
    kwargs=lambda layer: dict(num_experts=layer.effective_experts,
                              score_fn=layer.score_fn),
    causal_safe=False,
    # cf is the mean number of experts per token: K = granularity.
    capacity_k=lambda layer: layer.granularity))
_add(RouterSpec(
    name='soft_moe', module=soft_moe.SoftRouter,
    kwargs=lambda layer: dict(num_experts=layer.effective_experts,
                              slots_per_expert=layer.slots_per_expert,
                              normalize=layer.soft_normalize),
    dispatchers=('gather', 'einsum'), causal_safe=False,
    # Unchecked elsewhere: configs that sweep the router keep one setting.
    options=(('slots_per_expert', UNCHECKED), ('soft_normalize', UNCHECKED)),
    capacity_k=lambda layer: None, dense_dispatch=True))

# ReMoE registers itself ('relu'); imported last, as it uses this module.
from moejax import relu_router  # pylint: disable=g-import-not-at-top,wrong-import-position,unused-import
