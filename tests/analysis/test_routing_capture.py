"""capture_routing on a tiny two-layer, all-MoE TransformerLM (E=4, K=2).

Each layer routes groups of S=12 tokens across sequences: B*L = 3*10 = 30
tokens -> 3 groups, the last with 6 padding positions, so the [G, S] ->
[B, L] mapping is exercised. Eval capacity: C = max(1, ceil(0.5 * 12 * 2 /
4)) = 3 slots per expert per group (training cf 4 would give C = S = 12 and
no drops). The router kernels are redrawn with std 0.3 so the logits are
O(1) and the choices are not near-ties. Independent references: the block's
ffn_norm output times router/kernel in float64 numpy, top-K by numpy sort,
and `moejax.routing.assign_slots` on the regrouped choices.

Two configs: 'plain' (params only) and 'renorm_bias' (renormalize=True and
a fixed, nonzero selection bias in the 'moe_state' collection).
"""

import functools

import jax
import numpy as np
import pytest

from moejax import routing
from moejax.analysis import capture_routing
from moejax.models import TransformerLM
from tests.conftest import init_key

B, L, V, D, E, K, S = 3, 10, 64, 32, 4, 2, 12
C = 3  # max(min_capacity=1, ceil(0.5 * S * K / E)): eval capacity
# 'position' groups: 2 whole sequences each, position-major; B = 3 is
# padded with a 4th (padding) sequence. C = ceil(0.5 * 20 * 2 / 4) = 5.
S_POS, C_POS = 2 * L, 5
LAYERS = ('block_0', 'block_1')
BIAS = np.array([0.06, -0.05, 0.0, 0.03], np.float32)
# Groups of S = 12 tokens in 'sequence' order span sequences (L = 10): a
# causal LM must opt in to that leak.
SEQUENCE = dict(group_size=S, allow_noncausal_routing=True)
CONFIGS = {'plain': SEQUENCE,
           'renorm_bias': dict(SEQUENCE, renormalize=True,
                               selection_bias=True),
           # K = 2 in choice-major order with a capacity: a 2nd choice's
           # slot sees later 1st choices, accepted here too.
           'position': dict(group_size=S_POS, group_order='position',
                            allow_noncausal_routing=True)}


def _model(**moe):
  return TransformerLM(
      num_layers=2, d_model=D, num_heads=2, d_ff=32, vocab_size=V,
      moe=dict(num_experts=E, top_k=K, capacity_factor=4.0,
               eval_capacity_factor=0.5, min_capacity=1,
               pad_to_group=True, **moe))


def _hand_groups(a, config):
  """[B, L, ...] -> ([G, S, ...], capacity), the layer's groups built by
  hand: 'sequence' cuts the flat tokens every S (padding the tail);
  'position' pads B to whole pairs of sequences and interleaves each pair
  position by position: (b0,t0), (b1,t0), (b0,t1), (b1,t1), ..."""
  if config.get('group_order') == 'position':
    a = np.concatenate([a, np.zeros_like(a[:1])])  # [4, L, ...]
    pairs = [np.stack([a[i], a[i + 1]], axis=1) for i in (0, 2)]
    return np.stack([p.reshape((S_POS,) + a.shape[2:]) for p in pairs]), C_POS
  flat = a.reshape((B * L,) + a.shape[2:])
  pad = -(B * L) % S  # 6 padding positions close the last group
  flat = np.concatenate([flat, np.zeros_like(flat[:pad])])
  return flat.reshape((-1, S) + a.shape[2:]), C


def _hand_ungroup(a, config):
  """Inverse of `_hand_groups` for [G, S, ...] -> [B, L, ...]."""
  if config.get('group_order') == 'position':
    seqs = a.reshape((2, L, 2) + a.shape[2:]).swapaxes(1, 2)
    return seqs.reshape((4, L) + a.shape[2:])[:B]
  return a.reshape((-1,) + a.shape[2:])[:B * L].reshape((B, L) + a.shape[2:])


def _padding_mask():
  mask = np.zeros((B, L), bool)
  mask[0, -3:] = True  # a padded tail
  mask[2, 4] = True  # and a padding token in the middle
  return mask


@pytest.fixture(scope='module', params=list(CONFIGS))
def case(request):
  """(config, model, variables, tokens, padding_mask, routes)."""
  config = CONFIGS[request.param]
  model = _model(**config)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, V, (B, L)).astype(np.int32)
  variables = jax.jit(model.init)(init_key(0), tokens)
  variables = jax.tree_util.tree_map(np.asarray, variables)
  for layer in LAYERS:
    router = variables['params'][layer]['ffn']['router']
    router['kernel'] = rng.normal(0, 0.3, (D, E)).astype(np.float32)
    if 'moe_state' in variables:
      variables['moe_state'][layer]['ffn']['router']['bias'] = BIAS
  mask = _padding_mask()
  routes = capture_routing(model, variables, tokens, mask)
  return config, model, variables, tokens, mask, routes


