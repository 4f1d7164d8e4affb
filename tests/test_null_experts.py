"""Null experts (MoeLayer num_null_experts, AdaMoE): a token routed only to
null experts gets exactly 0; the loss and metric accounting by hand; a
naive loop reference with capacity and padding; N = 0 is today's layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import capacity as capacity_lib
from moejax import routing
from moejax.analysis import routing_capture
from moejax.interop import hf_config
from moejax.models import TransformerLM
from tests import reference
from tests.conftest import init_key

D, F = 4, 8
DISPATCHERS = ('gather', 'einsum', 'ragged', 'per_token', 'blocked')


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


def naive_null_layer(x, valid, params, e, k, capacity, priority,
                     renormalize=False):
  """x [G, S, D] -> y by loops: softmax over E + N, top-K (ties to the
  lower index); a choice of expert >= E (null) requests nothing and adds
  nothing; real requests claim slots choice-major ('choice') or token-major
  ('token'); with renormalize the real choices' gates sum to 1."""
  x = np.asarray(x, np.float64)
  params = {n: np.asarray(v, np.float64) for n, v in params.items()}
  y = np.zeros_like(x)
  for g in range(x.shape[0]):
    logits = x[g] @ params['router']
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    s = probs.shape[0]
    choices = [list(np.argsort(-probs[t], kind='stable')[:k])
               for t in range(s)]
    if priority == 'token':
      order = [(t, j) for t in range(s) for j in range(k)]
    else:
      order = [(t, j) for j in range(k) for t in range(s)]
    used = [0] * e
    for t, j in order:
      expert = choices[t][j]
      if not valid[g][t] or expert >= e:
        continue  # padding or a null expert: no slot, no output
      if used[expert] < capacity:
        gate = probs[t, expert]
        if renormalize:
          gate /= sum(probs[t, c] for c in choices[t] if c < e)
        y[g, t] += gate * reference.ffn(x[g, t], params, expert, 'relu')
      used[expert] += 1
  return y


def _layer(**kw):
  return moejax.MoeLayer(**{**dict(num_experts=2, d_ff=F, top_k=2,
                                   num_null_experts=2, min_capacity=0), **kw})


def _eye(s):
  """One group of s one-hot tokens [1, s, D]: token t's logits = kernel[t]."""
  return jnp.eye(D)[:s][None]


@pytest.mark.parametrize('dispatcher', DISPATCHERS)
def test_token_routed_only_to_null_experts_gets_exactly_zero(dispatcher):
  layer = _layer(dispatcher=dispatcher, renormalize=True)
  x = _eye(2) * 3.0
  variables = layer.init(init_key(0), x)
  # Token 0's logits (0, 0, 10, 10) / 3: top-2 = the null experts 2, 3.
  # Token 1's (10, 9, 0, 0) / 3: the real experts 0, 1.
  kernel = jnp.zeros((D, 4)).at[0].set(jnp.array([0., 0., 10., 10.]) / 3)
  kernel = kernel.at[1].set(jnp.array([10., 9., 0., 0.]) / 3)
  variables['params']['router']['kernel'] = kernel
  y, aux = layer.apply(variables, x)
  np.testing.assert_array_equal(y[0, 0], 0.0)  # exactly zero
  assert np.all(np.asarray(y[0, 1]) != 0.0)
  params = {'router': kernel, **variables['params']['experts']}
  c = capacity_lib.compute_capacity(2, 2, 2, 2.0, 0)  # eval cf 2: C = 4
  expected = naive_null_layer(x, np.ones((1, 2), bool), params, 2, 2, c,
                              'choice', renormalize=True)
  np.testing.assert_allclose(y, expected, rtol=2e-5, atol=2e-5)
  # Choices 2 of 4 null; real experts per token (0 + 2) / 2 = 1; token 0
  # requested nothing, so it is not "fully dropped".
  np.testing.assert_allclose(aux['null_fraction'], 0.5)
  np.testing.assert_allclose(aux['active_experts'], 1.0)
  np.testing.assert_allclose(aux['kept_experts'], 1.0)
  assert float(aux['fully_dropped_fraction']) == 0.0


