"""Tests of the synthetic mixture-of-domains language (moejax.data.synthetic)."""

import numpy as np
import pytest

from moejax.data.synthetic import RESTART_EPS
from moejax.data.synthetic import SyntheticMixture

SMALL = dict(num_domains=3, vocab_size=12, support=3, alpha=0.7)


@pytest.fixture(scope='module')
def lang():
  return SyntheticMixture()  # Default 8 domains, V=256, support 8.


def test_same_seed_same_tables_and_samples():
  a, b = SyntheticMixture(seed=3), SyntheticMixture(seed=3)
  np.testing.assert_array_equal(a.transition, b.transition)
  np.testing.assert_array_equal(a.start, b.start)
  ta, da = a.sample(np.random.default_rng(7), 50, 20)
  tb, db = b.sample(np.random.default_rng(7), 50, 20)
  np.testing.assert_array_equal(ta, tb)
  np.testing.assert_array_equal(da, db)


def test_different_seed_differs():
  a, b = SyntheticMixture(seed=0), SyntheticMixture(seed=1)
  assert not np.array_equal(a.sparse_transition > 0, b.sparse_transition > 0)
  ta, _ = a.sample(np.random.default_rng(7), 50, 20)
  tc, _ = a.sample(np.random.default_rng(8), 50, 20)
  assert not np.array_equal(ta, tc)


def test_sample_shapes_and_ranges(lang):
  tokens, domain = lang.sample(np.random.default_rng(0), 64, 17)
  assert tokens.shape == (64, 17) and tokens.dtype == np.int32
  assert domain.shape == (64,) and domain.dtype == np.int32
  assert tokens.min() >= 0 and tokens.max() < lang.vocab_size
  assert domain.min() >= 0 and domain.max() < lang.num_domains


def test_transition_rows(lang):
  n, v, k = lang.num_domains, lang.vocab_size, lang.support
  sparse, mixed = lang.sparse_transition, lang.transition
  assert sparse.shape == mixed.shape == (n, v, v)
  assert sparse.dtype == mixed.dtype == np.float64
  np.testing.assert_allclose(sparse.sum(-1), 1.0, atol=1e-12)
  np.testing.assert_allclose(mixed.sum(-1), 1.0, atol=1e-12)
  assert ((sparse > 0).sum(-1) == k).all()
  # Epsilon mixing: exactly `support` entries above the uniform floor, the
  # rest equal to it.
  floor = RESTART_EPS / v
  assert ((mixed > floor * (1 + 1e-9)).sum(-1) == k).all()
  np.testing.assert_allclose(mixed[sparse == 0], floor, rtol=1e-12)
  # Different domains use different supports for the same previous token.
  assert not np.array_equal(sparse[0] > 0, sparse[1] > 0)


def test_start_is_stationary(lang):
  pi = lang.start
  assert pi.shape == (lang.num_domains, lang.vocab_size)
  assert (pi > 0).all()
  np.testing.assert_allclose(pi.sum(-1), 1.0, atol=1e-12)
  np.testing.assert_allclose(
      np.einsum('nv,nvw->nw', pi, lang.transition), pi, atol=1e-14)


@pytest.mark.parametrize('kwargs', [{}, dict(seed=2, **SMALL)])
def test_entropy_floor_matches_monte_carlo(kwargs):
  lang = SyntheticMixture(**kwargs)
  b, length = 3000, 48
  tokens, domain = lang.sample(np.random.default_rng(123), b, length)
  h = lang.entropy_rate()
  # Sequences are i.i.d., so the standard error of the mean per-token NLL is
  # estimated from per-sequence means (this accounts for correlations
  # between positions of one sequence). 4 standard errors make a spurious
  # failure a ~1e-4 event while a wrong table/sampler/posterior (errors of
  # ~0.05 nats or more) still fails.
  nll = lang.optimal_nll(tokens).mean(axis=1)
  se = nll.std(ddof=1) / np.sqrt(b)
  # Bayes floor = H + I(domain; X_1..X_{L-1} | X_0) / (L - 1), where
  # 0 <= I <= log N: it lies above the entropy rate by at most log(N)/(L-1).
  assert nll.mean() >= h - 4 * se
  assert nll.mean() <= h + np.log(lang.num_domains) / (length - 1) + 4 * se
  # The domain-aware NLL of the same samples estimates H itself (stationary
  # start), checking the sampler against the tables.
  logp = lang.log_transition[domain[:, None], tokens[:, :-1], tokens[:, 1:]]
  known = -logp.mean(axis=1)
  se_known = known.std(ddof=1) / np.sqrt(b)
  assert abs(known.mean() - h) <= 4 * se_known
  # Not knowing the domain costs something on the first predictions.
  assert nll.mean() > known.mean()
  # Restart jumps off the sparse support happen at rate eps * (1 - K / V):
  # a Poisson count, checked to 5 standard deviations.
  off = lang.sparse_transition[domain[:, None], tokens[:, :-1],
                               tokens[:, 1:]] == 0
  expected = off.size * RESTART_EPS * (1 - lang.support / lang.vocab_size)
  assert abs(off.sum() - expected) <= 5 * np.sqrt(expected)


