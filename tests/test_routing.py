"""Hand-computed routing decisions: selection, priorities, policies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing

# 3 tokens, E=3. Top-2: t0 -> (e0 .4, e2 .2); t1 -> (e0 .5, e2 .4);
# t2 -> (e2 .6, e0 .3).
PROBS = jnp.array([[[.4, 0., .2], [.5, .1, .4], [.3, .2, .6]]])
X = None  # dropped

# With C=2 (capacity arithmetic in each comment):
EXPECTED = {
    # k=0 claims first: t0->e0 s0, t1->e0 s1, t2->e2 s0;
    # then k=1: t0->e2 s1, t1->e2 full, t2->e0 full.
    'choice': [[(0, 0), (2, 1)], [(0, 1), (2, X)], [(2, 0), (0, X)]],
    # tokens by top-1 score: t2 (.6), t1 (.5), t0 (.4); then choice-major:
    # t2->e2 s0, t1->e0 s0, t0->e0 s1; t2->e0 full, t1->e2 s1, t0->e2 full.
    'score': [[(0, 1), (2, X)], [(0, 0), (2, 1)], [(2, 0), (0, X)]],
    # position order, a token's choices together: t0->e0 s0, e2 s0;
    # t1->e0 s1, e2 s1; t2->e2 full, e0 full.
    'token': [[(0, 0), (2, 0)], [(0, 1), (2, 1)], [(2, X), (0, X)]],
}


def _as_table(decision):
  table = []
  for t in range(decision.expert_index.shape[1]):
    row = []
    for k in range(decision.expert_index.shape[2]):
      slot = int(decision.slot[0, t, k]) if decision.kept[0, t, k] else X
      row.append((int(decision.expert_index[0, t, k]), slot))
    table.append(row)
  return table


@pytest.mark.parametrize('priority', ['choice', 'score', 'token'])
def test_hand_computed_priorities(priority):
  decision = routing.route_top_k(PROBS, k=2, capacity=2, priority=priority)
  assert _as_table(decision) == EXPECTED[priority]
  # Gates are the unnormalised probabilities of the chosen experts, and
  # dropped choices combine with exactly 0.
  np.testing.assert_allclose(decision.gate[0], [[.4, .2], [.5, .4], [.6, .3]],
                             rtol=1e-6)
  assert np.all(np.asarray(decision.combine_weight)[~np.asarray(
      decision.kept)] == 0)


def test_padding_takes_no_capacity():
  # t0 is padding: t1 -> e0 s0 and t2 -> e2 s0, e0 s1 under 'choice'.
  valid = jnp.array([[False, True, True]])
  decision = routing.route_top_k(PROBS, k=2, capacity=2, valid=valid)
  assert not decision.kept[0, 0].any() and not decision.request[0, 0].any()
  assert _as_table(decision)[1:] == [[(0, 0), (2, 1)], [(2, 0), (0, 1)]]


def test_renormalize_and_scale():
  decision = routing.route_top_k(PROBS, k=2, capacity=3, renormalize=True,
                                 scale=2.0)
  # t0: (.4, .2) / .6 * 2 = (4/3, 2/3); t1: (.5, .4)/.9*2; t2: (.6, .3)/.9*2.
  expected = [[4 / 3, 2 / 3], [10 / 9, 8 / 9], [12 / 9, 6 / 9]]
  np.testing.assert_allclose(decision.gate[0], expected, rtol=1e-6)


def test_bias_changes_selection_not_gates():
  # Bias +0.5 on e1 makes e1 every token's first choice (t0: .5 > .4 ...).
  bias = jnp.array([0., .5, 0.])
  index, gate = routing.select_top_k(PROBS, 1, bias)
  np.testing.assert_array_equal(index[0, :, 0], [1, 1, 1])
  # The gate is e1's unbiased probability: 0, .1, .2.
  np.testing.assert_allclose(gate[0, :, 0], [0., .1, .2], atol=1e-7)


def test_random_second_expert_probability():
  # Gates (.6, .1): renormalised g2 = .1/.7 = 1/7; keep prob = (1/7)/.2 = 5/7.
  # Gates (.5, .4): g2 = 4/9 >= .2, always kept. First choice always kept.
  gate = jnp.tile(jnp.array([[[.6, .1], [.5, .4]]]), (20000, 1, 1))
  keep = routing.random_second_expert(gate, jax.random.key(0), 0.2)
  assert bool(keep[:, :, 0].all())
  assert bool(keep[:, 1, 1].all())
  rate = float(keep[:, 0, 1].mean())
  # Binomial std with n=20000: sqrt(5/7*2/7/20000) = 0.0032; allow 5 sigma.
  assert abs(rate - 5 / 7) < 0.016


def test_random_policy_frees_capacity():
  # A removed second choice asks for no slot: with the policy removing every
  # second choice (threshold huge), nothing is dropped at C=2 in PROBS.
  decision = routing.route_top_k(PROBS, k=2, capacity=2,
                                 second_expert_rng=jax.random.key(0),
                                 second_expert_threshold=1e9)
  assert not decision.request[0, :, 1].any()
  np.testing.assert_array_equal(decision.kept[0, :, 0], [True] * 3)


def test_router_logits_are_float32_for_bf16_inputs():
  x = jnp.ones((1, 2, 4), jnp.bfloat16)
  kernel = jnp.ones((4, 3), jnp.bfloat16)
  assert routing.router_logits(x, kernel).dtype == jnp.float32


def test_unknown_score_fn_and_priority_name_the_argument():
  with pytest.raises(ValueError, match='score_fn'):
    routing.scores_from_logits(jnp.zeros((1, 1, 2)), 'tanh')
  with pytest.raises(ValueError, match='priority'):
    routing.route_top_k(PROBS, 1, 1, priority='random')
