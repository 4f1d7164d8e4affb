"""Property tests (hypothesis) of routing and the layer over random inputs."""

import collections

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

import moejax
from tests.conftest import init_key
from moejax import losses, routing


@st.composite
def routing_case(draw):
  # A few shapes only: each new shape recompiles every op (slow on CPU);
  # the values, capacity, priority, padding and scale vary freely.
  g, s, e = draw(st.sampled_from([(1, 1, 1), (1, 7, 3), (2, 12, 8)]))
  k = draw(st.integers(1, min(e, 3)))
  c = draw(st.integers(1, s))
  priority = draw(st.sampled_from(routing.PRIORITIES))
  score_fn = draw(st.sampled_from(routing.SCORE_FNS))
  seed = draw(st.integers(0, 2 ** 16))
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(g, s, e)) * draw(st.sampled_from([0.1, 1.0, 5.0]))
  valid = rng.random((g, s)) < draw(st.sampled_from([0.5, 0.9, 1.0]))
  return logits.astype(np.float32), valid, k, c, priority, score_fn


def _route(logits, valid, k, c, priority, score_fn):
  scores = routing.scores_from_logits(jnp.asarray(logits), score_fn)
  return scores, routing.route_top_k(scores, k, c, priority, jnp.asarray(valid))


@hypothesis.given(routing_case())
def test_capacity_and_unique_slots(case):
  logits, valid, k, c, priority, score_fn = case
  _, d = _route(*case)
  expert, slot, kept = map(np.asarray, (d.expert_index, d.slot, d.kept))
  used = collections.Counter()
  for g, s, j in zip(*np.nonzero(kept)):
    key = (g, expert[g, s, j], slot[g, s, j])
    assert 0 <= key[2] < c          # every kept slot is inside the buffer
    assert key not in used          # no slot is used twice
    used[key] += 1
  per_expert = collections.Counter((g, e) for g, e, _ in used)
  assert all(n <= c for n in per_expert.values())
  # Slots are claimed densely: an expert with n kept holds slots 0..n-1.
  for (g, e), n in per_expert.items():
    assert {sl for gg, ee, sl in used if (gg, ee) == (g, e)} == set(range(n))
  # Padding requests nothing and keeps nothing.
  assert not kept[~valid].any() and not np.asarray(d.request)[~valid].any()
  # Nothing is dropped while its expert still has free slots.
  dropped = np.asarray(d.request) & ~kept
  for g, s, j in zip(*np.nonzero(dropped)):
    assert per_expert[(g, expert[g, s, j])] == c


@hypothesis.given(routing_case())
def test_losses_and_metrics_ignore_padding(case):
  logits, valid, k, c, priority, score_fn = case
  scores, d = _route(*case)
  probs = losses.expert_probs(scores, score_fn)
  valid_j = jnp.asarray(valid)
  m = losses.routing_metrics(probs, d, valid_j)
  if valid.any():  # f sums to 1 over the non-padding token-choices
    np.testing.assert_allclose(m['expert_load'].sum(), 1.0, rtol=1e-5)
  # Scrambling the logits of padding tokens changes no loss or metric.
  noisy = np.where(valid[..., None], logits,
                   np.random.default_rng(0).normal(size=logits.shape) * 9)
  scores2, d2 = _route(noisy.astype(np.float32), valid, k, c, priority,
                       score_fn)
  probs2 = losses.expert_probs(scores2, score_fn)
  m2 = losses.routing_metrics(probs2, d2, valid_j)
  for name in m:
    np.testing.assert_allclose(m[name], m2[name], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses.load_balance_loss(probs, d, valid_j),
                             losses.load_balance_loss(probs2, d2, valid_j),
                             rtol=1e-5)
  np.testing.assert_allclose(losses.z_loss(jnp.asarray(logits), valid_j),
                             losses.z_loss(jnp.asarray(noisy), valid_j),
                             rtol=1e-5)


_LAYER = moejax.MoeLayer(num_experts=4, d_ff=8, top_k=2, capacity_factor=0.75,
                         min_capacity=1, group_size=6)
_X = jax.random.normal(jax.random.key(0), (2, 6, 4))
_VARS = _LAYER.init(init_key(1), _X)
_APPLY = jax.jit(lambda x, pad: _LAYER.apply(_VARS, x, pad,
                                             deterministic=False))


@hypothesis.given(st.lists(st.booleans(), min_size=12, max_size=12),
                  st.integers(0, 2 ** 16))
def test_layer_padding_gets_zero_output_and_no_capacity(pad_bits, seed):
  pad = np.array(pad_bits).reshape(2, 6)
  x = jax.random.normal(jax.random.key(seed), (2, 6, 4))
  y, aux = _APPLY(x, pad)
  np.testing.assert_array_equal(np.asarray(y)[pad], 0.0)
  # Same valid tokens with the padded rows replaced: identical real outputs.
  y2, aux2 = _APPLY(jnp.where(pad[..., None], 7.0, x), pad)
  np.testing.assert_array_equal(np.asarray(y)[~pad], np.asarray(y2)[~pad])
  np.testing.assert_array_equal(aux['drop_fraction'], aux2['drop_fraction'])