@functools.partial(jax.jit, static_argnums=0)
def _ffn_inputs(model, variables, tokens, mask):
  """{layer: [B, L, D]}: each block's ffn_norm output."""
  _, state = model.apply(
      variables, tokens, padding_mask=mask, deterministic=True,
      capture_intermediates=lambda m, name: m.name == 'ffn_norm',
      mutable=['intermediates'])
  inter = state['intermediates']
  return {layer: inter[layer]['ffn_norm']['__call__'][0] for layer in LAYERS}


def _probs(logits):
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def test_logits_are_the_routers_x_dot_w(case):
  _, model, variables, tokens, mask, routes = case
  assert list(routes) == list(LAYERS)
  inputs = _ffn_inputs(model, variables, tokens, mask)
  for layer in LAYERS:
    kernel = variables['params'][layer]['ffn']['router']['kernel']
    x = np.asarray(inputs[layer], np.float64)
    expected = x @ np.asarray(kernel, np.float64)  # [B, L, E]
    got = routes[layer].logits
    assert got.shape == (B, L, E) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  assert not np.allclose(routes['block_0'].logits, routes['block_1'].logits)
  if 'moe_state' not in variables:  # a bare param tree reads the same
    again = capture_routing(model, variables['params'], tokens, mask)
    np.testing.assert_array_equal(again['block_1'].logits,
                                  routes['block_1'].logits)


def test_choices_and_gates_follow_the_logits(case):
  config, _, _, _, _, routes = case
  bias = BIAS if config.get('selection_bias') else np.zeros(E, np.float32)
  for layer in LAYERS:
    r = routes[layer]
    probs = _probs(r.logits.astype(np.float64))  # [B, L, E]
    expected = np.argsort(-(probs + bias), axis=-1, kind='stable')[..., :K]
    assert r.expert_index.shape == (B, L, K)
    assert r.expert_index.dtype == np.int32
    np.testing.assert_array_equal(r.expert_index, expected)
    np.testing.assert_array_equal(r.top1, expected[..., 0])
    gate = np.take_along_axis(probs, expected, axis=-1)  # unbiased scores
    if config.get('renormalize'):
      gate = gate / gate.sum(-1, keepdims=True)
    assert r.gate.dtype == np.float32
    np.testing.assert_allclose(r.gate, gate, rtol=1e-5, atol=1e-6)
  if config.get('selection_bias'):  # the bias changed some choices
    plain = np.argsort(-_probs(routes['block_0'].logits), -1)[..., :K]
    assert (plain != routes['block_0'].expert_index).any()


def test_kept_matches_assign_slots_at_eval_capacity(case):
  config, _, _, _, mask, routes = case
  valid = ~mask
  request, capacity = _hand_groups(valid, config)  # [G, S]
  request = np.repeat(request[..., None], K, -1)  # [G, S, K]
  for layer in LAYERS:
    r = routes[layer]
    index, _ = _hand_groups(r.expert_index, config)  # [G, S, K]
    _, kept = routing.assign_slots(index, request, E, capacity)
    expected = _hand_ungroup(np.asarray(kept), config)
    assert r.kept.dtype == np.bool_
    np.testing.assert_array_equal(r.kept, expected)
    assert not r.kept[mask].any()  # padding is never kept
    assert 0 < r.kept[valid].sum() < valid.sum() * K  # capacity drops some
    # expert_load: share of valid (not necessarily kept) choices.
    counts = np.bincount(r.expert_index[valid].ravel(), minlength=E)
    np.testing.assert_allclose(r.expert_load, counts / counts.sum(),
                               atol=1e-6)


def test_params_alone_and_other_routers():
  dense = TransformerLM(num_layers=1, d_model=D, num_heads=2, d_ff=32,
                        vocab_size=V)
  tokens = np.zeros((1, 4), np.int32)
  assert capture_routing(dense, {}, tokens) == {}  # no compile
  expert_choice = TransformerLM(
      num_layers=1, d_model=D, num_heads=2, d_ff=32, vocab_size=V,
      moe=dict(num_experts=E, router='expert_choice',
               allow_noncausal_routing=True))
  params = jax.jit(expert_choice.init)(init_key(0), tokens)['params']
  with pytest.raises(ValueError, match="router='expert_choice'"):
    capture_routing(expert_choice, params, tokens)

