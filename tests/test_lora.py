"""LoRA adapters on the expert banks, shared experts and dense FFNs
(moejax.lora): zero at init, x . w + (alpha / r) (x . a) . b in every
dispatcher and router, merge_lora, option errors, sharding rules.

The 8-device expert-parallel check is tests/sharding/test_lora_sharded.py.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import moejax
from moejax import capacity as capacity_lib
from moejax import ffn_math
from moejax import lora
from moejax import sharding
from moejax.models.transformer import TransformerLM
from tests import reference
from tests.conftest import init_key

D, F, E, R = 8, 16, 4, 2
ALPHA = 3.0  # scale alpha / r = 1.5: neither 1, alpha, nor alpha * r


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


def _strip(tree):
  """`tree` without its adapter leaves (an independent copy of the rule)."""
  if not isinstance(tree, dict):
    return tree
  return {k: _strip(v) for k, v in tree.items()
          if not k.endswith(('_lora_a', '_lora_b'))}


def _random_params(model, *args, seed=1, scale=0.5):
  """Normal(0, scale) params of `model` (B included: non-zero adapters),
  drawn with numpy from the abstract tree (no init program to compile)."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), *args)['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype),
      abstract)


def _merge_by_hand(flat, scale):
  """numpy float64 w + scale * a . b for every kernel of a flat dict."""
  out = {}
  for name, w in flat.items():
    if name.endswith(('_lora_a', '_lora_b')):
      continue
    w = np.asarray(w, np.float64)
    if name + '_lora_a' in flat:
      a = np.asarray(flat[name + '_lora_a'], np.float64)
      b = np.asarray(flat[name + '_lora_b'], np.float64)
      w = w + scale * np.einsum('...ir,...ro->...io', a, b)
    out[name] = w
  return out


def _x(b=2, l=8, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, l, D))


# ------------------------------------------------------------- arithmetic


def test_gated_ffn_sends_a_through_the_kernels_matmul_and_b_through_plain():
  # One expert, D=2, F=1, r=1; relu. matmul_out doubles (like a psum over
  # 2 replicas), matmul_b does not. x = [1, 2]; wi = [[1], [1]] -> 3;
  # wi's adapter: (x . [[1], [0]]) . [[2]] = 1 * 2 = 2 -> h = relu(5) = 5.
  # wo = [[1, 0]]: 2 * (5 * [1, 0]) = [10, 0]; wo's adapter a = [[1]],
  # b = [[0, 3]]: matmul_out(5, a) = 10, then plain 10 * [0, 3] = [0, 30].
  x = jnp.array([[1., 2.]])
  wi = ffn_math.LoraKernel(jnp.array([[1.], [1.]]), jnp.array([[1.], [0.]]),
                           jnp.array([[2.]]))
  wo = ffn_math.LoraKernel(jnp.array([[1., 0.]]), jnp.array([[1.]]),
                           jnp.array([[0., 3.]]))
  y = ffn_math.gated_ffn(x, [wi], wo, jax.nn.relu, jnp.matmul,
                         lambda h, w: 2 * (h @ w), jnp.matmul)
  np.testing.assert_allclose(y, [[10., 30.]])
  # Plain arrays take the old path.
  y = ffn_math.gated_ffn(x, [wi.base], wo.base, jax.nn.relu, jnp.matmul,
                         jnp.matmul)
  np.testing.assert_allclose(y, [[3., 0.]])


# ------------------------------------------------------- init: the base FFN


def _lm(**lora_args):
  return TransformerLM(
      num_layers=2, d_model=D, num_heads=2, d_ff=F, vocab_size=32,
      activation='swiglu', moe_every=2, tie_embeddings=False,
      moe=dict(num_experts=E, top_k=2, num_shared_experts=1,
               capacity_factor=None, eval_capacity_factor=None),
      **lora_args)


