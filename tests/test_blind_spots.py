"""Behaviours a one-line bug could break without another test noticing
(issue: mutation audit of the core). Hand cases use unequal values, drops
and padding where they matter, and go through MoeLayer / the project's own
make_optimizer, not a re-built copy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import moejax
from moejax import losses, routing
from moejax.train import optim


@pytest.fixture(autouse=True)
def _exact():
  with jax.default_matmul_precision('highest'):
    yield


def _x(b=2, l=8, d=8, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, l, d))


# ------------------------------------------------------- MoeLayer pass-through
def test_capacity_multiple_of_reaches_the_layer():
  # S=8, E=4, K=1, cf=1: C = ceil(1 * 8 * 1 / 4) = 2; multiple_of=3 -> 3.
  x = _x()
  kw = dict(num_experts=4, d_ff=8, capacity_factor=1.0,
            eval_capacity_factor=1.0, min_capacity=0)
  for multiple, want in ((1, 2), (3, 3)):
    layer = moejax.MoeLayer(**kw, capacity_multiple_of=multiple)
    variables = layer.init(jax.random.key(0), x)
    _, aux = layer.apply(variables, x)
    assert float(aux['capacity']) == want, multiple


def test_routed_scaling_reaches_the_layer():
  # No shared experts: the output is linear in the gates, so scaling them by
  # 2.5 scales y by exactly 2.5 (drops included: cf 0.5).
  x = _x()
  kw = dict(num_experts=4, d_ff=8, top_k=2, capacity_factor=0.5,
            eval_capacity_factor=0.5, min_capacity=1)
  base = moejax.MoeLayer(**kw)
  variables = base.init(jax.random.key(0), x)
  y1, aux = base.apply(variables, x)
  assert float(aux['drop_fraction']) > 0
  y2, _ = moejax.MoeLayer(**kw, routed_scaling=2.5).apply(variables, x)
  np.testing.assert_allclose(y2, 2.5 * np.asarray(y1), rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(y1)).max() > 1e-3


def test_soft_normalize_scale_param_multiplies_the_logits():
  # normalize=True adds router/scale [] (init 1). Logits are scale *
  # <x/|x|, phi/|phi|>: scale 0 makes every slot a uniform mix of the
  # tokens, so all slots see the mean token.
  x = _x(b=1, l=6)
  layer = moejax.MoeLayer(num_experts=2, d_ff=8, router='soft_moe',
                          slots_per_expert=2, soft_normalize=True,
                          capacity_factor=None, eval_capacity_factor=None)
  variables = layer.init(jax.random.key(0), x)
  scale = variables['params']['router']['scale']
  assert scale.shape == () and float(scale) == 1.0
  _, state = layer.apply(variables, x, mutable=['intermediates'])
  zero = jax.tree.map(lambda v: v, variables)
  zero['params']['router']['scale'] = jnp.zeros(())
  _, state0 = layer.apply(zero, x, mutable=['intermediates'])
  slots0 = np.asarray(state0['intermediates']['dispatched'][0])  # [G,E,C,D]
  np.testing.assert_allclose(slots0[0, 0, 0], np.asarray(x[0]).mean(0),
                             rtol=1e-5, atol=1e-6)
  slots = np.asarray(state['intermediates']['dispatched'][0])
  assert np.abs(slots - slots0).max() > 1e-3  # scale 1 is not uniform
  # Normalised: the routing (slot contents / token) ignores |x|.
  y1, _ = layer.apply(variables, x)
  y3, _ = layer.apply(variables, 3.0 * x)
  relu_scaled = 3.0 * np.asarray(y1)  # relu FFN without biases: 1-homogeneous
  np.testing.assert_allclose(y3, relu_scaled, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------- losses
def test_z_loss_is_logsumexp_squared_on_unequal_logits():
  # logsumexp([1, 2, 3]) = 3 + ln(1 + e^-1 + e^-2) = 3.4076059644;
  # squared = 11.6117780. (max + ln E = 4.0986 would give 16.80.)
  logits = jnp.asarray([[[1., 2., 3.]]])
  z = losses.z_loss(logits, jnp.ones((1, 1), bool))
  np.testing.assert_allclose(z, 3.4076059644 ** 2, rtol=1e-6)


def test_padding_is_out_of_every_denominator():
  # The same two real tokens, alone (S=2) and with two padding tokens of
  # extreme logits (S=4): z-loss, balance loss and metrics are equal.
  real = jnp.asarray([[[1., 2., 0.], [0., .5, 3.]]])
  pad = jnp.asarray([[[40., -9., 7.], [9., 30., -5.]]])
  both = jnp.concatenate([real, pad], axis=1)
  valid2, valid4 = jnp.ones((1, 2), bool), jnp.asarray([[1, 1, 0, 0]], bool)
  z2, z4 = losses.z_loss(real, valid2), losses.z_loss(both, valid4)
  # z = mean over the 2 real tokens: (lse(1,2,0)^2 + lse(0,.5,3)^2) / 2.
  lse = lambda v: math.log(sum(math.exp(t) for t in v))
  want = (lse([1, 2, 0]) ** 2 + lse([0, .5, 3]) ** 2) / 2
  np.testing.assert_allclose(z2, want, rtol=1e-6)
  np.testing.assert_allclose(z4, want, rtol=1e-6)
  for logits, valid in ((real, valid2), (both, valid4)):
    probs = jax.nn.softmax(logits, -1)
    decision = routing.route_top_k(probs, 2, 4, valid=valid)
    got = losses.routing_metrics(probs, decision, valid)
    got['aux_loss'] = losses.load_balance_loss(probs, decision, valid)
    if valid is valid2:
      ref = got
    else:
      for key in ('aux_loss', 'expert_load', 'router_entropy', 'top1_prob',
                  'max_violation', 'drop_fraction'):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, err_msg=key)


def test_load_balance_counts_second_choices():
  # E=3, K=2, probs with P0 != P2: choices {0,1}, {2,1} -> f = [1/4, 2/4,
  # 1/4]; P = [(.5+.1)/2, (.3+.35)/2, (.2+.55)/2] = [.3, .325, .375];
  # loss = 3 * (.25*.3 + .5*.325 + .25*.375) = 0.99375. Counting first
  # choices only (f = [.5, 0, .5]) would give 3 * (.15 + .1875) = 1.0125.
  probs = jnp.asarray([[[.5, .3, .2], [.1, .35, .55]]])
  decision = routing.route_top_k(probs, k=2, capacity=2)
  loss = losses.load_balance_loss(probs, decision, jnp.ones((1, 2), bool))
  np.testing.assert_allclose(loss, 0.99375, rtol=1e-6)


# --------------------------------------------------- routing under capacity
def test_renormalize_divides_by_all_k_gates_even_after_a_drop():
  # K=2, C=1, 'choice' priority. Token 0: e0 .6, e1 .3 (e2 .1); token 1:
  # e1 .7, e0 .2. First choices take e0 and e1; token 0's 2nd (e1) drops.
  # Its kept gate stays .6 / (.6 + .3) = 2/3, not 1.
  probs = jnp.asarray([[[.6, .3, .1], [.2, .7, .1]]])
  decision = routing.route_top_k(probs, 2, 1, renormalize=True)
  np.testing.assert_array_equal(decision.kept, [[[True, False],
                                                 [True, False]]])
  np.testing.assert_allclose(decision.combine_weight[0, 0],
                             [.6 / .9, 0.], rtol=1e-6)


def test_loss_free_bias_counts_choices_before_capacity():
  # E=2, K=1, C=1: three tokens choose e0, one chooses e1. Before capacity
  # the loads are [3, 1] (mean 2): b0 -= rate, b1 += rate. After capacity
  # they would be [1, 1]: no update at all.
  router = routing.Router(num_experts=2, bias_update_rate=0.5)
  x = jnp.asarray([[[1., 0.], [1., 0.], [0., 1.], [1., 0.]]])
  variables = router.init(jax.random.key(0), x, 1)
  variables = {'params': {'kernel': jnp.eye(2)},
               'moe_state': variables['moe_state']}
  (decision, _), state = router.apply(variables, x, 1, deterministic=False,
                                      mutable=['moe_state'])
  assert int(decision.kept.sum()) == 2  # capacity dropped two
  np.testing.assert_allclose(state['moe_state']['bias'], [-.5, .5])


def _first_token_output(layer, variables, x):
  y, _ = layer.apply(variables, x)
  return np.asarray(y[0, 0])


@pytest.mark.parametrize('priority,leaks', [('token', False),
                                            ('choice', True)])
def test_causal_priorities_under_drops(priority, leaks):
  # E=2, K=2, S=2, cf .5: C = ceil(.5 * 2 * 2 / 2) = 1. Router = identity:
  # token 0 = [2, 0] picks e0 then e1. Token 1 = [0, 2] picks e1 first, or
  # (changed) [2, 0] picks e0 first. 'choice': token 1's first choice comes
  # before token 0's second, so token 0's second choice (e1) is dropped
  # or kept depending on the later token: a leak. 'token': token 0 claims
  # both its slots first, whatever follows. The causal layer refuses the
  # leaking order unless told to accept it.
  kw = dict(num_experts=2, d_ff=4, top_k=2, capacity_factor=.5,
            eval_capacity_factor=.5, min_capacity=0, priority=priority,
            causal=True)
  if leaks:
    with pytest.raises(ValueError, match='later tokens'):
      moejax.MoeLayer(**kw)
  layer = moejax.MoeLayer(**kw, allow_noncausal_routing=leaks)
  a = jnp.asarray([[[2., 0.], [0., 2.]]])
  b = jnp.asarray([[[2., 0.], [2., 0.]]])
  variables = layer.init(jax.random.key(0), a)
  variables['params']['router']['kernel'] = jnp.eye(2)
  ya = _first_token_output(layer, variables, a)
  yb = _first_token_output(layer, variables, b)
  assert (np.abs(ya - yb).max() > 1e-6) == leaks


# ---------------------------------------------------------------- optimizer
def test_make_optimizer_clips_the_global_norm():
  # Adam is scale-invariant per step, so clipping shows across steps: a
  # gradient of norm 1000 then one of norm 1. Clipped to 1, both weigh the
  # same in the moments; unclipped, the first dominates.
  params = {'w': jnp.zeros((2,))}
  grads = [{'w': jnp.asarray([600., 800.])}, {'w': jnp.asarray([0., 1.])}]

  def run(tx):
    state, p = tx.init(params), params
    for g in grads:
      updates, state = tx.update(g, state, p)
      p = optax.apply_updates(p, updates)
    return np.asarray(p['w'])

  kw = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)
  lr = optim.lr_schedule(1.0, 0, 10, 0.1)
  project = run(optim.make_optimizer(1.0, 0, 10, grad_clip=1.0, **kw))
  clipped = run(optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(lr, **kw)))
  unclipped = run(optax.adamw(lr, **kw))
  np.testing.assert_allclose(project, clipped, rtol=1e-6)
  assert np.abs(project - unclipped).max() > 1e-3


def test_jitter_only_in_training():
  # Found by tools/mutation_check.py (jitter-in-eval survived): in eval the
  # router must see the clean x, so jitter_eps changes nothing there.
  x = _x()
  kw = dict(num_experts=4, d_ff=8, top_k=2, capacity_factor=0.5,
            eval_capacity_factor=0.5, min_capacity=1)
  clean = moejax.MoeLayer(**kw)
  variables = clean.init(jax.random.key(0), x)
  want, _ = clean.apply(variables, x)
  got, _ = moejax.MoeLayer(**kw, jitter_eps=0.5).apply(
      variables, x, rngs={'router': jax.random.key(1)})
  np.testing.assert_array_equal(got, want)
  train, _ = moejax.MoeLayer(**kw, jitter_eps=0.5).apply(
      variables, x, deterministic=False, rngs={'router': jax.random.key(1)})
  assert np.abs(np.asarray(train) - np.asarray(want)).max() > 1e-4
