"""ReMoE (router='relu', moejax.relu_router): a naive loop reference of the
routing and the layer, the L1 controller, the training loss, the options."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import moejax
from moejax import capacity as capacity_lib
from moejax import relu_router
from moejax.models import TransformerLM
from moejax.train import state as state_lib
from moejax.train import step as step_lib
from tests import reference
from tests.conftest import init_key

D, F, E = 8, 16, 4
DISPATCHERS = ('gather', 'einsum', 'ragged', 'per_token')


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


def naive_relu_route(gates, capacity, priority, valid):
  """gates [S, E] -> per token [(expert, gate, requested, kept)] * E, by
  loops: experts by gate, largest first (ties to the lower index); a choice
  requests a slot iff the token is valid and its gate > 0; every expert's
  slots are claimed in position order ('choice', 'token') or by the
  tokens' largest gate, descending ('score')."""
  s, e = gates.shape
  choices = [sorted(range(e), key=lambda j, t=t: (-gates[t, j], j))
             for t in range(s)]
  tokens = list(range(s))
  if priority == 'score':
    tokens = sorted(tokens, key=lambda t: -gates[t].max())
  order = [(t, j) for t in tokens for j in range(e)]
  used = [0] * e
  out = [[None] * e for _ in range(s)]
  for t, j in order:
    expert = choices[t][j]
    gate = gates[t, expert]
    requested = bool(valid[t]) and gate > 0
    kept = requested and used[expert] < capacity
    used[expert] += requested
    out[t][j] = (expert, gate, requested, kept)
  return out


def naive_relu_layer(x, valid, params, capacity, priority):
  """x [G, S, D] -> (y [G, S, D], requests, kept) by explicit loops."""
  x = np.asarray(x, np.float64)
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  y = np.zeros_like(x)
  requests = kept_count = 0
  for g in range(x.shape[0]):
    gates = np.maximum(x[g] @ params['router'], 0.0)
    routes = naive_relu_route(gates, capacity, priority, valid[g])
    for t, choices in enumerate(routes):
      for expert, gate, requested, kept in choices:
        requests += requested
        kept_count += kept
        if kept:
          y[g, t] += gate * reference.ffn(x[g, t], params, expert, 'relu')
  return y, requests, kept_count


def _x(b=2, l=12, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, l, D))


def _layer(**kw):
  kw = dict(num_experts=E, d_ff=F, router='relu', top_k=1, min_capacity=0,
            **kw)
  return moejax.MoeLayer(**kw)


def test_route_relu_hand_case():
  # The route_relu docstring example: E = 3, C = 1. Token 0's experts by
  # gate: 0 (.5), 2 (.2), 1 (0); token 1's: 0 (.3), 1, 2 (0). Expert 0's
  # claims in position order: t0 slot 0, t1 slot 1 >= C: dropped; expert 2:
  # t0 slot 0.
  gates = jnp.array([[[.5, 0., .2], [.3, 0., 0.]]])
  d = relu_router.route_relu(gates, capacity=1)
  np.testing.assert_array_equal(d.expert_index[0], [[0, 2, 1], [0, 1, 2]])
  np.testing.assert_allclose(d.gate[0], [[.5, .2, 0.], [.3, 0., 0.]])
  np.testing.assert_array_equal(d.request[0], [[1, 1, 0], [1, 0, 0]])
  np.testing.assert_array_equal(d.kept[0], [[1, 1, 0], [0, 0, 0]])
  np.testing.assert_array_equal(d.slot[0, :, 0], [0, 1])
  np.testing.assert_allclose(d.combine_weight[0],
                             [[.5, .2, 0.], [0., 0., 0.]])


@pytest.mark.parametrize('dispatcher,priority,cf', [
    ('gather', 'choice', 1.0), ('einsum', 'token', 0.5),
    ('ragged', 'score', 0.5), ('per_token', 'choice', 0.5)])
