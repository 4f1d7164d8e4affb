"""The router registry (moejax.routers): a router defined here, registered
at test time, runs end to end through MoeLayer with every dispatcher it
declares; MoeLayer refuses what its RouterSpec does not allow.

The test router hashes a token's position in its group to an expert
(expert = s mod E, Roller et al. 2021 hash layers with the position as the
hash), with gate sigmoid(x . w_e): params router/kernel [D, E], K = 1. It
claims slots in the layer's `priority` order (an option it shares with
'topk'), so it is causal-safe with 'choice' / 'token' and leaks with
'score'.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import generate
from moejax import layers
from moejax import losses
from moejax import routers
from moejax import routing
from moejax.models import TransformerLM
from tests import reference
from tests.conftest import init_key

D, F, E, S = 8, 16, 3, 8
BUILTIN = ('topk', 'expert_choice', 'soft_moe', 'relu')


class PositionHashRouter(nn.Module):
  """x [G, S, D] -> (RoutingDecision with K = 1, aux): expert = s mod E."""
  num_experts: int
  priority: str = 'choice'

  @nn.compact
  def __call__(self, x, capacity, valid, deterministic=True):
    del deterministic  # nothing random
    g, s, d = x.shape
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (d, self.num_experts), jnp.float32)
    logits = routing.router_logits(x, kernel)  # [G, S, E]
    expert = jnp.broadcast_to(jnp.arange(s) % self.num_experts, (g, s))
    expert_index = expert[..., None].astype(jnp.int32)  # [G, S, 1]
    gate = jnp.take_along_axis(jax.nn.sigmoid(logits), expert_index, -1)
    request = valid[..., None]
    slot, kept = routing.assign_slots(expert_index, request, self.num_experts,
                                      capacity, self.priority, gate[..., 0])
    decision = routing.RoutingDecision(
        expert_index=expert_index, slot=slot, gate=gate, request=request,
        kept=kept, num_experts=self.num_experts, capacity=capacity)
    probs = jax.nn.one_hot(expert, self.num_experts)  # the hash is certain
    aux = {'aux_loss': jnp.zeros((), jnp.float32),
           'z_loss': losses.z_loss(logits, valid)}
    aux.update(losses.routing_metrics(probs, decision, valid))
    return decision, aux


HASH = routers.RouterSpec(
    name='hash', module=PositionHashRouter,
    kwargs=lambda layer: dict(num_experts=layer.effective_experts,
                              priority=layer.priority),
    dispatchers=('gather', 'einsum', 'ragged', 'per_token'),
    causal_safe=True,
    options=(('priority', 'choice'),),  # shared with 'topk'
    causal_options=(('priority', ('choice', 'token')),))


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


@pytest.fixture
def register():
  """register(spec) for the test; every spec it added is removed after."""
  added = []

  def add(spec):
    added.append(routers.register(spec).name)
    return spec

  yield add
  for name in added:
    if name in routers.names():
      routers.unregister(name)
  assert routers.names() == BUILTIN


def _x():
  return jax.random.normal(jax.random.key(0), (2, S, D))


# Hand table: E=3, S=8, experts by position 0 1 2 0 1 2 0 1. Training cf
# 0.75: C = ceil(0.75 * 8 * 1 / 3) = 2 slots, claimed in position order.
# Group 0: expert 0 gets positions 0, 3 and drops 6; expert 1 gets 1, 4 and
# drops 7. Group 1 (position 1 is padding, which takes no slot): expert 0
# drops 6; expert 1 keeps 4 and 7. 3 of the 15 valid tokens are dropped.
KEPT_TRAIN = np.array([[1, 1, 1, 1, 1, 1, 0, 0],
                       [1, 0, 1, 1, 1, 1, 0, 1]], bool)
# Eval cf None: dropless, every valid token is kept.
KEPT_EVAL = np.array([[1, 1, 1, 1, 1, 1, 1, 1],
                      [1, 0, 1, 1, 1, 1, 1, 1]], bool)


def _by_hand(x, params, kept):
  """y [G, S, D] = kept * sigmoid(x . w_e) * FFN_e(x), e = s mod E."""
  x = np.asarray(x, np.float64)
  w = np.asarray(params['router']['kernel'], np.float64)
  experts = {k: np.asarray(v, np.float64) for k, v in params['experts'].items()}
  y = np.zeros_like(x)
  for g in range(x.shape[0]):
    for s in range(S):
      if kept[g, s]:
        e = s % E
        gate = 1 / (1 + np.exp(-x[g, s] @ w[:, e]))
        y[g, s] = gate * reference.ffn(x[g, s], experts, e, 'gelu')
  return y


@pytest.mark.parametrize('deterministic', [False, True])
@pytest.mark.parametrize('dispatcher', HASH.dispatchers)
def test_registered_router_runs_with_each_declared_dispatcher(
    register, dispatcher, deterministic):
  register(HASH)
  layer = moejax.MoeLayer(num_experts=E, d_ff=F, router='hash',
                          dispatcher=dispatcher, capacity_factor=0.75,
                          eval_capacity_factor=None, min_capacity=0,
                          activation='gelu', causal=True)
  x = _x()
  pad = jnp.zeros((2, S), bool).at[1, 1].set(True)
  variables = layer.init(init_key(1), x, pad)
  params = variables['params']
  assert set(params) == {'router', 'experts'}
  assert params['router']['kernel'].shape == (D, E)  # router/kernel
  y, aux = layer.apply(variables, x, pad, deterministic=deterministic)
  kept = KEPT_EVAL if deterministic else KEPT_TRAIN
  np.testing.assert_allclose(y, _by_hand(x, params, kept), rtol=1e-5,
                             atol=1e-6)
  assert float(aux['capacity']) == (S if deterministic else 2)
  assert float(aux['drop_fraction']) == pytest.approx(
      0 if deterministic else 3 / 15)
  # Load before capacity, over both groups: expert 0 gets 3 + 3 valid
  # tokens, expert 1 3 + 2 (position 1 of group 1 is padding), expert 2
  # 2 + 2; of 15.
  np.testing.assert_allclose(aux['expert_load'], [6 / 15, 5 / 15, 4 / 15],
                             rtol=1e-6)


def test_registered_router_in_a_causal_lm_and_generation(register):
  register(HASH)
  model = TransformerLM(num_layers=1, d_model=D, num_heads=2, d_ff=F,
                        vocab_size=32, moe=dict(num_experts=E, router='hash'))
  generate.check_model(model)  # causal-safe: decodable
  tokens = jnp.arange(6, dtype=jnp.int32)[None]
  variables = jax.jit(model.init)(init_key(2), tokens)
  assert 'kernel' in variables['params']['block_0']['ffn']['router']
  logits, aux = model.apply(variables, tokens)
  later = model.apply(variables, tokens.at[0, 5].set(7))[0]
  np.testing.assert_array_equal(logits[:, :5], later[:, :5])  # causal
  assert set(aux['layers']) == {'block_0'}


def test_unknown_router_lists_the_registered_names(register):
  with pytest.raises(ValueError, match="allowed values: 'topk', "
                     "'expert_choice', 'soft_moe', 'relu'.$"):
    moejax.MoeLayer(num_experts=E, d_ff=F, router='hash')
  register(HASH)
  with pytest.raises(ValueError, match="router='nope' is not supported; "
                     "allowed values: 'topk', 'expert_choice', 'soft_moe', "
                     "'relu', 'hash'."):
    moejax.MoeLayer(num_experts=E, d_ff=F, router='nope')


def test_router_not_causal_safe_is_refused_in_a_causal_layer(register):
  register(HASH)
  register(dataclasses.replace(HASH, name='hash_lookahead',
                               causal_safe=False))
  kw = dict(num_experts=E, d_ff=F, router='hash_lookahead')
  with pytest.raises(ValueError) as info:
    moejax.MoeLayer(**kw, causal=True)
  assert str(info.value).startswith("router='hash_lookahead' lets a token")
  # Every causal-safe registered router is offered, with its safe options.
  assert ("allowed values in a causal model: router='topk' with priority "
          "'choice' or 'token' ('choice' only with one choice per token or "
          'no capacity: capacity_factor=None and eval_capacity_factor=None), '
          "or router='relu' with priority 'choice' or "
          "'token', or router='hash' with priority 'choice' or "
          "'token' (or set allow_noncausal_routing=True") in str(info.value)
  moejax.MoeLayer(**kw, causal=True, allow_noncausal_routing=True)
  moejax.MoeLayer(**kw)  # not causal: fine
  moejax.MoeLayer(num_experts=E, d_ff=F, router='hash', causal=True)
  with pytest.raises(ValueError, match="priority='score' lets a token"):
    moejax.MoeLayer(num_experts=E, d_ff=F, router='hash', causal=True,
                    priority='score')
  # A spec's causal_check refuses a combination of causal-safe options.
  register(dataclasses.replace(
      HASH, name='hash_checked', causal_note='not with min_capacity=0',
      causal_check=lambda layer: ('min_capacity=0' if layer.min_capacity == 0
                                  else None)))
  kw = dict(num_experts=E, d_ff=F, router='hash_checked', causal=True)
  with pytest.raises(ValueError, match=(
      r"^min_capacity=0 lets a token's routing depend on later tokens.*"
      r"router='hash_checked' with priority 'choice' or 'token' \(not with "
      r'min_capacity=0\)')):
    moejax.MoeLayer(**kw, min_capacity=0)
  moejax.MoeLayer(**kw, min_capacity=1)
  moejax.MoeLayer(**kw, min_capacity=0, allow_noncausal_routing=True)
  # Generation asks the registry too.
  lm = dict(num_layers=1, d_model=D, num_heads=2, d_ff=F, vocab_size=32)
  model = TransformerLM(**lm, moe=dict(num_experts=E, router='hash_lookahead',
                                       allow_noncausal_routing=True))
  with pytest.raises(ValueError, match="router='hash_lookahead' routes"):
    generate.check_model(model)


def test_options_owned_by_another_router_are_refused(register):
  register(HASH)
  with pytest.raises(ValueError, match=(
      r"^top_k=2 applies to router='topk' or 'relu' only; with "
      r"router='hash' leave it at 1\.$")):
    moejax.MoeLayer(num_experts=E, d_ff=F, router='hash', top_k=2)
  # priority is owned by 'topk', 'relu' and 'hash': they may set it, others
  # not.
  moejax.MoeLayer(num_experts=E, d_ff=F, router='hash', priority='token')
  with pytest.raises(ValueError, match=(
      r"^priority='token' applies to router='topk' or 'relu' or 'hash' "
      r"only; with "
      r"router='expert_choice' leave it at 'choice'\.$")):
    moejax.MoeLayer(num_experts=E, d_ff=F, router='expert_choice',
                    priority='token')
  # UNCHECKED options (soft_moe's slots_per_expert) stay free elsewhere.
  moejax.MoeLayer(num_experts=E, d_ff=F, router='hash', slots_per_expert=2)


def test_undeclared_dispatcher_is_refused(register):
  register(dataclasses.replace(HASH, name='hash_einsum',
                               dispatchers=('einsum',)))
  with pytest.raises(ValueError, match=(
      r"^dispatcher='gather' is not supported by router='hash_einsum'; "
      r"allowed values with hash_einsum: 'einsum'\.$")):
    moejax.MoeLayer(num_experts=E, d_ff=F, router='hash_einsum')
  moejax.MoeLayer(num_experts=E, d_ff=F, router='hash_einsum',
                  dispatcher='einsum')


@pytest.mark.parametrize('change,message', [
    (dict(name='topk'), "router 'topk' is already registered"),
    (dict(options=(('hash_seed', 0),)),
     "declares option 'hash_seed', which is not a MoeLayer field"),
    (dict(options=(('priority', 'token'),)),
     "router 'topk' owns it with default 'choice'"),
    (dict(dispatchers=('scatter',)), "dispatcher='scatter' is not supported"),
    (dict(dispatchers=()), 'dispatchers of router'),
    (dict(causal_options=(('priority', 'choice'),)), 'causal_options'),
    (dict(causal_check='min_capacity'), 'causal_check'),
    (dict(module=PositionHashRouter(num_experts=E)),
     'must be a flax.linen.Module class'),
])
def test_register_checks_the_spec(change, message):
  with pytest.raises(ValueError, match=message):
    routers.register(dataclasses.replace(HASH, **change))
  assert routers.names() == BUILTIN


class _NoMetrics(PositionHashRouter):

  @nn.compact
  def __call__(self, x, capacity, valid, deterministic=True):
    decision, aux = super().__call__(x, capacity, valid, deterministic)
    return decision, {'aux_loss': aux['aux_loss'], 'z_loss': aux['z_loss']}


def test_router_must_report_the_required_aux(register):
  register(dataclasses.replace(HASH, name='hash_quiet', module=_NoMetrics))
  layer = moejax.MoeLayer(num_experts=E, d_ff=F, router='hash_quiet')
  with pytest.raises(ValueError, match=r"router 'hash_quiet' returned an "
                     r"aux dict without \['expert_load'"):
    jax.eval_shape(layer.init, init_key(0), _x())


def test_builtin_specs():
  assert layers.ROUTERS == moejax.ROUTERS == BUILTIN == routers.names()
  assert layers.NONCAUSAL_ROUTERS == ('expert_choice', 'soft_moe')
  for name in BUILTIN:
    routers._check_fields(routers.get(name))  # added before MoeLayer existed
  assert [n for n in BUILTIN if routers.get(n).dense_dispatch] == ['soft_moe']
  assert routers.get('soft_moe').dispatchers == ('gather', 'einsum')
  assert routers.get('topk').dispatchers == moejax.DISPATCHER_NAMES