def test_at_init_the_adapted_model_is_the_base_model():
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
  model = _lm(lora_rank=R, lora_alpha=ALPHA,
              lora_targets=('experts', 'shared', 'dense'))
  # jit: one init program (eager init compiles every draw: 3x slower).
  params = jax.jit(model.init)(init_key(3), tokens)['params']
  base_params = jax.jit(_lm().init)(init_key(3), tokens)['params']
  # The kernels' init does not depend on the adapters (created after them).
  jax.tree.map(np.testing.assert_array_equal, _strip(params), base_params)
  ffn = params['block_1']['ffn']
  for kernels in (params['block_0']['ffn'], ffn['experts'], ffn['shared']):
    for w in ('wi_0', 'wi_1', 'wo'):
      a, b = kernels[w + '_lora_a'], kernels[w + '_lora_b']
      assert a.shape == kernels[w].shape[:-1] + (R,)
      assert b.shape == kernels[w].shape[:-2] + (R, kernels[w].shape[-1])
      assert float(jnp.std(a)) > 0.1 and not jnp.any(b)  # B = 0, A random
  logits, _ = jax.jit(model.apply)({'params': params}, tokens)
  want, _ = jax.jit(_lm().apply)({'params': base_params}, tokens)
  np.testing.assert_array_equal(logits, want)


def test_at_init_only_b_gets_gradients():
  # d/da = 0 while b = 0; d/db != 0, so training moves the adapters.
  layer = moejax.MoeLayer(num_experts=E, d_ff=F, top_k=2, lora_rank=R,
                          lora_alpha=ALPHA)
  x = _x()
  params = jax.jit(layer.init)(init_key(1), x)['params']
  grads = jax.jit(jax.grad(
      lambda p: jnp.sum(layer.apply({'params': p}, x)[0] ** 2)))(
          params)['experts']
  for w in ('wi', 'wo'):
    assert not jnp.any(grads[w + '_lora_a'])
    assert float(jnp.max(jnp.abs(grads[w + '_lora_b']))) > 1e-3


def test_lora_rank_0_adds_no_params():
  layer = moejax.MoeLayer(num_experts=E, d_ff=F, num_shared_experts=1,
                          lora_targets=('experts', 'shared'))
  params = jax.eval_shape(layer.init, jax.random.key(0), _x())['params']
  assert set(params['experts']) == {'wi', 'wo'}
  assert set(params['shared']) == {'wi', 'wo'}
  assert lora.lora_param_count(params) == 0


def _adapted(params):
  """Paths ('block_1/ffn/experts', ...) of the modules holding adapters."""
  leaves = jax.tree_util.tree_leaves_with_path(lora.lora_mask(params))
  return {'/'.join(k.key for k in path[:-1]) for path, is_lora in leaves
          if is_lora}


@pytest.mark.parametrize('targets,expected', [
    (('experts',), {'block_1/ffn/experts'}),
    (('shared',), {'block_1/ffn/shared'}),
    (('dense', 'shared'), {'block_0/ffn', 'block_1/ffn/shared'}),
    ((), set()),
])
def test_lora_targets_choose_the_ffns(targets, expected):
  # Block 0 dense, block 1 MoE with a shared expert.
  model = _lm(lora_rank=R, lora_targets=targets)
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((2, 8), jnp.int32))['params']
  assert _adapted(params) == expected
  # Each adapted FFN: 3 kernels (swiglu), a and b: (D + F) * r scalars per
  # kernel, per expert in a bank.
  per_ffn = 3 * (D + F) * R
  assert lora.lora_param_count(params) == sum(
      per_ffn * (E if path.endswith('experts') else 1) for path in expected)
  # The MoeLayer alone: default targets adapt the routed experts only.
  layer = moejax.MoeLayer(num_experts=E, d_ff=F, num_shared_experts=1,
                          lora_rank=R)
  params = jax.eval_shape(layer.init, jax.random.key(0), _x())['params']
  assert _adapted(params) == {'experts'}


# ------------------------------------- trained adapters: merged-weight loop


def _check_layer_against_loop(layer, x, pad, expected_fn):
  params = _random_params(layer, x)
  params['router']['kernel'] = params['router']['kernel'] * 8.0  # no ties
  y, aux = layer.apply({'params': params}, x, pad)
  flat = dict(params['experts'], router=params['router']['kernel'])
  merged = _merge_by_hand(flat, ALPHA / R)
  want = expected_fn(merged, int(aux['capacity']))
  np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
  # The adapters matter: the base weights alone give another output.
  base = expected_fn({k: np.asarray(v, np.float64)
                      for k, v in _strip(flat).items()}, int(aux['capacity']))
  assert np.max(np.abs(base - want)) > 0.1