def test_layer_matches_naive_loop(dispatcher, priority, cf):
  layer = _layer(dispatcher=dispatcher, priority=priority,
                 capacity_factor=cf, eval_capacity_factor=cf)
  x = _x()
  padding = jnp.zeros((2, 12), bool).at[1, 3:5].set(True)
  variables = layer.init(init_key(0), x)
  variables['params']['router']['kernel'] *= 20.0  # spread the gates
  y, aux = layer.apply(variables, x, padding)
  # C = ceil(cf * S * K_target / E) = ceil(cf * 12 * 1 / 4): 3, or 2 at .5.
  c = capacity_lib.compute_capacity(12, E, 1, cf, 0)
  assert c == {1.0: 3, 0.5: 2}[cf]
  params = {'router': variables['params']['router']['kernel'],
            **variables['params']['experts']}
  valid = ~np.asarray(padding)
  expected, requests, kept = naive_relu_layer(x, valid, params, c, priority)
  np.testing.assert_allclose(y, expected, rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(y[1, 3:5], 0.0)  # padding: exactly zero
  tokens = valid.sum()  # 22 valid tokens
  np.testing.assert_allclose(aux['active_experts'], requests / tokens,
                             rtol=1e-6)
  np.testing.assert_allclose(aux['kept_experts'], kept / tokens, rtol=1e-6)
  np.testing.assert_allclose(aux['drop_fraction'],
                             (requests - kept) / requests, rtol=1e-6)
  assert kept < requests and requests > tokens  # drops; > 1 expert/token


def test_expert_load_counts_active_choices_only():
  # Gates by hand through an identity-like kernel: x rows pick logits.
  layer = _layer(capacity_factor=None, eval_capacity_factor=None)
  x = jnp.zeros((1, 3, D)).at[0, jnp.arange(3), jnp.arange(3)].set(1.0)
  variables = layer.init(init_key(0), x)
  kernel = jnp.zeros((D, E)).at[:3].set(jnp.array(
      [[1., 2., -1., -1.], [3., -1., -1., -1.], [-1., -1., -1., -1.]]))
  variables['params']['router']['kernel'] = kernel
  _, aux = layer.apply(variables, x)
  # Active choices: token 0 -> experts 0, 1; token 1 -> 0; token 2 -> none.
  # expert_load = (2, 1, 0, 0) / 3; 3 requests over 3 tokens: 1 per token.
  np.testing.assert_allclose(aux['expert_load'], [2 / 3, 1 / 3, 0, 0],
                             rtol=1e-6)
  np.testing.assert_allclose(aux['active_experts'], 1.0, rtol=1e-6)
  assert float(aux['fully_dropped_fraction']) == 0.0  # token 2 asked none
  # L_reg plain = (1 + 2 + 3 + 0) / 3 = 2; reg_loss = 1e-8 * 2.
  np.testing.assert_allclose(aux['l1_penalty'], 2.0, rtol=1e-6)
  np.testing.assert_allclose(aux['reg_loss'], 2e-8, rtol=1e-6)
  assert float(aux['aux_loss']) == 0.0


def test_l1_penalty_hand_cases():
  gates = jnp.array([[[1., 0.], [.5, .5]]])
  valid = jnp.array([[True, True]])
  # Plain: (1 + 0 + .5 + .5) / 2 = 1. Balanced, K_target = 1: active
  # counts (2, 1), f = 2 * (2, 1) / (1 * 2) = (2, 1); (2 * 1.5 + 1 * .5) / 2
  # = 1.75.
  np.testing.assert_allclose(relu_router.l1_penalty(gates, valid, 1), 1.0)
  np.testing.assert_allclose(
      relu_router.l1_penalty(gates, valid, 1, balance=True), 1.75)
  # Padding counts nowhere: only token 0 -> plain 1.0 / 1.
  np.testing.assert_allclose(
      relu_router.l1_penalty(gates, jnp.array([[True, False]]), 1), 1.0)
  # A whole step's counts (gradient accumulation): active (1, 3) of 4
  # tokens -> f = 2 * (1, 3) / (1 * 4) = (.5, 1.5); this call's per-expert
  # gate sums (1.5, .5) over its own 2 tokens: (.5 * 1.5 + 1.5 * .5) / 2 =
  # .75.
  step = (jnp.array([1., 3.]), jnp.float32(4.0))
  np.testing.assert_allclose(
      relu_router.l1_penalty(gates, valid, 1, balance=True, step_counts=step),
      .75)


def test_controller_update_hand_cases():
  up = relu_router.l1_coeff_update
  # K_target / E = 1/4: denser -> x1.2, sparser -> /1.2, on target -> same.
  np.testing.assert_allclose(up(jnp.float32(1.0), .5, 1, 4, 1.2), 1.2)
  np.testing.assert_allclose(up(jnp.float32(1.0), .125, 1, 4, 1.2), 1 / 1.2,
                             rtol=1e-6)
  np.testing.assert_allclose(up(jnp.float32(1.0), .25, 1, 4, 1.2), 1.0)


def _coeff(state):
  return float(state['moe_state']['router']['l1_coeff'])


def test_controller_uses_the_step_counts_under_accumulation():
  # Every gate positive (kernel +1, x > 0): this call's density is 1 > 1/4,
  # so alone lambda grows (x 1.2). The counting pass sows the call's active
  # counts (8 tokens on each of the 4 experts); given a whole step's counts
  # of 1 active gate in 8 tokens, density = 1 / (8 * 4) < 1/4: lambda
  # shrinks (/ 1.2) instead.
  from moejax import routing  # pylint: disable=import-outside-toplevel
  layer = _layer()
  x = jnp.abs(_x(1, 8)) + 0.1
  variables = layer.init(init_key(0), x)
  params = dict(variables['params'])
  params['router'] = {'kernel': jnp.ones((D, E))}
  state = {'moe_state': variables['moe_state']}
  _, sown = layer.apply({'params': params, **state}, x, deterministic=False,
                        mutable=[routing.SOWN_COUNTS])
  counts = sown[routing.SOWN_COUNTS]['router']
  np.testing.assert_array_equal(counts['counts'][0], [8., 8., 8., 8.])
  assert float(counts['tokens'][0]) == 8.0
  step = {routing.STEP_COUNTS: {'router': {
      'counts': jnp.array([1., 0., 0., 0.]), 'tokens': jnp.float32(8.0)}}}
  _, alone = layer.apply({'params': params, **state}, x, deterministic=False,
                         mutable=['moe_state'])
  _, stepped = layer.apply({'params': params, **state, **step}, x,
                           deterministic=False, mutable=['moe_state'])
  np.testing.assert_allclose(_coeff(alone), 1e-8 * 1.2, rtol=1e-6)
  np.testing.assert_allclose(_coeff(stepped), 1e-8 / 1.2, rtol=1e-6)


@pytest.mark.parametrize('sign,factor', [(1.0, 1.2), (-1.0, 1 / 1.2)])
def test_controller_moves_lambda_on_a_fixed_stream(sign, factor):
  # A kernel of all +1 (or -1) and x > 0: every gate positive (density 1 >
  # 1/4: too dense, lambda grows) or every gate 0 (density 0: shrinks).
  layer = _layer()
  x = jnp.abs(_x(1, 8)) + 0.1
  variables = layer.init(init_key(0), x)
  variables['params']['router']['kernel'] = sign * jnp.ones((D, E))
  assert _coeff(variables) == np.float32(1e-8)
  state = {'moe_state': variables['moe_state']}
  for _ in range(5):
    (_, aux), state = layer.apply({'params': variables['params'], **state},
                                  x, deterministic=False,
                                  mutable=['moe_state'])
  np.testing.assert_allclose(_coeff(state), 1e-8 * factor ** 5, rtol=1e-5)
  np.testing.assert_allclose(aux['l1_coeff'], 1e-8 * factor ** 4, rtol=1e-5)
  # Eval mode, or moe_state not mutable: lambda is only read.
  _, same = layer.apply({'params': variables['params'], **state}, x,
                        deterministic=True, mutable=['moe_state'])
  assert _coeff(same) == _coeff(state)


def test_controller_reaches_the_target_on_a_toy_problem():
  # Regression of a fixed random teacher with E = 8, target K = 2 (density
  # 1/4), 300 Adam steps (lr 1e-2) with the layer's reg_loss added to the
  # MSE (as train.step adds it), the paper's alpha = 1.2 and lambda_0 =
  # 1e-8. x has a constant feature: a bias-free linear router on inputs
  # symmetric about 0 cannot go below density 1/2 (P(x . w > 0) = 1/2 for
  # every w). Tolerance: the mean active experts per token over the last
  # 100 steps within 2 +- 0.25 (measured 2.05; it starts at ~4.8).
  layer = moejax.MoeLayer(num_experts=8, d_ff=16, router='relu', top_k=2,
                          capacity_factor=None)
  x = jax.random.normal(jax.random.key(1), (16, 16, D)).at[..., 0].set(1.0)
  target = jnp.tanh(x @ jax.random.normal(jax.random.key(2), (D, D)))
  variables = layer.init(init_key(0), x)
  opt = optax.adam(1e-2)

  def loss_fn(params, state):
    (y, aux), state = layer.apply({'params': params, **state}, x,
                                  deterministic=False, mutable=['moe_state'])
    return jnp.mean((y - target) ** 2) + aux['reg_loss'], (aux, state)

  @jax.jit
  def train(params, state, opt_state):
    def body(carry, _):
      params, state, opt_state = carry
      grads, (aux, state) = jax.grad(loss_fn, has_aux=True)(params, state)
      updates, opt_state = opt.update(grads, opt_state)
      params = optax.apply_updates(params, updates)
      return (params, state, opt_state), aux['active_experts']
    return jax.lax.scan(body, (params, state, opt_state), None, length=300)

  params = variables['params']
  _, active = train(params, {'moe_state': variables['moe_state']},
                    opt.init(params))
  assert float(active[0]) > 3.0  # starts dense (about half of 8)
  assert abs(float(active[-100:].mean()) - 2.0) < 0.25, active[-100:]


def _lm(**moe):
  return TransformerLM(vocab_size=16, num_layers=2, d_model=D, num_heads=2,
                       d_ff=F, moe=dict(num_experts=E, **moe))


def test_train_step_adds_reg_loss_and_updates_lambda():
  tokens = jax.random.randint(jax.random.key(3), (2, 9), 0, 16)
  model = _lm(router='relu', top_k=1, relu_l1_init=0.5)
  variables = model.init(init_key(0), tokens[:, :-1])
  opt = optax.adam(1e-3)
  state = state_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables['params'],
      opt_state=opt.init(variables['params']),
      model_state={'moe_state': variables['moe_state']})
  step = step_lib.make_train_step(model, opt, seed=0, aux_loss_weight=0.3,
                                  z_loss_weight=0.1)
  new, m = step(state, tokens)
  # loss = lm + 0.3 aux + 0.1 z + reg_loss (weight 1, not 0.3).
  assert float(m['reg_loss']) > 0
  np.testing.assert_allclose(
      m['loss'], m['lm_loss'] + 0.3 * m['aux_loss'] + 0.1 * m['z_loss'] +
      m['reg_loss'], rtol=1e-6)
  layers = [m[f'moe/block_{i}/reg_loss'] for i in range(2)]
  np.testing.assert_allclose(m['reg_loss'], np.mean(layers), rtol=1e-6)
  for i in range(2):
    # lambda_1 = 0.5 * 1.2 ** sign(active / E - K_target / E).
    density = float(m[f'moe/block_{i}/active_experts']) / E
    expected = 0.5 * 1.2 ** np.sign(density - 1 / E)
    coeff = new.model_state['moe_state'][f'block_{i}']['ffn']['router']
    np.testing.assert_allclose(coeff['l1_coeff'], expected, rtol=1e-6)
    np.testing.assert_allclose(m[f'moe/block_{i}/l1_coeff'], 0.5)