def test_loss_and_metrics_hand_case():
  # E = 2 real + N = 2 null experts, K = 1, four one-hot tokens whose
  # logits are log-probabilities, so the router's softmax gives exactly:
  #   t0 (.7, .1, .1, .1) -> expert 0    t1 (.1, .1, .6, .2) -> null 2
  #   t2 (.1, .1, .2, .6) -> null 3      t3 (.1, .1, .2, .6) -> null 3
  # Balance loss over all E + N = 4 experts (AdaMoE): f = counts / 4 =
  # (.25, 0, .25, .5); P = mean probs = (1.0, .4, 1.1, 1.5) / 4 = (.25, .1,
  # .275, .375); loss = 4 * (.25 * .25 + 0 + .25 * .275 + .5 * .375)
  # = 4 * .31875 = 1.275.
  probs = jnp.array([[.7, .1, .1, .1], [.1, .1, .6, .2], [.1, .1, .2, .6],
                     [.1, .1, .2, .6]])
  layer = _layer(top_k=1, num_null_experts=2)
  x = _eye(4)
  variables = layer.init(init_key(0), x)
  variables['params']['router']['kernel'] = jnp.log(probs)
  _, aux = layer.apply(variables, x)
  np.testing.assert_allclose(aux['aux_loss'], 1.275, rtol=1e-5)
  # Null choices 3 / 4; real experts per token 1 / 4; expert_load over the
  # E = 2 real experts' choices: (1, 0); max_violation 2 * 1 - 1 = 1.
  np.testing.assert_allclose(aux['null_fraction'], 0.75)
  np.testing.assert_allclose(aux['active_experts'], 0.25)
  np.testing.assert_allclose(aux['expert_load'], [1.0, 0.0])
  np.testing.assert_allclose(aux['max_violation'], 1.0)
  np.testing.assert_allclose(aux['top1_prob'], (.7 + .6 + .6 + .6) / 4,
                             rtol=1e-5)