# gather / einsum drop (cf 0.5: C = ceil(.5 * 8 * 2 / 4) = 2 < 4 slots
# needed on average); ragged / per_token dropless.
@pytest.mark.parametrize('dispatcher,activation,cf', [
    ('gather', 'swiglu', 0.5), ('einsum', 'relu', 0.5),
    ('ragged', 'relu', None), ('per_token', 'swiglu', None)])
def test_adapted_layer_matches_loop_with_merged_weights(dispatcher,
                                                        activation, cf):
  layer = moejax.MoeLayer(
      num_experts=E, d_ff=F, top_k=2, capacity_factor=cf,
      eval_capacity_factor=cf, min_capacity=0, dispatcher=dispatcher,
      activation=activation, lora_rank=R, lora_alpha=ALPHA)
  x = _x()
  pad = jnp.zeros((2, 8), bool).at[1, 2:4].set(True)
  if cf is not None:  # the layer's C is the formula's
    assert capacity_lib.compute_capacity(8, E, 2, cf, 0) == 2
  _check_layer_against_loop(
      layer, x, pad, lambda p, c: reference.moe_layer(
          np.asarray(x), ~np.asarray(pad), p, 2, c, 'choice', activation))


@pytest.mark.parametrize('router', ['expert_choice', 'soft_moe'])
def test_other_routers_use_the_adapters(router):
  layer = moejax.MoeLayer(num_experts=E, d_ff=F, router=router,
                          capacity_factor=1.0, eval_capacity_factor=1.0,
                          min_capacity=1, slots_per_expert=2,
                          activation='gelu', lora_rank=R, lora_alpha=ALPHA)
  x = _x()
  pad = jnp.zeros((2, 8), bool).at[0, 7].set(True)
  valid = ~np.asarray(pad)
  if router == 'expert_choice':
    fn = lambda p, c: reference.expert_choice_layer(x, valid, p, c, 'gelu')
  else:
    fn = lambda p, c: reference.soft_moe_layer(x, valid, p, 'gelu')
  _check_layer_against_loop(layer, x, pad, fn)


# ------------------------------------------------------------ merge_lora


def test_merged_kernel_by_hand():
  # alpha 4, r 2: scale 2. w = [[1, 0], [0, 1]], a = [[1, 1], [2, 0]],
  # b = [[3, 4], [0, 1]]: a . b = [[3, 5], [6, 8]] -> w + 2 a . b =
  # [[7, 10], [12, 17]] (exact in bfloat16).
  w = jnp.eye(2, dtype=jnp.bfloat16)
  got = lora.merged_kernel(w, jnp.array([[1., 1.], [2., 0.]]),
                           jnp.array([[3., 4.], [0., 1.]]), 4.0)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32),
                                [[7, 10], [12, 17]])


