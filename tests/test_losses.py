"""Load-balance loss, z-loss and routing metrics on hand cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import losses, routing


def test_load_balance_loss_issue_case():
  # E=2, K=1: choices e0,e0,e1,e0 -> f = [.75, .25];
  # P = [(.9+.8+.3+.6)/4, (.1+.2+.7+.4)/4] = [.65, .35];
  # loss = 2 * (.75*.65 + .25*.35) = 1.15.
  probs = jnp.array([[[.9, .1], [.8, .2], [.3, .7], [.6, .4]]])
  decision = routing.route_top_k(probs, k=1, capacity=4)
  loss = losses.load_balance_loss(probs, decision, jnp.ones((1, 4), bool))
  np.testing.assert_allclose(loss, 1.15, rtol=1e-6)


def test_load_balance_loss_counts_all_k_choices_normalised_by_k():
  # E=3, K=2 on the routing hand case: choices {0,2},{0,2},{2,0} ->
  # f = [3/6, 0, 3/6]; P = [(.4+.5+.3)/3, (0+.1+.2)/3, (.2+.4+.6)/3]
  # = [.4, .1, .4]; loss = 3 * (.5*.4 + 0 + .5*.4) = 1.2.
  probs = jnp.array([[[.4, 0., .2], [.5, .1, .4], [.3, .2, .6]]])
  decision = routing.route_top_k(probs, k=2, capacity=1)
  loss = losses.load_balance_loss(probs, decision, jnp.ones((1, 3), bool))
  np.testing.assert_allclose(loss, 1.2, rtol=1e-6)


def test_load_balance_is_one_at_perfect_balance_and_averages_groups():
  # Group 0: each expert chosen once with P uniform-ish -> E*sum(f*P) where
  # f = [.5, .5]; P = [.5, .5] -> 1.0. Group 1: f = [1, 0], P = [.8, .2]
  # -> 2 * .8 = 1.6. Mean over groups = 1.3.
  probs = jnp.array([[[.6, .4], [.4, .6]], [[.8, .2], [.8, .2]]])
  decision = routing.route_top_k(probs, k=1, capacity=2)
  loss = losses.load_balance_loss(probs, decision, jnp.ones((2, 2), bool))
  np.testing.assert_allclose(loss, 1.3, rtol=1e-6)


def test_z_loss():
  # logsumexp([0, 0]) = ln 2 -> (ln 2)^2 = 0.480453.
  z = losses.z_loss(jnp.zeros((1, 1, 2)), jnp.ones((1, 1), bool))
  np.testing.assert_allclose(z, math.log(2) ** 2, rtol=1e-6)
  assert abs(math.log(2) ** 2 - 0.480453) < 1e-6


def test_metrics_hand_case():
  # Routing hand case, K=2, C=2, 'choice': 2 of 6 assignments dropped.
  probs = jnp.array([[[.4, 0., .2], [.5, .1, .4], [.3, .2, .6]]])
  decision = routing.route_top_k(probs, k=2, capacity=2)
  m = losses.routing_metrics(probs, decision, jnp.ones((1, 3), bool))
  np.testing.assert_allclose(m['expert_load'], [.5, 0., .5], atol=1e-7)
  np.testing.assert_allclose(m['max_violation'], 3 * .5 - 1, rtol=1e-6)
  np.testing.assert_allclose(m['drop_fraction'], 2 / 6, rtol=1e-6)
  np.testing.assert_allclose(m['fully_dropped_fraction'], 0.0)
  np.testing.assert_allclose(m['top1_prob'], (.4 + .5 + .6) / 3, rtol=1e-6)
  assert float(m['capacity']) == 2.0


def test_metrics_fully_dropped_and_entropy():
  # E=2, K=1, C=1, two tokens both choose e0: the second is fully dropped.
  # Entropy of [.75, .25] = -(.75 ln .75 + .25 ln .25) = 0.562335.
  probs = jnp.array([[[.75, .25], [.75, .25]]])
  decision = routing.route_top_k(probs, k=1, capacity=1)
  m = losses.routing_metrics(probs, decision, jnp.ones((1, 2), bool))
  np.testing.assert_allclose(m['fully_dropped_fraction'], 0.5)
  np.testing.assert_allclose(m['drop_fraction'], 0.5)
  np.testing.assert_allclose(m['router_entropy'], 0.562335, rtol=1e-5)
  np.testing.assert_allclose(m['max_violation'], 1.0)  # 2 * 1.0 - 1


@pytest.mark.parametrize('score_fn', ['softmax', 'sigmoid'])
def test_expert_probs_sum_to_one(score_fn):
  logits = jnp.array([[[1., -2., .5]]])
  probs = losses.expert_probs(routing.scores_from_logits(logits, score_fn),
                              score_fn)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)


def test_batch_scope_balance_loss_hand_case():
  # E = 2, K = 1. Group 0 picks expert 0 twice, probs (0.9, 0.1), (0.8, 0.2),
  # and has a third, padding token that picks expert 1 with (0, 1); group 1
  # picks expert 1 twice with (0.3, 0.7), (0.4, 0.6).
  #   'group': f0 = (1, 0), P0 = (0.85, 0.15) -> 2 * 0.85 = 1.7;
  #            f1 = (0, 1), P1 = (0.35, 0.65) -> 2 * 0.65 = 1.3; mean 1.5.
  #   'batch': f = (2/4, 2/4), P = (2.4/4, 1.6/4) = (0.6, 0.4)
  #            -> 2 * (0.5 * 0.6 + 0.5 * 0.4) = 1.0.
  probs = jnp.array([[[0.9, 0.1], [0.8, 0.2], [0.0, 1.0]],
                     [[0.3, 0.7], [0.4, 0.6], [0.4, 0.6]]])
  valid = jnp.array([[True, True, False], [True, True, False]])
  d = routing.route_top_k(probs, k=1, capacity=3)  # the argmax choices
  np.testing.assert_array_equal(d.expert_index[..., 0], [[0, 0, 1],
                                                         [1, 1, 1]])
  assert float(losses.load_balance_loss(probs, d, valid)) == pytest.approx(
      1.5)
  assert float(losses.load_balance_loss(probs, d, valid, 'batch')
               ) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="aux_loss_scope='micro'"):
    losses.load_balance_loss(probs, d, valid, 'micro')


def test_batch_scope_with_step_counts_sums_to_the_whole_batch():
  # Gradient accumulation: a batch of 4 tokens in 2 micro-batches of 2,
  # E = 2, K = 1. Micro-batch 0 picks experts (0, 0) with probs (0.9, 0.1),
  # (0.8, 0.2); micro-batch 1 picks (0, 1) with (0.6, 0.4), (0.3, 0.7).
  #   whole batch: f = (3/4, 1/4), P = (2.6/4, 1.4/4) = (0.65, 0.35)
  #                -> 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15.
  #   step counts (3, 1) over 4 tokens -> f = (0.75, 0.25) in both:
  #   micro 0: P = (0.85, 0.15) -> 2 * (0.6375 + 0.0375) = 1.35;
  #   micro 1: P = (0.45, 0.55) -> 2 * (0.3375 + 0.1375) = 0.95;
  #   each weighted by its token share 1/2: 0.675 + 0.475 = 1.15.
  #   Each micro-batch's own f instead: 2 * 0.85 = 1.7 and
  #   2 * (0.5 * 0.45 + 0.5 * 0.55) = 1.0 -> 1.35, not 1.15.
  probs = jnp.array([[[0.9, 0.1], [0.8, 0.2]], [[0.6, 0.4], [0.3, 0.7]]])
  valid = jnp.ones((2, 2), bool)
  d = routing.route_top_k(probs, k=1, capacity=2)
  np.testing.assert_array_equal(d.expert_index[..., 0], [[0, 0], [0, 1]])
  whole = losses.load_balance_loss(probs.reshape(1, 4, 2), d.replace(
      expert_index=d.expert_index.reshape(1, 4, 1)), valid.reshape(1, 4),
                                   'batch')
  assert float(whole) == pytest.approx(1.15)
  counts = (jnp.array([3.0, 1.0]), jnp.array(4.0))
  micro = [float(losses.load_balance_loss(
      probs[i:i + 1], d.replace(expert_index=d.expert_index[i:i + 1]),
      valid[i:i + 1], 'batch', counts)) for i in range(2)]
  assert micro == pytest.approx([1.35, 0.95])
  assert 0.5 * micro[0] + 0.5 * micro[1] == pytest.approx(1.15)
  own = [float(losses.load_balance_loss(
      probs[i:i + 1], d.replace(expert_index=d.expert_index[i:i + 1]),
      valid[i:i + 1], 'batch')) for i in range(2)]
  assert own == pytest.approx([1.7, 1.0])
  # The 'group' scope ignores step counts.
  assert float(losses.load_balance_loss(probs, d, valid, 'group', counts)
               ) == pytest.approx(float(losses.load_balance_loss(
                   probs, d, valid, 'group')))


def test_batch_scope_reaches_the_layer():
  # One group (G = 1): both scopes agree; two groups whose routing differs:
  # they do not, so MoeLayer really passes aux_loss_scope on.
  import moejax  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (2, 8, 8))
  values = {}
  for scope in losses.AUX_LOSS_SCOPES:
    for group_size in (16, None):  # one group of 16; two of 8
      layer = moejax.MoeLayer(num_experts=4, d_ff=8, aux_loss_scope=scope,
                              group_size=group_size)
      variables = layer.init(jax.random.key(1), x)
      values[scope, group_size] = float(layer.apply(variables, x)[1][
          'aux_loss'])
  assert values['batch', 16] == pytest.approx(values['group', 16])
  assert abs(values['batch', None] - values['group', None]) > 1e-4
