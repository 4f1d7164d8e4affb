"""TransformerLM: causality, RoPE, MoE placement, padding, a training step,
validation, and parameter / FLOP accounting.

Tiny sizes throughout (L=16, D=32, H=4, F=64, E=4). Param trees that are
only inspected come from `jax.eval_shape`, so nothing compiles for them.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.models import (TransformerLM, apply_rope, count_params,
                           flops_per_token, moe_layer_indices, param_shapes,
                           summary)
from moejax.models import flops as flops_lib

L, D, H, F, E, V = 16, 32, 4, 64, 4, 256
# Token priority keeps capacity-limited routing causal; K=2 exercises it.
MOE = dict(num_experts=E, top_k=2, priority='token', min_capacity=4)
DROPLESS = dict(MOE, capacity_factor=None, eval_capacity_factor=None)


def _model(num_layers=2, moe=None, **kw):
  return TransformerLM(num_layers=num_layers, d_model=D, num_heads=H, d_ff=F,
                       moe=moe, **kw)


def _tokens(b=1, l=L, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, V, (b, l)), jnp.int32)


def _key(seed):
  # RBG keys: XLA:CPU compiles threefry draws slowly (about a second per
  # param kernel); RngBitGenerator is one cheap op. Same distributions.
  return jax.random.key(seed, impl='rbg')


@pytest.fixture(scope='module')
def dense():
  model = _model()
  return model, jax.jit(model.init)(_key(1), _tokens())


@pytest.fixture(scope='module')
def moe():
  # Capacity settings do not change params: tests clone with their own.
  model = _model(moe=DROPLESS)
  variables = jax.jit(model.init)(_key(2), _tokens())
  # A decisive router, so routing is far from ties.
  for i in range(2):
    kernel = variables['params'][f'block_{i}']['ffn']['router']['kernel']
    variables['params'][f'block_{i}']['ffn']['router']['kernel'] = kernel * 30
  return model, variables


def _shapes(tree):
  return jax.tree.map(lambda a: tuple(a.shape), tree)


# 1. Causality.
@pytest.mark.parametrize('kind', ['dense', 'moe'])
def test_causal(kind, request):
  model, variables = request.getfixturevalue(kind)
  base = _tokens(seed=3)[0]
  # Row t + 1 changes token t only; row 0 is the unchanged sequence.
  batch = jnp.stack([base] + [base.at[t].set((base[t] + 1) % V)
                              for t in range(L)])
  logits, _ = jax.jit(model.apply)(variables, batch)
  logits = np.asarray(logits)
  for t in range(L):
    np.testing.assert_allclose(logits[t + 1, :t], logits[0, :t], rtol=1e-5,
                               atol=1e-5, err_msg=f'token {t} leaked back')
    assert np.abs(logits[t + 1, t] - logits[0, t]).max() > 1e-3


# 2. RoPE.
def test_rope_rotates_preserves_norm_and_is_relative():
  dh = 8
  rope = jax.jit(apply_rope)  # one shape below, so one compile
  pos = jnp.arange(L)
  # numpy data: XLA:CPU compiles 5-D threefry draws very slowly.
  q, k = jnp.asarray(np.random.default_rng(4).normal(size=(2, 1, L, H, dh)),
                     jnp.float32)
  rq = rope(q, pos)
  np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1),
                             jnp.linalg.norm(q, axis=-1), rtol=1e-5)
  # Feature 0 pairs with feature Dh/2 and turns by `position` radians.
  e0 = jnp.zeros((1, L, H, dh)).at[..., 0].set(1.0)
  out = np.asarray(rope(e0, pos))[0, :, 0]
  np.testing.assert_allclose(out[:, 0], np.cos(np.arange(L)), atol=1e-5)
  np.testing.assert_allclose(out[:, dh // 2], np.sin(np.arange(L)), atol=1e-5)
  # The same q and k vectors placed at every position: score[h, i, j] =
  # <rope(q, i), rope(k, j)> must depend on i - j only (Toeplitz).
  rq = rope(jnp.broadcast_to(q[:, :1], q.shape), pos)[0]  # [L, H, Dh]
  rk = rope(jnp.broadcast_to(k[:, :1], k.shape), pos)[0]
  score = np.asarray(jnp.einsum('IHK,JHK->HIJ', rq, rk))
  for i, j, s in [(3, 1, 5), (7, 7, 2), (0, 4, 9), (15, 0, 0)]:
    if s:
      np.testing.assert_allclose(score[:, i, j], score[:, i + s, j + s],
                                 rtol=1e-4, atol=1e-5)
  assert np.abs(score[:, 3, 1] - score[:, 3, 2]).max() > 1e-3


# 3. MoE layer placement rule.
@pytest.mark.parametrize('args,expected', [
    ((4, 1, 0), (0, 1, 2, 3)),
    ((6, 2, 0), (1, 3, 5)),
    ((4, 1, 1), (1, 2, 3)),
    ((6, 2, 1), (2, 4)),
    ((2, 3, 0), ()),
    ((0, 1, 0), ()),
])
def test_moe_layer_indices(args, expected):
  assert moe_layer_indices(*args) == expected


# 4. MoE params exactly in the expected blocks.
@pytest.mark.parametrize('kw,expected', [
    (dict(moe=MOE), (0, 1, 2, 3)),
    (dict(moe=MOE, moe_every=2), (1, 3)),
    (dict(moe=MOE, first_dense_layers=1, moe_every=2), (2,)),
    (dict(moe=dict(MOE, num_experts=0)), ()),
    (dict(moe=None), ()),
])
def test_moe_placement(kw, expected):
  model = _model(num_layers=4, **kw)
  params = _shapes(param_shapes(model))
  for i in range(4):
    block = params[f'block_{i}']
    assert set(block) == {'attn_norm', 'attn', 'ffn_norm', 'ffn'}
    assert block['attn'] == {'query': (D, H, D // H), 'key': (D, H, D // H),
                             'value': (D, H, D // H), 'out': (H, D // H, D)}
    if i in expected:
      assert block['ffn'] == {'router': {'kernel': (D, E)},
                              'experts': {'wi': (E, D, F), 'wo': (E, F, D)}}
    else:
      assert block['ffn'] == {'wi': (D, F), 'wo': (F, D)}
  _, aux = jax.eval_shape(model.apply, {'params': param_shapes(model)},
                          _tokens())
  assert set(aux['layers']) == {f'block_{i}' for i in expected}
  assert model.moe_layers == expected


# 5. Tied / untied heads; float32 logits from bfloat16 compute.
def test_tied_untied_and_bf16_logits():
  tied = _shapes(param_shapes(_model()))
  untied = _shapes(param_shapes(_model(tie_embeddings=False)))
  assert 'head' not in tied and tied['embed'] == {'embedding': (V, D)}
  assert untied['head'] == {'kernel': (D, V)}
  assert set(untied) - set(tied) == {'head'}
  for tie in (True, False):
    model = _model(moe=MOE, dtype=jnp.bfloat16, tie_embeddings=tie)
    logits, aux = jax.eval_shape(model.apply,
                                 {'params': param_shapes(model)}, _tokens())
    assert logits.shape == (1, L, V) and logits.dtype == jnp.float32
    assert aux['aux_loss'].dtype == jnp.float32


# 6. Padding: excluded from routing (no capacity) and as attention keys.
def test_left_padding_matches_unpadded(moe):
  model, variables = moe
  # E=4, K=2, eval cf=0.5: C = max(4, ceil(.5*S*2/4)) = 4 for both S=16 and
  # S=12, so 12 real tokens (24 requests) must drop >= 8 assignments. Left
  # padding goes first in token order: if it took capacity, real tokens
  # would drop more.
  model = model.clone(moe=dict(MOE, eval_capacity_factor=0.5))
  pad, real = 4, _tokens(l=L - 4, seed=6)
  padded = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), real], axis=1)
  mask = jnp.arange(L)[None] < pad
  apply = jax.jit(model.apply)
  logits_p, aux_p = apply(variables, padded, mask)
  logits_r, aux_r = apply(variables, real)
  assert np.isfinite(logits_p).all()
  # RoPE is relative, so shifting the real tokens by `pad` changes nothing.
  np.testing.assert_allclose(logits_p[:, pad:], logits_r, rtol=1e-4,
                             atol=1e-4)
  for name, layer_aux in aux_r['layers'].items():
    assert float(layer_aux['drop_fraction']) >= 8 / 24 - 1e-6
    for key, value in layer_aux.items():
      np.testing.assert_allclose(aux_p['layers'][name][key], value,
                                 rtol=1e-5, atol=1e-6,
                                 err_msg=f'{name}/{key}')
  # Control: the same batch without the mask does route the pad tokens.
  _, aux_nomask = apply(variables, padded, jnp.zeros_like(mask))
  assert not np.allclose(aux_nomask['layers']['block_0']['expert_load'],
                         aux_r['layers']['block_0']['expert_load'])


# 7. One SGD step lowers the next-token loss.
@pytest.mark.parametrize('kind', ['dense', 'moe'])
def test_gradient_step_reduces_loss(kind, request):
  model, variables = request.getfixturevalue(kind)
  if kind == 'moe':
    model = model.clone(moe=dict(MOE, capacity_factor=1.25))
  tokens = _tokens(b=4, seed=7)

  def loss_fn(params):
    logits, aux = model.apply({'params': params}, tokens[:, :-1],
                              deterministic=False)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
    return nll + 0.01 * aux['aux_loss'], nll

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (_, before), grads = grad_fn(variables['params'])
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  params = jax.tree.map(lambda p, g: p - 0.1 * g, variables['params'], grads)
  (_, after), _ = grad_fn(params)
  assert float(after) < float(before) - 1e-3


# 8. Validation before anything compiles.
@pytest.mark.parametrize('kw,match', [
    (dict(num_heads=5), 'num_heads'),
    (dict(num_heads=32), 'even'),
    (dict(moe=dict(MOE, d_ff=8)), 'd_ff'),
    (dict(moe=dict(MOE, top_k=5)), 'top_k'),
    (dict(moe=dict(MOE, priority='score')), 'priority'),
    (dict(moe_every=0), 'moe_every'),
])
def test_invalid_args(kw, match):
  args = dict(num_layers=2, d_model=D, num_heads=H, d_ff=F)
  args.update(kw)
  with pytest.raises(ValueError, match=match):
    TransformerLM(**args)


def test_module_is_hashable_with_moe_mapping():
  assert hash(_model(moe=MOE)) == hash(_model(moe=dict(MOE)))


# 9. Parameter and FLOP accounting.
def test_count_params_matches_initialised_params(dense, moe):
  for model, variables in (dense, moe):
    actual = sum(x.size for x in jax.tree.leaves(variables['params']))
    assert count_params(model)['total'] == actual
  attn, norms, layers = 4 * D * D, 2 * D, 2
  dense_total = V * D + D + layers * (attn + norms + 2 * D * F)
  assert count_params(dense[0]) == dict(total=dense_total,
                                        active=dense_total, embedding=V * D)
  experts = layers * E * 2 * D * F
  router = layers * D * E
  moe_total = dense_total - layers * 2 * D * F + experts + router
  assert count_params(moe[0]) == dict(
      total=moe_total, active=moe_total - experts // 2, embedding=V * D)
  untied = count_params(_model(tie_embeddings=False))
  assert untied['total'] == dense_total + D * V
  assert untied['embedding'] == V * D


def test_flops_dense_equals_top1_moe_up_to_router():
  num_layers, t = 4, 16
  dense = _model(num_layers)
  expected = 3 * (2 * (num_layers * (4 * D * D + 2 * D * F) + V * D) +
                  4 * num_layers * t * D)
  assert flops_per_token(dense, t) == expected
  # The output projection counts once whether tied or not.
  assert flops_per_token(_model(num_layers, tie_embeddings=False),
                         t) == expected
  top1 = dict(MOE, top_k=1)
  for kw, num_moe in ((dict(), 4), (dict(moe_every=2), 2)):
    sparse = _model(num_layers, moe=top1, **kw)
    assert flops_per_token(sparse, t) - expected == 3 * 2 * D * E * num_moe
    assert count_params(sparse)['total'] > count_params(dense)['total']
  top2 = flops_per_token(_model(num_layers, moe=MOE), t)
  assert top2 - expected == 3 * (num_layers * (2 * 2 * D * F + 2 * D * E))


def test_summary_line():
  line = summary(_model(moe=MOE), L)
  assert line.startswith('params total ') and 'FLOPs/token' in line
  assert '2/2 MoE layers' in line
  assert flops_lib._human(2_700_000) == '2.7M'