def test_merge_lora_folds_and_drops_adapters():
  # Expert 1 of an [E=2, 1, 1] bank: 1 + (4 / 2) * ([1, 1] . [1, 2]) = 7.
  params = flax.core.FrozenDict({
      'experts': {'wo': jnp.ones((2, 1, 1)), 'wo_lora_a': jnp.ones((2, 1, 2)),
                  'wo_lora_b': jnp.array([[[0.], [0.]], [[1.], [2.]]])},
      'router': {'kernel': jnp.ones((1, 2))}})
  merged = lora.merge_lora(params, lora_alpha=4.0)
  assert isinstance(merged, flax.core.FrozenDict)
  assert set(merged['experts']) == {'wo'}
  np.testing.assert_array_equal(merged['experts']['wo'][:, 0, 0], [1., 7.])
  np.testing.assert_array_equal(merged['router']['kernel'], 1.)
  assert lora.lora_param_count(params) == 8
  mask = lora.lora_mask(params)
  assert mask['experts']['wo_lora_b'] and not mask['experts']['wo']
  orphan = {'ffn': {'wo_lora_a': jnp.ones((2, 1)), 'wo': jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match=r"ffn/wo_lora_a has no 'wo_lora_b'"):
    lora.merge_lora(orphan, 4.0)


def test_merged_model_equals_the_adapted_model():
  # Adapters on the dense block 0, block 1's experts and shared expert.
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
  model = _lm(lora_rank=R, lora_alpha=ALPHA,
              lora_targets=('experts', 'shared', 'dense'))
  params = _random_params(model, tokens, scale=0.3)
  logits, _ = model.apply({'params': params}, tokens)
  base = _lm()
  merged = lora.merge_lora(params, ALPHA)
  assert jax.tree.structure(merged) == jax.tree.structure(_strip(params))
  want, _ = base.apply({'params': merged}, tokens)
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  unadapted, _ = base.apply({'params': _strip(params)}, tokens)
  assert float(jnp.max(jnp.abs(unadapted - logits))) > 0.1


# ---------------------------------------------------------------- options


@pytest.mark.parametrize('kwargs,message', [
    (dict(lora_rank=-1), r'lora_rank must be an int >= 0.*-1'),
    (dict(lora_rank=2.0), r'lora_rank must be an int >= 0.*2\.0'),
    (dict(lora_rank=True), r'lora_rank must be an int >= 0.*True'),
    (dict(lora_alpha=0.0), r'lora_alpha must be a number > 0.*0\.0'),
    (dict(lora_alpha='16'), r'lora_alpha must be a number > 0'),
    (dict(lora_targets=('dense',)),
     r"lora_targets=.*'dense'.*allowed values: 'experts', 'shared'\."),
    (dict(lora_targets='experts'), r'lora_targets must be a tuple'),
])
def test_moe_layer_option_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    moejax.MoeLayer(num_experts=E, d_ff=F, **kwargs)


def test_model_option_errors():
  with pytest.raises(ValueError, match=r"'attn'; allowed values: 'experts', "
                     r"'shared', 'dense'\."):
    _lm(lora_rank=R, lora_targets=('experts', 'attn'))
  with pytest.raises(ValueError, match=r'lora_alpha must be a number > 0'):
    _lm(lora_rank=R, lora_alpha=-1.0)
  with pytest.raises(ValueError, match=r'moe may not set lora_rank'):
    TransformerLM(num_layers=1, d_model=D, num_heads=2, d_ff=F,
                  moe=dict(num_experts=E, lora_rank=R))


@pytest.mark.parametrize('module', [moejax.ExpertBank, moejax.DenseFfn])
def test_bank_option_errors(module):
  args = dict(num_experts=E) if module is moejax.ExpertBank else {}
  bank = module(d_ff=F, lora_rank=-2, **args)
  x = jnp.zeros((1, E, 2, D)) if args else jnp.zeros((2, D))
  with pytest.raises(ValueError, match=r'lora_rank must be an int >= 0'):
    jax.eval_shape(bank.init, jax.random.key(0), x)


# --------------------------------------------------------------- sharding


def test_partition_specs_of_the_adapters():
  # E=4 over expert=4, F=16 over model=2; r=4, so a rule that treated
  # `wi_lora_a` [E, D, r] as `wi` [E, D, F] would split r over 'model'.
  model = TransformerLM(num_layers=2, d_model=D, num_heads=2, d_ff=F,
                        moe=dict(num_experts=E, num_shared_experts=1),
                        moe_every=2, activation='relu', lora_rank=4,
                        lora_targets=('experts', 'shared', 'dense'))
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((2, 8), jnp.int32))['params']
  specs = sharding.tree_partition_specs(params, dict(data=1, expert=4,
                                                     model=2))
  experts = specs['block_1']['ffn']['experts']
  assert experts['wi'] == P('expert', None, 'model')  # unchanged
  assert experts['wi_lora_a'] == P('expert', None, None)  # [E, D, r]
  assert experts['wi_lora_b'] == P('expert', None, 'model')  # [E, r, F]
  assert experts['wo_lora_a'] == P('expert', 'model', None)  # [E, F, r]
  assert experts['wo_lora_b'] == P('expert', None, None)  # [E, r, D]
  for dense in (specs['block_0']['ffn'], specs['block_1']['ffn']['shared']):
    assert dense['wi_lora_a'] == P(None, None)  # [D, r]
    assert dense['wi_lora_b'] == P(None, 'model')  # [r, F]
    assert dense['wo_lora_a'] == P('model', None)  # [F, r]
    assert dense['wo_lora_b'] == P(None, None)  # [r, D]
  for w in ('wi_0', 'wi_1'):
    assert sharding.logical_axes(('experts', f'{w}_lora_a'), 3) == (
        'expert', 'embed', None)
    assert sharding.logical_axes(('shared', f'{w}_lora_b'), 2) == (None,
                                                                   'mlp')