def _naive_nll(lang, seq):
  """Slow reference: explicit posterior over domains, probability space."""
  n = lang.num_domains
  post = [lang.start[d][seq[0]] / n for d in range(n)]
  total = sum(post)
  post = [p / total for p in post]
  out = []
  for t in range(1, len(seq)):
    probs = [lang.transition[d][seq[t - 1]][seq[t]] for d in range(n)]
    pred = sum(post[d] * probs[d] for d in range(n))
    out.append(-np.log(pred))
    post = [post[d] * probs[d] / pred for d in range(n)]
  return np.array(out)


@pytest.mark.parametrize('seed', [0, 1])
def test_optimal_nll_matches_naive_loop(seed):
  lang = SyntheticMixture(seed=seed, **SMALL)
  rng = np.random.default_rng(seed)
  sampled, _ = lang.sample(rng, 3, 9)
  arbitrary = rng.integers(0, lang.vocab_size, size=(2, 9))  # Off-support.
  tokens = np.concatenate([sampled, arbitrary])
  fast = lang.optimal_nll(tokens)
  assert fast.shape == (5, 8) and fast.dtype == np.float64
  for i, seq in enumerate(tokens):
    np.testing.assert_allclose(fast[i], _naive_nll(lang, seq), rtol=0,
                               atol=1e-9)


def test_domain_inferable_from_short_prefix(lang):
  tokens, domain = lang.sample(np.random.default_rng(5), 500, 8)
  loglik = np.log(lang.start[:, tokens[:, 0]]).T
  loglik += lang.log_transition[:, tokens[:, :-1], tokens[:, 1:]].sum(-1).T
  assert (loglik.argmax(1) == domain).mean() > 0.95


def test_empirical_frequencies_match_tables():
  lang = SyntheticMixture(seed=2, **SMALL)
  tokens, domain = lang.sample(np.random.default_rng(9), 4000, 30)
  # First and last tokens are both distributed as the stationary start.
  for pos in (0, -1):
    for d in range(lang.num_domains):
      freq = np.bincount(tokens[domain == d, pos], minlength=12) / (
          domain == d).sum()
      # >= 1200 draws per domain: std <= 0.5 / sqrt(1200) < 0.015.
      assert np.abs(freq - lang.start[d]).max() < 0.06
  counts = np.zeros_like(lang.transition)
  np.add.at(counts, (domain[:, None], tokens[:, :-1], tokens[:, 1:]), 1)
  rows = counts.sum(-1, keepdims=True)
  freq = counts / np.maximum(rows, 1)
  ok = rows[..., 0] > 400
  assert ok.sum() > 10
  # Binomial std of a frequency <= 0.5 / sqrt(400) = 0.025; 0.1 is 4 sigma.
  assert np.abs(freq - lang.transition)[ok].max() < 0.1


@pytest.mark.parametrize('kwargs', [
    dict(num_domains=0), dict(vocab_size=1), dict(support=0),
    dict(vocab_size=4, support=5), dict(alpha=0.0)])
def test_bad_config_raises(kwargs):
  with pytest.raises(ValueError, match=next(iter(kwargs))):
    SyntheticMixture(**kwargs)


def test_optimal_nll_rejects_bad_tokens(lang):
  with pytest.raises(ValueError, match='tokens'):
    lang.optimal_nll(np.zeros(5, dtype=np.int32))
  with pytest.raises(ValueError, match='tokens'):
    lang.optimal_nll(np.full((1, 3), lang.vocab_size))