def test_capacity_counts_only_real_requests():
  # K = 2, C = 1 (training cf 0.5: ceil(0.5 * 4 * 2 / 2) = 2; min 0 ->
  # use cf 0.25: ceil(0.25 * 4 * 2 / 2) = 1). Tokens 0..2 choose (null 2,
  # expert 0); token 3 (expert 0, expert 1). Choice-major: first choices
  # t0, t1, t2 are null (no slot), t3's expert 0 takes slot 0; second
  # choices: t0's expert 0 finds slot 1 >= C: dropped, ... t3's expert 1
  # takes slot 0 of expert 1. Had null choices claimed slots, nothing real
  # would survive.
  layer = _layer(capacity_factor=0.25, eval_capacity_factor=0.25)
  probs = jnp.array([[.3, .05, .6, .05]] * 3 + [[.6, .3, .05, .05]])
  x = _eye(4)
  variables = layer.init(init_key(0), x)
  variables['params']['router']['kernel'] = jnp.log(probs)
  y, aux = layer.apply(variables, x)
  np.testing.assert_allclose(aux['capacity'], 1.0)
  np.testing.assert_array_equal(y[0, :3], 0.0)  # dropped or null
  np.testing.assert_allclose(aux['kept_experts'], 2 / 4)  # t3's two
  np.testing.assert_allclose(aux['drop_fraction'], 3 / 5)  # 5 real asked
  params = {'router': variables['params']['router']['kernel'],
            **variables['params']['experts']}
  expected = naive_null_layer(x, np.ones((1, 4), bool), params, 2, 2, 1,
                              'choice')
  np.testing.assert_allclose(y, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('dispatcher,priority,cf', [
    ('gather', 'choice', 0.5), ('einsum', 'token', 1.0),
    ('ragged', 'choice', 1.0), ('per_token', 'token', 0.5),
    ('blocked', 'token', 0.5), ('blocked', 'choice', None)])
def test_layer_matches_naive_loop_with_padding(dispatcher, priority, cf):
  layer = _layer(num_experts=4, num_null_experts=3, dispatcher=dispatcher,
                 priority=priority, capacity_factor=cf,
                 eval_capacity_factor=cf)
  x = jax.random.normal(jax.random.key(0), (2, 10, D))
  padding = jnp.zeros((2, 10), bool).at[1, 2:5].set(True)
  variables = layer.init(init_key(0), x)
  variables['params']['router']['kernel'] *= 30.0  # spread the scores
  y, aux = layer.apply(variables, x, padding)
  c = capacity_lib.compute_capacity(10, 4, 2, cf, 0)
  params = {'router': variables['params']['router']['kernel'],
            **variables['params']['experts']}
  valid = ~np.asarray(padding)
  expected = naive_null_layer(x, valid, params, 4, 2, c, priority)
  np.testing.assert_allclose(y, expected, rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(y[1, 2:5], 0.0)  # padding: exactly zero
  assert 0.0 < float(aux['null_fraction']) < 1.0
  assert float(aux['active_experts']) < 2.0  # fewer than K real experts


def test_zero_null_experts_is_todays_layer():
  x = jax.random.normal(jax.random.key(0), (2, 6, D))
  base = moejax.MoeLayer(num_experts=4, d_ff=F, top_k=2)
  zero = moejax.MoeLayer(num_experts=4, d_ff=F, top_k=2, num_null_experts=0)
  vb, vz = base.init(init_key(0), x), zero.init(init_key(0), x)
  assert vz['params']['router']['kernel'].shape == (D, 4)
  jax.tree.map(np.testing.assert_array_equal, vb, vz)
  (yb, ab), (yz, az) = base.apply(vb, x), zero.apply(vz, x)
  np.testing.assert_array_equal(yb, yz)
  assert set(az) == set(ab) and 'null_fraction' not in az
  # route_top_k with num_null=0 is the plain call, bit for bit.
  scores = jax.nn.softmax(jax.random.normal(jax.random.key(1), (2, 6, 4)))
  plain = routing.route_top_k(scores, 2, 3, renormalize=True)
  null0 = routing.route_top_k(scores, 2, 3, renormalize=True, num_null=0)
  jax.tree.map(np.testing.assert_array_equal, plain, null0)


def test_renormalize_over_real_choices_only():
  # Scores (.5 real 0, .3 null 2, .2 real 1), K = 2 -> choices (0, null):
  # the real gate renormalised over the real ones: .5 / .5 = 1; K = 3 ->
  # (0, null, 1): .5 / .7 and .2 / .7 (the null .3 is not in the sum).
  scores = jnp.array([[[.5, .2, .3]]])
  d = routing.route_top_k(scores, 2, 4, renormalize=True, num_null=1)
  np.testing.assert_array_equal(d.expert_index[0, 0], [0, 2])
  np.testing.assert_allclose(d.combine_weight[0, 0], [1.0, 0.0])
  d = routing.route_top_k(scores, 3, 4, renormalize=True, num_null=1)
  np.testing.assert_allclose(d.combine_weight[0, 0], [.5 / .7, 0, .2 / .7],
                             rtol=1e-6)
  np.testing.assert_array_equal(d.request[0, 0], [True, False, True])


@pytest.mark.parametrize('kw,message', [
    (dict(num_null_experts=-1), r'num_null_experts must be an int >= 0'),
    (dict(bias_update_rate=0.01), r'num_null_experts=2 does not combine '
                                  r'with bias_update_rate=0.01'),
    (dict(selection_bias=True), r'with selection_bias=True'),
    (dict(num_experts=4, num_groups=2), r'with num_groups=2'),
    (dict(router='relu', top_k=1), r"num_null_experts=2 applies to "
                                   r"router='topk' only"),
])
def test_bad_options_raise(kw, message):
  with pytest.raises(ValueError, match=message):
    _layer(**kw)


def _lm(**moe):
  return TransformerLM(vocab_size=16, num_layers=1, d_model=D, num_heads=2,
                       d_ff=F, activation='swiglu', tie_embeddings=False,
                       moe={**dict(num_experts=2, top_k=2,
                                   capacity_factor=None,
                                   eval_capacity_factor=None), **moe})


def test_hf_export_refuses_null_experts_and_relu():
  with pytest.raises(hf_config.UnsupportedConfigError,
                     match='moe.num_null_experts=2'):
    hf_config.hf_config(_lm(num_null_experts=2))
  with pytest.raises(hf_config.UnsupportedConfigError,
                     match="moe.router='relu'"):
    hf_config.hf_config(_lm(router='relu', top_k=1))


def test_routing_capture_reads_null_and_relu_routing():
  tokens = jax.random.randint(jax.random.key(4), (2, 6), 0, 16)
  model = _lm(num_null_experts=2)
  variables = model.init(init_key(0), tokens)
  routes = routing_capture.capture_routing(model, variables, tokens)
  r = routes['block_0']
  assert r.logits.shape == (2, 6, 4)  # E + N columns
  null = r.expert_index >= 2
  assert not np.any(r.kept[null])  # a null choice is never kept
  model = _lm(router='relu', top_k=1)
  variables = model.init(init_key(0), tokens)
  r = routing_capture.capture_routing(model, variables, tokens)['block_0']
  assert r.expert_index.shape == (2, 6, 2)  # K = E choices, by gate
  assert np.all(r.gate[..., 0] >= r.gate[..., 1])
  np.testing.assert_array_equal(r.kept, r.gate > 0)  # dropless


def test_cached_decode_matches_full_forward():
  # Null experts keep top-K routing per token: KV-cached decoding
  # (moejax.generate) equals the full forward pass of the dropless model
  # (the per_token dispatcher decoding may pick is pinned above).
  from tests import test_generate as tg  # pylint: disable=g-import-not-at-top
  model = TransformerLM(**tg.TINY, moe=dict(
      num_experts=4, top_k=2, num_null_experts=4, capacity_factor=None,
      eval_capacity_factor=None))
  variables = tg.random_variables(model)
  tokens = jax.random.randint(jax.random.key(1), (2, tg.LENGTH), 0, tg.V)
  full, _, cached = tg.full_and_cached(model, variables, tokens)
  np.testing.assert_allclose(cached, full, atol=1e-5, rtol=1e-5)