def test_other_routers_loss_is_unchanged():
  # No router but 'relu' reports reg_loss: today's loss formula, exactly.
  tokens = jax.random.randint(jax.random.key(3), (2, 9), 0, 16)
  model = TransformerLM(vocab_size=16, num_layers=1, d_model=D, num_heads=2,
                        d_ff=F, moe=dict(num_experts=E))
  v = model.init(init_key(0), tokens[:, :-1])
  loss, m = step_lib.compute_loss(v['params'], model, tokens,
                                  deterministic=True, aux_loss_weight=0.3,
                                  z_loss_weight=0.1)
  assert 'reg_loss' not in m and 'active_experts' not in m
  assert float(loss) == float(m['lm_loss'] + 0.3 * m['aux_loss'] +
                              0.1 * m['z_loss'])


def test_causal_prefix_is_unchanged_by_later_tokens():
  layer = _layer(causal=True, capacity_factor=0.5, eval_capacity_factor=0.5)
  x = _x(1, 12)
  variables = layer.init(init_key(0), x)
  variables['params']['router']['kernel'] *= 20.0
  y, _ = layer.apply(variables, x)
  y2, _ = layer.apply(variables, x.at[0, 8:].set(-x[0, 8:] * 3))
  np.testing.assert_array_equal(y[0, :8], y2[0, :8])
  with pytest.raises(ValueError, match="priority='score' lets a token"):
    _layer(causal=True, priority='score')


