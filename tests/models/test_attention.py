"""Attention options and the routing options the HF families need, against
independent computations (the HF parity tests in tests/interop check them
against transformers itself)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing
from moejax.models import TransformerLM
from moejax.models.attention import apply_rope


@pytest.fixture(autouse=True)
def _exact():
  with jax.default_matmul_precision('highest'):
    yield


def _lm(**kw):
  return TransformerLM(num_layers=1, d_model=16, num_heads=4, d_ff=32,
                       vocab_size=32, **kw)


TOKENS = jnp.asarray(np.arange(12).reshape(2, 6) * 7 % 32, jnp.int32)


def test_grouped_query_attention_equals_mha_with_shared_kv_heads():
  # KV head j serves query heads 2j and 2j+1: an MHA model whose key/value
  # heads are those copies computes the same logits.
  gqa = _lm(num_kv_heads=2)
  variables = gqa.init(jax.random.key(0), TOKENS)
  attn = dict(variables['params']['block_0']['attn'])
  assert attn['key'].shape == (16, 2, 4)
  params = variables["params"]
  mha_attn = dict(attn, key=jnp.repeat(attn['key'], 2, axis=1),
                  value=jnp.repeat(attn['value'], 2, axis=1))
  params = {**params, 'block_0': {**params['block_0'], 'attn': mha_attn}}
  expected, _ = _lm().apply({'params': params}, TOKENS)
  got, _ = gqa.apply(variables, TOKENS)
  np.testing.assert_allclose(got, expected, atol=1e-6)
  # Not vacuous: other KV heads for query heads 1 and 3 change the result.
  swapped = dict(mha_attn, key=mha_attn['key'][:, ::-1])
  params2 = {**params, 'block_0': {**params['block_0'], 'attn': swapped}}
  other, _ = _lm().apply({'params': params2}, TOKENS)
  assert np.abs(np.asarray(other) - np.asarray(expected)).max() > 1e-3


def test_interleaved_rope_is_rotate_half_on_deinterleaved_features():
  # Pairing (2j, 2j+1) == rotate-half pairing (j, j + Dh/2) after moving the
  # even features first and the odd ones second.
  x = jax.random.normal(jax.random.key(1), (1, 5, 2, 8))
  perm = np.r_[0:8:2, 1:8:2]
  np.testing.assert_allclose(apply_rope(x, jnp.arange(5), interleave=True),
                             apply_rope(x[..., perm], jnp.arange(5)),
                             atol=1e-6)
  # Position 0 is the identity (up to the reordering).
  np.testing.assert_allclose(apply_rope(x, jnp.zeros(5), interleave=True),
                             x[..., perm], atol=1e-7)


def test_qk_norm_head_normalises_each_head_before_rope():
  model = _lm(qk_norm='head', head_dim=6, attn_bias=True)
  variables = model.init(jax.random.key(0), TOKENS)
  attn = variables['params']['block_0']['attn']
  assert attn['query'].shape == (16, 4, 6) and attn['out'].shape == (4, 6, 16)
  assert attn['query_norm']['scale'].shape == (6,)
  assert attn['query_bias'].shape == (4, 6)
  full = _lm(qk_norm='full', num_kv_heads=2)
  fv = full.init(jax.random.key(0), TOKENS)['params']['block_0']['attn']
  assert fv['query_norm']['scale'].shape == (16,)
  assert fv['key_norm']['scale'].shape == (8,)


@pytest.mark.parametrize('kwargs,needle', [
    (dict(num_kv_heads=3), 'num_kv_heads=3 must divide num_heads=4'),
    (dict(qk_norm='rms'), "qk_norm='rms' is not supported"),
    (dict(attention='mla'), "needs mla['kv_lora_rank']"),
    (dict(mla={'kv_lora_rank': 4}), "mla is set but attention='mha'"),
    (dict(dense_layers=(3,)), 'dense_layers holds 3'),
])
def test_bad_attention_options_name_the_option(kwargs, needle):
  with pytest.raises(ValueError, match=needle.replace('[', r'\[').replace(
      ']', r'\]').replace('(', r'\(')):
    _lm(**kwargs)


def test_dense_layers_and_dense_width():
  model = TransformerLM(num_layers=4, d_model=16, num_heads=2, d_ff=8,
                        dense_d_ff=24, dense_layers=(2,),
                        moe=dict(num_experts=2))
  assert model.moe_layers == (0, 1, 3)
  params = model.init(jax.random.key(0), TOKENS)['params']
  assert params['block_2']['ffn']['wi'].shape == (16, 24)  # dense_d_ff
  assert params['block_1']['ffn']['experts']['wi'].shape == (2, 16, 8)


def test_group_score_max_picks_another_group_than_top2_sum():
  # E=4 in 2 groups, 1 kept. selection [.1, .45, .4, .3]:
  #   top2_sum: group 0 = .1 + .45 = .55, group 1 = .4 + .3 = .7 -> group 1
  #   max:      group 0 = .45,            group 1 = .4       -> group 0
  sel = jnp.asarray([[[.1, .45, .4, .3]]])
  np.testing.assert_array_equal(
      routing.group_limited_mask(sel, 2, 1, 'top2_sum')[0, 0],
      [False, False, True, True])
  np.testing.assert_array_equal(
      routing.group_limited_mask(sel, 2, 1, 'max')[0, 0],
      [True, True, False, False])


def test_fixed_selection_bias_selects_but_never_updates():
  router = routing.Router(num_experts=3, top_k=1, score_fn='sigmoid',
                          selection_bias=True)
  x = jnp.ones((1, 2, 4))
  variables = router.init(jax.random.key(0), x, 4)
  kernel = jnp.zeros((4, 3)).at[:, 0].set(0.1)  # expert 0 scores highest
  bias = jnp.asarray([0.0, 1.0, 0.0])  # ... but the bias picks expert 1
  variables = {'params': {'kernel': kernel}, 'moe_state': {'bias': bias}}
  (decision, _), state = router.apply(variables, x, 4, deterministic=False,
                                      mutable=['moe_state'])
  np.testing.assert_array_equal(decision.expert_index[..., 0], [[1, 1]])
  np.testing.assert_allclose(decision.gate[..., 0], 0.5)  # sigmoid(0)
  np.testing.assert_array_equal(state['moe_state']['bias'], bias)
