"""MoeLayer semantics: jitter, eval determinism, dtypes, params, bad args."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from tests.conftest import init_key

D, F = 8, 16


def _x(b=2, l=12, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, l, D))


def _jit_apply(layer):
  """layer.apply compiled once (much faster than op-by-op for new shapes)."""
  return jax.jit(layer.apply, static_argnames=('deterministic', 'mutable'))


def _dispatched_rows(layer, variables, x, **kwargs):
  _, state = _jit_apply(layer)(variables, x, mutable=('intermediates',),
                               **kwargs)
  (buffers,) = state['intermediates']['dispatched']  # [G, E, C, D]
  rows = np.asarray(buffers).reshape(-1, D)
  return rows[np.abs(rows).sum(-1) > 0]


def test_jitter_changes_routing_never_expert_inputs():
  layer = moejax.MoeLayer(num_experts=4, d_ff=F, top_k=2, jitter_eps=0.5,
                          capacity_factor=1.0)
  x = _x()
  variables = layer.init(init_key(1), x)
  rngs = {'router': jax.random.key(7)}
  rows = _dispatched_rows(layer, variables, x, deterministic=False, rngs=rngs)
  tokens = np.asarray(x).reshape(-1, D)
  # Every dispatched row is exactly (bitwise) one of the clean tokens.
  for row in rows:
    assert np.any(np.all(row == tokens, axis=-1))
  # ... while routing did change: the training-mode router saw other inputs.
  _, aux_jit = _jit_apply(layer)(variables, x, deterministic=False,
                                 rngs=rngs)
  plain = layer.clone(jitter_eps=0.0)
  _, aux_plain = _jit_apply(plain)(variables, x, deterministic=False)
  assert float(aux_jit['router_entropy']) != float(aux_plain['router_entropy'])


@pytest.mark.parametrize('kwargs', [dict(jitter_eps=0.5),
                                    dict(second_expert_policy='random')])
def test_eval_is_reproducible_and_never_random(kwargs):
  layer = moejax.MoeLayer(num_experts=4, d_ff=F, top_k=2, **kwargs)
  base = moejax.MoeLayer(num_experts=4, d_ff=F, top_k=2)
  x = _x()
  variables = layer.init(init_key(1), x)
  # A decisive router, so that renormalised second gates fall below the
  # 0.2 threshold and the 'random' policy really samples.
  variables['params']['router']['kernel'] *= 30.0
  y1, aux1 = layer.apply(variables, x, deterministic=True)
  y2, _ = layer.apply(variables, x, deterministic=True,
                      rngs={'router': jax.random.key(3)})
  y_base, aux_base = base.apply(variables, x, deterministic=True)
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(y1, y_base)
  assert float(aux1['drop_fraction']) == float(aux_base['drop_fraction'])
  # In training the randomness is real: two keys give different outputs.
  ya, _ = layer.apply(variables, x, deterministic=False,
                      rngs={'router': jax.random.key(3)})
  yb, _ = layer.apply(variables, x, deterministic=False,
                      rngs={'router': jax.random.key(4)})
  assert not np.array_equal(ya, yb)


def test_train_and_eval_capacity_factors():
  # S=12, E=4, K=1: train cf 0.5 -> C = max(4, ceil(1.5)) = 4; eval cf 2.0
  # -> C = ceil(6) = 6.
  layer = moejax.MoeLayer(num_experts=4, d_ff=F, capacity_factor=0.5,
                          eval_capacity_factor=2.0)
  x = _x()
  variables = layer.init(init_key(1), x)
  _, aux_train = layer.apply(variables, x, deterministic=False)
  _, aux_eval = layer.apply(variables, x, deterministic=True)
  assert float(aux_train['capacity']) == 4.0
  assert float(aux_eval['capacity']) == 6.0


@pytest.mark.parametrize('activation,inputs', [('relu', ['wi']),
                                               ('gelu', ['wi']),
                                               ('swiglu', ['wi_0', 'wi_1']),
                                               ('geglu', ['wi_0', 'wi_1'])])
def test_param_tree_layout(activation, inputs):
  layer = moejax.MoeLayer(num_experts=4, d_ff=F, activation=activation,
                          param_dtype=jnp.bfloat16)
  shapes = jax.eval_shape(layer.init, jax.random.key(0), _x())['params']
  expected = {'router': {'kernel': ((D, 4), jnp.float32)},
              'experts': {name: ((4, D, F), jnp.bfloat16) for name in inputs}}
  expected['experts']['wo'] = ((4, F, D), jnp.bfloat16)
  got = jax.tree.map(lambda a: (a.shape, a.dtype), shapes)
  assert got == expected


def test_experts_are_initialised_independently():
  bank = moejax.ExpertBank(num_experts=4, d_ff=256)
  params = bank.init(init_key(0), jnp.zeros((1, 4, 1, 128)))['params']
  wi = np.asarray(params['wi'])  # [E, D=128, F=256]
  # Fan-in per expert is D = 128 (not E*D): std ~ 1/sqrt(128) = 0.0884
  # (truncated normal keeps the variance). 32768 draws: ~1% error.
  np.testing.assert_allclose(wi.std(axis=(1, 2)), 128 ** -0.5, rtol=0.05)
  corr = np.corrcoef(wi.reshape(4, -1))
  assert np.abs(corr[~np.eye(4, dtype=bool)]).max() < 0.05


def test_bf16_compute_keeps_router_float32():
  x = _x()
  f32 = moejax.MoeLayer(num_experts=4, d_ff=F, top_k=2)
  bf16 = f32.clone(dtype=jnp.bfloat16)
  variables = f32.init(init_key(1), x)
  y32, aux32 = f32.apply(variables, x)
  y16, aux16 = bf16.apply(variables, x)
  assert y16.dtype == jnp.bfloat16
  # Routing is computed in float32 either way: identical decisions.
  for name in ('aux_loss', 'z_loss', 'drop_fraction', 'router_entropy'):
    assert float(aux16[name]) == float(aux32[name])
  np.testing.assert_allclose(y16.astype(np.float32), y32, rtol=0.05,
                             atol=0.05)


def test_group_size_and_padding_to_groups():
  x = _x(2, 12)
  layer = moejax.MoeLayer(num_experts=4, d_ff=F, group_size=5)
  with pytest.raises(ValueError, match='group_size'):
    layer.init(init_key(0), x)
  padded = layer.clone(pad_to_group=True)
  variables = padded.init(init_key(0), x)
  # 24 tokens in groups of 5: 5 groups, the last one holds 4 tokens and one
  # padding slot, which takes no capacity and is cut from the output.
  y, _ = _jit_apply(padded)(variables, x)
  assert y.shape == x.shape
  # The padded layer computes each token exactly like a per-group reference:
  # tokens 20..23 alone in a [1, 4] batch with group_size=None (S=4).
  alone = padded.clone(group_size=None, pad_to_group=False)
  y_last, _ = _jit_apply(alone)(variables, x.reshape(1, 24, D)[:, 20:])
  np.testing.assert_allclose(y.reshape(24, D)[20:], y_last[0], rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize('kwargs,name', [
    (dict(top_k=0), 'top_k'),
    (dict(top_k=5), 'top_k'),
    (dict(num_experts=0), 'num_experts'),
    (dict(capacity_factor=0.0), 'capacity_factor'),
    (dict(capacity_factor=-1.0), 'capacity_factor'),
    (dict(eval_capacity_factor=0), 'eval_capacity_factor'),
    (dict(router='hash'), 'router'),
    (dict(dispatcher='sparse'), 'dispatcher'),
    (dict(priority='random'), 'priority'),
    (dict(activation='tanh'), 'activation'),
    (dict(score_fn='relu'), 'score_fn'),
    (dict(second_expert_policy='sample'), 'second_expert_policy'),
    (dict(group_size=0), 'group_size'),
    (dict(group_size=2.5), 'group_size'),
    (dict(d_ff=0), 'd_ff'),
    (dict(jitter_eps=1.5), 'jitter_eps'),
    (dict(min_capacity=-2), 'min_capacity'),
    (dict(capacity_multiple_of=0), 'capacity_multiple_of'),
    (dict(causal=True, priority='score'), 'priority'),
])
def test_bad_arguments_raise_before_compiling(kwargs, name):
  args = dict(num_experts=4, d_ff=F)
  args.update(kwargs)
  with pytest.raises(ValueError, match=name) as info:
    moejax.MoeLayer(**args)
  if name not in ('top_k', 'num_experts'):  # choices list the allowed ones
    assert 'allowed' in str(info.value) or 'must be' in str(info.value)


@pytest.mark.parametrize('kwargs,refused', [
    (dict(top_k=2), True),  # GShard's choice-major order with a capacity
    (dict(top_k=2, capacity_factor=None), True),  # eval cf 2.0 still caps
    (dict(top_k=2, capacity_factor=None, eval_capacity_factor=None), False),
    (dict(top_k=2, priority='token'), False),  # a token's choices together
    (dict(top_k=1), False),  # one choice: 'choice' = 'token'
    (dict(top_k=1, granularity=2), True),  # 2 effective choices
    (dict(top_k=2, allow_noncausal_routing=True), False),  # accepted
    # ReMoE: choice j is expert j, so every expert's claims come in
    # position order under 'choice' too.
    (dict(router='relu', top_k=1), False),
])
def test_causal_layer_refuses_choice_order_with_two_choices(kwargs, refused):
  args = dict(num_experts=4, d_ff=F, causal=True, **kwargs)
  if refused:
    with pytest.raises(ValueError, match="priority='choice' with .* later "
                       "tokens' 1st choices.*allow_noncausal_routing=True"):
      moejax.MoeLayer(**args)
    moejax.MoeLayer(**{**args, 'causal': False})  # an encoder may
  else:
    moejax.MoeLayer(**args)


def test_causal_model_may_opt_in_to_score_priority():
  layer = moejax.MoeLayer(num_experts=4, d_ff=F, causal=True,
                          priority='score', allow_noncausal_routing=True)
  assert layer.priority == 'score'
