"""Synthetic "mixture of domains" language with an exactly known entropy floor.

Each of the N domains is a first-order Markov chain (a bigram model) over a
shared vocabulary of V tokens. For every (domain, previous token) pair the
next-token distribution puts its mass on ``support`` randomly chosen tokens,
with Dirichlet(``alpha``) weights. Different domains pick different supports,
so (a) a model that must fit all domains at once benefits from parameter
capacity and (b) the domain can be inferred from a short prefix.

Stationarity and the epsilon restart
------------------------------------
A random sparse chain may be reducible (several closed classes) or periodic,
in which case its stationary distribution is not unique or power iteration
does not converge. We therefore mix every row with a tiny uniform "restart":

    T[d] = (1 - RESTART_EPS) * S[d] + RESTART_EPS / V,

where ``S[d]`` is the sparse chain. ``T[d]`` is strictly positive, hence
irreducible and aperiodic, and its unique stationary distribution is obtained
exactly from one linear solve,

    pi_d (I - (1 - eps) S[d]) = (eps / V) * 1^T.

The SAME mixed chain ``T`` is used everywhere (sampling, ``optimal_nll``,
``entropy_rate``), and the start distribution of domain d is its stationary
distribution ``pi_d``. Every sequence is therefore stationary from position 0,
so every position has the same conditional entropy given the domain, and the
per-token Bayes floor of a finite sequence differs from ``entropy_rate()``
only by the cost of inferring the domain (at most log(N) / (L - 1) nats).
Consequently, each row of ``T`` has exactly ``support`` entries strictly above
the floor ``RESTART_EPS / V`` and all other entries equal to that floor.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

RESTART_EPS = 1e-3
"""Probability of a uniform restart token at every step (see module doc)."""


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
  """Stable log(sum(exp(x))) along ``axis`` (removed); x must be finite."""
  m = np.max(x, axis=axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


@dataclasses.dataclass(frozen=True)
class SyntheticMixture:
  """Mixture of N sparse random bigram chains over a shared vocabulary.

  Attributes:
    num_domains: N, number of domains (Markov chains).
    vocab_size: V, shared vocabulary size.
    support: number of allowed next tokens per (domain, previous token).
    alpha: Dirichlet concentration of the weights over the support.
    seed: seed of ``np.random.default_rng`` that draws all tables.

  Derived tables (float64, computed lazily and cached):
    sparse_transition: [N, V, V] the sparse chains S (rows sum to 1).
    transition: [N, V, V] the mixed chains T actually used (rows sum to 1).
    log_transition: [N, V, V] log of ``transition``.
    start: [N, V] start distribution = stationary distribution of T[d].
  """

  num_domains: int = 8
  vocab_size: int = 256
  support: int = 8
  alpha: float = 0.5
  seed: int = 0

  def __post_init__(self):
    if self.num_domains < 1:
      raise ValueError(f'num_domains must be >= 1, got {self.num_domains}')
    if self.vocab_size < 2:
      raise ValueError(f'vocab_size must be >= 2, got {self.vocab_size}')
    if not 1 <= self.support <= self.vocab_size:
      raise ValueError(
          f'support must be in [1, vocab_size={self.vocab_size}], '
          f'got {self.support}')
    if not self.alpha > 0:
      raise ValueError(f'alpha must be > 0, got {self.alpha}')

  # ---------------------------------------------------------------- tables
  @functools.cached_property
  def _sparse(self) -> tuple[np.ndarray, np.ndarray]:
    """Draws supports [N, V, K] (int64, sorted) and weights [N, V, K]."""
    n, v, k = self.num_domains, self.vocab_size, self.support
    rng = np.random.default_rng(self.seed)
    keys = rng.random((n, v, v))
    idx = np.sort(np.argpartition(keys, k - 1, axis=-1)[..., :k], axis=-1)
    weights = rng.dirichlet(np.full(k, float(self.alpha)), size=(n, v))
    return idx, weights

  @functools.cached_property
  def sparse_transition(self) -> np.ndarray:
    """[N, V, V] float64 sparse chains S (exactly ``support`` nonzeros/row)."""
    idx, weights = self._sparse
    n, v = self.num_domains, self.vocab_size
    table = np.zeros((n, v, v), dtype=np.float64)
    np.put_along_axis(table, idx, weights, axis=-1)
    return table

  @functools.cached_property
  def transition(self) -> np.ndarray:
    """[N, V, V] float64 mixed chains T = (1 - eps) S + eps / V."""
    eps, v = RESTART_EPS, self.vocab_size
    return (1.0 - eps) * self.sparse_transition + eps / v

  @functools.cached_property
  def log_transition(self) -> np.ndarray:
    """[N, V, V] float64 log of ``transition`` (finite everywhere)."""
    return np.log(self.transition)

  @functools.cached_property
  def _log_transition_vvn(self) -> np.ndarray:
    """[V, V, N] contiguous copy of ``log_transition`` for fast gathers."""
    return np.ascontiguousarray(np.moveaxis(self.log_transition, 0, -1))

  @functools.cached_property
  def start(self) -> np.ndarray:
    """[N, V] float64 stationary distribution of each mixed chain T[d].

    Solves pi (I - (1 - eps) S) = (eps / V) 1^T exactly (the matrix is
    strictly diagonally dominant by columns, condition number <= 2 / eps).
    """
    eps, v = RESTART_EPS, self.vocab_size
    eye = np.eye(v)[None]
    lhs = np.swapaxes(eye - (1.0 - eps) * self.sparse_transition, -1, -2)
    rhs = np.full((self.num_domains, v, 1), eps / v)
    pi = np.linalg.solve(lhs, rhs)[..., 0]
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum(axis=-1, keepdims=True)

  # -------------------------------------------------------------- sampling
  def sample(self, rng: np.random.Generator, num: int,
             length: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples sequences; the domain of each is uniform over the N domains.

    Vectorised over examples (loops over positions only). Each step draws a
    uniform restart token with probability RESTART_EPS and otherwise a token
    from the sparse support, which is an exact draw from ``transition``.

    Args:
      rng: numpy Generator that supplies all randomness.
      num: B, number of sequences.
      length: L, tokens per sequence (>= 1).

    Returns:
      tokens: [B, L] int32 in [0, V).
      domain: [B] int32 in [0, N).
    """
    if num < 0 or length < 1:
      raise ValueError(f'need num >= 0 and length >= 1, got {num}, {length}')
    idx, weights = self._sparse
    cum = np.cumsum(weights, axis=-1)
    v = self.vocab_size
    domain = rng.integers(0, self.num_domains, size=num)
    tokens = np.empty((num, length), dtype=np.int64)
    start_cdf = np.cumsum(self.start, axis=-1)[domain]  # [B, V]
    u0 = rng.random(num) * start_cdf[:, -1]
    tokens[:, 0] = np.minimum((start_cdf < u0[:, None]).sum(-1), v - 1)
    for t in range(1, length):
      prev = tokens[:, t - 1]
      row_cdf = cum[domain, prev]  # [B, K]
      u = rng.random(num) * row_cdf[:, -1]
      pick = np.minimum((row_cdf < u[:, None]).sum(-1), self.support - 1)
      nxt = idx[domain, prev, pick]
      restart = rng.random(num) < RESTART_EPS
      uniform = rng.integers(0, v, size=num)
      tokens[:, t] = np.where(restart, uniform, nxt)
    return tokens.astype(np.int32), domain.astype(np.int32)

  # ----------------------------------------------------------- likelihood
  def optimal_nll(self, tokens: np.ndarray) -> np.ndarray:
    """Per-position NLL of the Bayes-optimal predictor that does not know d.

    The predictor keeps the posterior over domains given the prefix (prior
    uniform, first token scored by the start distributions) and predicts the
    posterior-weighted mixture of the domains' next-token rows. Computed in
    log space, vectorised over the batch.

    Args:
      tokens: [B, L] integer tokens in [0, V).

    Returns:
      [B, L-1] float64: -log p(tokens[:, t] | tokens[:, :t]) for t = 1..L-1.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f'tokens must be [B, L], got shape {tokens.shape}')
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
      raise ValueError(f'tokens must lie in [0, {self.vocab_size})')
    b, length = tokens.shape
    tokens = tokens.astype(np.int64)
    log_start = np.log(self.start)  # [N, V]
    # log joint of (domain, prefix), normalised to a log posterior each step.
    log_post = log_start[:, tokens[:, 0]].T - np.log(self.num_domains)
    log_post -= _logsumexp(log_post, axis=1)[:, None]  # [B, N]
    nll = np.empty((b, max(length - 1, 0)), dtype=np.float64)
    for t in range(1, length):
      step = self._log_transition_vvn[tokens[:, t - 1], tokens[:, t]]  # [B, N]
      joint = log_post + step
      log_pred = _logsumexp(joint, axis=1)  # [B]
      nll[:, t - 1] = -log_pred
      log_post = joint - log_pred[:, None]
    return nll

  def entropy_rate(self) -> float:
    """Analytic H(X_t | X_{t-1}, domain), averaged uniformly over domains.

    Uses each mixed chain's (unique) stationary distribution, which is also
    the start distribution, so this is the exact expected per-token NLL of a
    predictor that knows the domain. The Bayes floor on finite sequences
    (``optimal_nll``) is slightly above this because the domain must be
    inferred from the prefix: in expectation by I(domain; X_{1:L-1} | X_0)
    / (L - 1) <= log(N) / (L - 1) nats per token.

    Returns:
      Entropy rate in nats per token.
    """
    p = self.transition
    row_entropy = -np.sum(p * self.log_transition, axis=-1)  # [N, V]
    per_domain = np.sum(self.start * row_entropy, axis=-1)  # [N]
    return float(per_domain.mean())