@pytest.mark.parametrize('kw,message', [
    (dict(relu_l1_alpha=1.0), r'relu_l1_alpha must be a number > 1'),
    (dict(relu_l1_init=0.0), r'relu_l1_init must be a number > 0'),
    (dict(relu_l1_balance='yes'), r'relu_l1_balance must be a bool'),
    (dict(renormalize=True), r"renormalize=True applies to router='topk'"),
    (dict(num_null_experts=1), r"num_null_experts=1 applies to "
                               r"router='topk'"),
])
def test_bad_options_raise(kw, message):
  with pytest.raises(ValueError, match=message):
    _layer(**kw)


def test_relu_options_are_refused_elsewhere():
  with pytest.raises(ValueError, match=r"^relu_l1_alpha=1.5 applies to "
                     r"router='relu' only; with router='topk' leave it at "
                     r"1.2\.$"):
    moejax.MoeLayer(num_experts=E, d_ff=F, relu_l1_alpha=1.5)


def test_config_errors_name_the_config_key():
  from experiments import config_lib  # pylint: disable=g-import-not-at-top
  from experiments import model_config  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config('configs/remoe.py:tiny')
  config.model.moe.relu_l1_alpha = 1.0
  with pytest.raises(ValueError, match=r'^model\.moe\.relu_l1_alpha must be '
                     r'a number > 1'):
    model_config.check_model(config)


def test_cached_decode_matches_full_forward():
  # ReLU routing is per token: KV-cached decoding (moejax.generate) equals
  # the full forward pass of the dropless model, position by position.
  from tests import test_generate as tg  # pylint: disable=g-import-not-at-top
  model = TransformerLM(**tg.TINY, moe=dict(
      num_experts=4, router='relu', top_k=1, capacity_factor=None,
      eval_capacity_factor=None))
  variables = tg.random_variables(model)
  tokens = jax.random.randint(jax.random.key(1), (2, tg.LENGTH), 0, tg.V)
  full, _, cached = tg.full_and_cached(model, variables, tokens)
  np.testing.assert_allclose(cached, full, atol=1e-5, rtol=1e-5)
