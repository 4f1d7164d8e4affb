"""The modern routers: expert choice, DeepSeek-style token choice (sigmoid,
selection bias, group-limited selection, loss-free balancing), Soft MoE,
fine-grained and shared experts, and the ragged dispatcher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import expert_choice
from moejax import losses
from moejax import routing
from moejax import soft_moe
from tests import reference
from tests.conftest import init_key

D, F = 8, 16


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


def _x(b=2, l=6, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, l, D))


def _flat_params(variables):
  p = variables['params']
  flat = {'router': p['router']['kernel']}
  flat.update(p['experts'])
  return flat


# ----------------------------------------------------------- expert choice

def test_expert_choice_issue_example():
  probs = jnp.array([[[.4, 0, .2], [.5, .1, .4], [.3, .2, .6]]])
  dec = expert_choice.route_expert_choice(probs, capacity=2)
  kept = np.asarray(dec.kept[0])  # [S=3, E=3]
  # Expert 0: .5 (token 1) > .4 (token 0) > .3 -> {1, 0}; expert 1:
  # .2 (2) > .1 (1) > 0 -> {2, 1}; expert 2: .6 (2) > .4 (1) > .2 -> {2, 1}.
  assert {t for t in range(3) if kept[t, 0]} == {0, 1}
  assert {t for t in range(3) if kept[t, 1]} == {1, 2}
  assert {t for t in range(3) if kept[t, 2]} == {1, 2}
  # Token 1 is every expert's first or second pick: slot (rank) 0, 1, 1.
  np.testing.assert_array_equal(dec.slot[0, 1], [0, 1, 1])
  per_token = kept.sum(-1)  # [1, 3, 2]
  assert per_token.min() == 1 and per_token.max() == 3
  assert (per_token >= 3).mean() == pytest.approx(1 / 3)
  cov = expert_choice.coverage_metrics(dec, jnp.ones((1, 3), bool))
  assert float(cov['tokens_by_0_experts']) == 0
  assert float(cov['tokens_by_1_expert']) == pytest.approx(1 / 3)
  assert float(cov['tokens_by_2plus_experts']) == pytest.approx(2 / 3)
  assert float(cov['min_experts_per_token']) == 1
  assert float(cov['max_experts_per_token']) == 3
  assert float(cov['experts_per_token']) == pytest.approx(2)  # 6 picks / 3
  # Gates are the scores themselves.
  np.testing.assert_allclose(dec.combine_weight[0, 1], [.5, .1, .4])


def test_expert_choice_never_takes_padding():
  probs = jnp.array([[[.9, .1], [.8, .2], [.1, .9]]])
  valid = jnp.array([[False, True, True]])
  dec = expert_choice.route_expert_choice(probs, capacity=2, valid=valid)
  assert not dec.kept[0, 0].any()
  # Both experts fall back to the two valid tokens.
  assert dec.kept[0, 1:].all()


@pytest.mark.parametrize('cf', [0.5, 2.0])
def test_expert_choice_layer_matches_loop_reference(cf):
  x = _x()
  pad = jnp.zeros((2, 6), bool).at[1, 4:].set(True)
  layer = moejax.MoeLayer(num_experts=3, d_ff=F, router='expert_choice',
                          capacity_factor=cf, min_capacity=1)
  variables = layer.init(init_key(0), x)
  y, aux = layer.apply(variables, x, pad, deterministic=False)
  # C = ceil(cf * S / E) = ceil(cf * 6 / 3): 1 for cf .5, 4 for cf 2.
  capacity = int(np.ceil(cf * 6 / 3))
  assert float(aux['capacity']) == capacity
  want = reference.expert_choice_layer(x, ~pad, _flat_params(variables),
                                       capacity, 'relu')
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert float(aux['aux_loss']) == 0.0
  load = np.asarray(aux['expert_load'])
  np.testing.assert_allclose(load.sum(), 1.0, rtol=1e-6)


# ------------------------------------------------------ DeepSeek-style top-K

def test_bias_changes_choice_never_gate():
  scores = jnp.array([[[.5, .3, .2]]])
  idx, gate = routing.select_top_k(scores, 1)
  assert int(idx[0, 0, 0]) == 0 and float(gate[0, 0, 0]) == pytest.approx(.5)
  # Bias +.3 on expert 1: selection .5, .6, .2 picks expert 1, whose gate
  # stays its unbiased score .3.
  idx, gate = routing.select_top_k(scores, 1, jnp.array([0, .3, 0]))
  assert int(idx[0, 0, 0]) == 1 and float(gate[0, 0, 0]) == pytest.approx(.3)
  # K=2 with bias .4 on expert 2: selection .5, .3, .6 -> experts 2, 0 with
  # gates .2, .5.
  idx, gate = routing.select_top_k(scores, 2, jnp.array([0, 0, .4]))
  np.testing.assert_array_equal(idx[0, 0], [2, 0])
  np.testing.assert_allclose(gate[0, 0], [.2, .5])


def test_group_limited_selection_hand_case():
  # E=6 in 3 groups of 2. Group scores (sum of the top-2): .5+0 = .5,
  # .3+.3 = .6, .4+.1 = .5. topk_groups=1 keeps group 1 (experts 2, 3)
  # although expert 0 has the largest single score.
  scores = jnp.array([[[.5, 0, .3, .3, .4, .1]]])
  idx, gate = routing.select_top_k(scores, 2, num_groups=3, topk_groups=1)
  np.testing.assert_array_equal(idx[0, 0], [2, 3])
  np.testing.assert_allclose(gate[0, 0], [.3, .3])
  mask = routing.group_limited_mask(scores, 3, 1)
  np.testing.assert_array_equal(mask[0, 0], [0, 0, 1, 1, 0, 0])
  # topk_groups=2 keeps groups 1 and 0 (.5 ties .5: lower index wins):
  # top-2 over experts {0, 1, 2, 3} -> 0 (.5), 2 (.3; ties 3 by index).
  idx, _ = routing.select_top_k(scores, 2, num_groups=3, topk_groups=2)
  np.testing.assert_array_equal(idx[0, 0], [0, 2])
  # Without groups: 0 (.5), 4 (.4).
  idx, _ = routing.select_top_k(scores, 2)
  np.testing.assert_array_equal(idx[0, 0], [0, 4])


def test_deepseek_routing_matches_loop_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 8)).astype(np.float32)
  bias = rng.normal(scale=.3, size=8).astype(np.float32)
  scores = routing.scores_from_logits(jnp.asarray(logits), 'sigmoid')
  dec = routing.route_top_k(scores, 2, capacity=10, bias=jnp.asarray(bias),
                            renormalize=True, scale=2.5, num_groups=4,
                            topk_groups=2)
  for g in range(2):
    for s in range(5):
      want = reference.deepseek_route(logits[g, s], 2, bias, 4, 2, 2.5)
      np.testing.assert_array_equal(dec.expert_index[g, s],
                                    [e for e, _ in want])
      np.testing.assert_allclose(dec.gate[g, s], [w for _, w in want],
                                 rtol=1e-5)


def test_aux_loss_is_deepseek_sequence_balance_loss():
  # DeepSeek-V3: L = sum_i f_i P_i, f_i = E / (K T) * #{t: i in topK(t)},
  # P_i = mean_t s'_{i,t}, s' = sigmoid scores normalised over E; per
  # sequence, averaged. With one group per sequence that is aux_loss.
  x = _x(b=2, l=6)
  layer = moejax.MoeLayer(num_experts=4, d_ff=F, top_k=2, score_fn='sigmoid',
                          capacity_factor=None, renormalize=True)
  variables = layer.init(init_key(1), x)
  _, aux = layer.apply(variables, x)
  kernel = np.asarray(variables['params']['router']['kernel'], np.float64)
  per_seq = []
  for b in range(2):
    scores = 1 / (1 + np.exp(-(np.asarray(x[b], np.float64) @ kernel)))
    top = np.argsort(-scores, axis=-1, kind='stable')[:, :2]  # [T, K]
    f = 4 / (2 * 6) * np.array([(top == i).sum() for i in range(4)])
    p = (scores / scores.sum(-1, keepdims=True)).mean(0)
    per_seq.append(np.sum(f * p))
  np.testing.assert_allclose(float(aux['aux_loss']), np.mean(per_seq),
                             rtol=1e-5)


def _skewed_stream(steps, g, s, e, seed=0):
  rng = np.random.default_rng(seed)
  skew = np.linspace(0, 3, e)  # expert e's logits shifted up by 3e/(E-1)
  return jnp.asarray(rng.normal(size=(steps, g, s, e)) + skew, jnp.float32)


def test_loss_free_balancing_removes_skew():
  e, k = 8, 2
  stream = _skewed_stream(300, 16, 128, e)

  @jax.jit
  def run(stream):
    def step(bias, logits):
      scores = jax.nn.sigmoid(logits)
      dec = routing.route_top_k(scores, k, capacity=128, bias=bias)
      counts = losses.choice_counts(dec, jnp.ones(logits.shape[:2], bool))
      counts = counts.sum(0)  # [E]
      violation = e * counts.max() / counts.sum() - 1
      return routing.loss_free_bias_update(bias, counts, 0.01), violation
    return jax.lax.scan(step, jnp.zeros((e,)), stream)

  bias, violation = run(stream)
  start, end = float(violation[0]), float(violation[-50:].mean())
  # The skew sends most choices to the last experts: violation ~ 2 (the
  # top two of 8 experts take almost all 2 * 2048 choices: 8 * 1/2 - 1 = 3
  # at most). Balanced, a batch's violation is only sampling noise plus the
  # +-gamma oscillation of the bias (~0.1 with 512 choices per expert).
  assert start > 1.0
  assert end < start / 10, (start, end)
  # The bias ordering undoes the skew: most-favoured expert, lowest bias.
  assert float(bias[-1]) < float(bias[0])


def test_layer_updates_bias_only_when_training_and_mutable():
  x = _x()
  layer = moejax.MoeLayer(num_experts=4, d_ff=F, top_k=2, score_fn='sigmoid',
                          renormalize=True, bias_update_rate=0.1,
                          capacity_factor=None)
  variables = layer.init(init_key(2), x)
  assert 'bias' not in str(jax.tree_util.tree_structure(variables['params']))
  np.testing.assert_array_equal(variables['moe_state']['router']['bias'],
                                np.zeros(4))
  (_, aux), new = layer.apply(variables, x, deterministic=False,
                              mutable=['moe_state'])
  load = np.asarray(aux['expert_load'])  # counts / total: same signs
  want = 0.1 * np.sign(load.mean() - load)
  np.testing.assert_allclose(new['moe_state']['router']['bias'], want,
                             atol=1e-7)
  assert np.abs(want).sum() > 0  # the batch was not perfectly balanced
  # Eval, or a collection that is not mutable: the bias is only read.
  _, same = layer.apply(variables, x, deterministic=True,
                        mutable=['moe_state'])
  np.testing.assert_array_equal(same['moe_state']['router']['bias'],
                                np.zeros(4))
  layer.apply(variables, x, deterministic=False)  # no error, no update


def test_bias_enters_selection_in_the_layer():
  x = _x()
  layer = moejax.MoeLayer(num_experts=4, d_ff=F, score_fn='sigmoid',
                          bias_update_rate=0.1, capacity_factor=None)
  variables = layer.init(init_key(3), x)
  big = {'router': {'bias': jnp.array([0., 0., 10., 0.])}}
  _, aux = layer.apply({**variables, 'moe_state': big}, x)
  np.testing.assert_allclose(aux['expert_load'], [0, 0, 1, 0])


# --------------------------------------------------------------- Soft MoE

def test_soft_moe_weights_sum_to_one():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 3, 2)), jnp.float32)
  valid = jnp.array([[True] * 5, [True, True, True, False, False]])
  dispatch, combine = soft_moe.soft_weights(logits, valid)
  # Every slot: dispatch sums to 1 over the group's valid tokens.
  np.testing.assert_allclose(dispatch.sum(1), np.ones((2, 3, 2)), rtol=1e-6)
  assert float(jnp.abs(dispatch[1, 3:]).max()) == 0
  # Every valid token: combine sums to 1 over the E*C = 6 slots.
  sums = combine.sum((2, 3))
  np.testing.assert_allclose(sums[valid], 1.0, rtol=1e-6)
  assert float(jnp.abs(combine[1, 3:]).max()) == 0


def test_soft_moe_tiny_hand_case():
  # S=2 tokens x = [1], [3]; one expert, one slot, phi = ln 2, identity-like
  # relu expert (wi = wo = [[1]]). Logits ln 2, 3 ln 2 -> dispatch weights
  # 2/10, 8/10 -> slot input .2*1 + .8*3 = 2.6 -> expert relu(2.6) = 2.6;
  # one slot, so combine weight 1 for each token: y = 2.6, 2.6.
  x = jnp.array([[[1.], [3.]]])
  layer = moejax.MoeLayer(num_experts=1, d_ff=1, router='soft_moe')
  params = {'router': {'kernel': jnp.full((1, 1, 1), np.log(2.))},
            'experts': {'wi': jnp.ones((1, 1, 1)), 'wo': jnp.ones((1, 1, 1))}}
  y, aux = layer.apply({'params': params}, x)
  np.testing.assert_allclose(y[0, :, 0], [2.6, 2.6], rtol=1e-6)
  assert float(aux['capacity']) == 1


def test_soft_moe_layer_matches_loop_reference():
  x = _x()
  pad = jnp.zeros((2, 6), bool).at[0, 5].set(True)
  layer = moejax.MoeLayer(num_experts=3, d_ff=F, router='soft_moe',
                          slots_per_expert=2, activation='swiglu')
  variables = layer.init(init_key(4), x)
  y, aux = layer.apply(variables, x, pad)
  assert y.shape == x.shape
  assert variables['params']['router']['kernel'].shape == (D, 3, 2)
  want = reference.soft_moe_layer(x, ~pad, _flat_params(variables), 'swiglu')
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert float(aux['drop_fraction']) == 0 and float(aux['aux_loss']) == 0


# ------------------------------------------------- ragged, fine-grained, shared

def _loss_and_grads(layer, variables, x, pad=None):
  def loss(params, x):
    y, _ = layer.apply({'params': params}, x, pad, deterministic=True)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape)))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(  # one compile
      variables['params'], x)


@pytest.mark.parametrize('cf', [None, 0.5])
@pytest.mark.parametrize('name', ['ragged', 'per_token'])
def test_buffer_free_dispatchers_equal_gather(cf, name):
  # With drops (cf 0.5) and padding (the last 3 tokens of sequence 0).
  x = _x()
  pad = jnp.zeros(x.shape[:2], bool).at[0, -3:].set(True)
  kw = dict(num_experts=4, d_ff=F, top_k=2, capacity_factor=cf,
            eval_capacity_factor=cf, min_capacity=1, activation='geglu')
  gather = moejax.MoeLayer(**kw, dispatcher='gather')
  ragged = moejax.MoeLayer(**kw, dispatcher=name)
  variables = gather.init(init_key(5), x)
  # Same param tree and init, whichever dispatcher.
  other = ragged.init(init_key(5), x)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(other)):
    np.testing.assert_array_equal(a, b)
  (lg, (pg, xg)) = _loss_and_grads(gather, variables, x, pad)
  (lr, (pr, xr)) = _loss_and_grads(ragged, variables, x, pad)
  np.testing.assert_allclose(lr, lg, rtol=1e-5)
  np.testing.assert_allclose(xr, xg, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(pr), jax.tree.leaves(pg)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  _, aux = gather.apply(variables, x)
  assert (float(aux['drop_fraction']) > 0) == (cf is not None)


def test_fine_grained_experts_shapes_and_capacity():
  x = _x()
  layer = moejax.MoeLayer(num_experts=2, d_ff=F, top_k=1, granularity=4,
                          capacity_factor=1.0, eval_capacity_factor=1.0,
                          min_capacity=1)
  variables = layer.init(init_key(6), x)
  p = variables['params']
  assert p['experts']['wi'].shape == (8, D, F // 4)  # m*E experts of F/m
  assert p['router']['kernel'].shape == (D, 8)
  _, aux = layer.apply(variables, x)
  # C = ceil(cf * S * mK / (mE)) = ceil(1 * 6 * 4 / 8) = 3.
  assert float(aux['capacity']) == 3
  # The same as a plain layer with 8 experts of width F/4, top-4.
  plain = moejax.MoeLayer(num_experts=8, d_ff=F // 4, top_k=4,
                          capacity_factor=1.0, eval_capacity_factor=1.0,
                          min_capacity=1)
  np.testing.assert_allclose(layer.apply(variables, x)[0],
                             plain.apply(variables, x)[0], rtol=1e-6)


@pytest.mark.parametrize('gate', [False, True])
def test_shared_experts_add_a_dense_ffn(gate):
  x = _x()
  pad = jnp.zeros((2, 6), bool).at[1, 0].set(True)
  kw = dict(num_experts=4, d_ff=F, activation='gelu')
  layer = moejax.MoeLayer(**kw, num_shared_experts=2, shared_gate=gate)
  variables = layer.init(init_key(7), x)
  p = variables['params']
  assert p['shared']['wi'].shape == (D, 2 * F)
  routed, _ = moejax.MoeLayer(**kw).apply(
      {'params': {'router': p['router'], 'experts': p['experts']}}, x, pad)
  shared = moejax.DenseFfn(2 * F, 'gelu').apply({'params': p['shared']}, x)
  if gate:
    shared = shared * jax.nn.sigmoid(x @ p['shared_gate'])
  y, _ = layer.apply(variables, x, pad)
  want = routed + jnp.where(pad[..., None], 0, shared)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(y[1, 0]).max()) == 0  # padding stays zero


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize('kwargs,name', [
    (dict(router='switch'), 'router'),
    (dict(router='expert_choice', top_k=2), 'top_k'),
    (dict(router='expert_choice', bias_update_rate=.01), 'bias_update_rate'),
    (dict(router='soft_moe', priority='token'), 'priority'),
    (dict(router='soft_moe', dispatcher='ragged'), 'ragged'),
    (dict(router='expert_choice', causal=True), 'expert_choice'),
    (dict(router='soft_moe', causal=True), 'soft_moe'),
    (dict(granularity=3), 'granularity'),
    (dict(num_groups=3), 'num_groups'),
    (dict(num_groups=2, topk_groups=3), 'topk_groups'),
    (dict(top_k=3, num_groups=4, topk_groups=1), 'topk_groups'),
    (dict(bias_update_rate=-1.0), 'bias_update_rate'),
    (dict(router='soft_moe', slots_per_expert=0), 'slots_per_expert'),
    (dict(num_shared_experts=-1), 'num_shared_experts'),
    (dict(dispatcher='sorted'), 'dispatcher'),
])
def test_bad_router_arguments_raise(kwargs, name):
  with pytest.raises(ValueError, match=name) as info:
    moejax.MoeLayer(num_experts=4, d_ff=F, **kwargs)
  message = str(info.value)
  assert 'allowed' in message or 'must' in message or 'leave it' in message


def test_noncausal_router_allowed_when_asked():
  layer = moejax.MoeLayer(num_experts=4, d_ff=F, router='expert_choice',
                          causal=True, allow_noncausal_routing=True)
  assert layer.router == 'expert_choice'


def test_top_k_indices_equals_lax_top_k_with_ties():
  rng = np.random.default_rng(0)
  # Values from {0, .25, .5, .75}: many ties, which both break to the lower
  # index.
  x = jnp.asarray(rng.integers(0, 4, size=(3, 5, 8)) / 4, jnp.float32)
  for k in (1, 2, 3, 8):
    np.testing.assert_array_equal(routing.top_k_indices(x, k),
                                  jax.lax.top_k(x, k)[1])
