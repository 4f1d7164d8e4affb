"""Expert specialisation: mutual information between routing and the domain.

Axis letters: B batch (sequences), L sequence length, E experts, N domains,
T tokens.

The score of one MoE layer is the normalised mutual information between a
token's top-1 expert X (the router's first choice, in eval mode, *before*
capacity: a token whose assignment was dropped still counts for the expert it
chose) and the domain id Y of the sequence it belongs to, over the valid
(non-padding) eval tokens:

    NMI(X; Y) = I(X; Y) / ((H(X) + H(Y)) / 2)          (arithmetic mean)

with plug-in (empirical-frequency) entropies in nats. NMI is 1 iff X and Y
determine each other (a bijection between used experts and domains), 0 iff
the empirical joint factorises. It is 0 by definition when H(X) + H(Y) = 0
(one expert and one domain: nothing to explain). Note that with more experts
than domains a perfectly specialised router that splits each domain over
several experts scores 2 H(Y) / (H(X) + H(Y)) < 1, e.g. 2/3 for 4 uniformly
used experts and 2 domains (each expert serving one domain); `mi` in nats
and the uncertainty coefficient I / H(Y) are returned alongside for that
reading.

Finite-sample bias: the plug-in I is biased upwards; for T independent
tokens by about (E' - 1)(N' - 1) / (2 T) nats (E', N' the used experts and
domains). Tokens of one sequence share its domain and usually correlated
routing, so the effective sample size is closer to the number of sequences
and the bias can be far larger. The chance level is therefore measured, not
assumed: `nmi_shuffled` is the mean NMI after permuting the domain ids
*across sequences* (every token of a sequence keeps a common, wrong domain),
averaged over `num_shuffles` permutations. A score is meaningful only well
above its `nmi_shuffled`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


# ------------------------------------------------------------ information
def contingency(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Joint counts of two integer label arrays.

  Args:
    x: [T] non-negative ints (e.g. top-1 expert).
    y: [T] non-negative ints (e.g. domain id).

  Returns:
    [max(x) + 1, max(y) + 1] int64 counts; [0, 0] if T = 0.
  """
  x = np.asarray(x, np.int64).ravel()
  y = np.asarray(y, np.int64).ravel()
  if x.shape != y.shape:
    raise ValueError(f'x and y must have the same size, got {x.size} and '
                     f'{y.size}.')
  if x.size == 0:
    return np.zeros((0, 0), np.int64)
  if x.min() < 0 or y.min() < 0:
    raise ValueError('labels must be >= 0 (filter padding and unknown '
                     'domains out first).')
  nx, ny = int(x.max()) + 1, int(y.max()) + 1
  return np.bincount(x * ny + y, minlength=nx * ny).reshape(nx, ny)


def entropy(counts: np.ndarray) -> float:
  """Plug-in entropy (nats) of the distribution proportional to `counts`."""
  p = np.asarray(counts, np.float64).ravel()
  total = p.sum()
  if total <= 0:
    return 0.0
  p = p[p > 0] / total
  return float(-np.sum(p * np.log(p)))


def mutual_information(joint: np.ndarray) -> float:
  """Plug-in mutual information (nats) of a [A, B] table of joint counts.

  I = sum_ab p_ab log(p_ab / (p_a p_b)), clipped at 0 against round-off.
  """
  joint = np.asarray(joint, np.float64)
  total = joint.sum()
  if total <= 0:
    return 0.0
  p = joint / total
  outer = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)  # [A, B]
  nz = p > 0
  return max(float(np.sum(p[nz] * np.log(p[nz] / outer[nz]))), 0.0)


def nmi_from_joint(joint: np.ndarray) -> float:
  """NMI with arithmetic-mean normalisation of a joint count table [A, B].

  Returns:
    I / ((H_A + H_B) / 2) in [0, 1]; 0 when H_A + H_B = 0.
  """
  joint = np.asarray(joint, np.float64)
  norm = 0.5 * (entropy(joint.sum(1)) + entropy(joint.sum(0)))
  if norm <= 0:
    return 0.0
  return min(mutual_information(joint) / norm, 1.0)


def normalized_mutual_information(x: np.ndarray, y: np.ndarray) -> float:
  """NMI(x; y) of two label arrays (see the module docstring).

  Args:
    x: [T] non-negative ints.
    y: [T] non-negative ints.

  Returns:
    float in [0, 1].
  """
  return nmi_from_joint(contingency(x, y))


def shuffled_nmi(expert: np.ndarray, domain: np.ndarray,
                 valid: Optional[np.ndarray] = None, num_shuffles: int = 8,
                 seed: int = 0) -> float:
  """Chance level of the NMI: domains permuted across sequences.

  Args:
    expert: [B, L] top-1 expert per token.
    domain: [B] domain per sequence.
    valid: optional [B, L] bool, False = padding (left out).
    num_shuffles: permutations averaged (>= 1).
    seed: seed of the permutations (numpy default_rng).

  Returns:
    Mean NMI over the permutations.
  """
  expert = np.asarray(expert)
  valid = np.ones(expert.shape, bool) if valid is None else np.asarray(valid)
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(num_shuffles):
    perm = rng.permutation(np.asarray(domain))
    labels = np.broadcast_to(perm[:, None], expert.shape)  # [B, L]
    values.append(normalized_mutual_information(expert[valid], labels[valid]))
  return float(np.mean(values))


def score_layer(expert: np.ndarray, domain: np.ndarray,
                valid: Optional[np.ndarray] = None, num_shuffles: int = 8,
                seed: int = 0) -> dict[str, float]:
  """All specialisation numbers of one layer.

  Args:
    expert: [B, L] top-1 expert per token.
    domain: [B] domain id per sequence (>= 0).
    valid: optional [B, L] bool, False = padding.
    num_shuffles: permutations for `nmi_shuffled` (0: skip it).
    seed: permutation seed.

  Returns:
    {'nmi', 'nmi_shuffled' (NaN if num_shuffles = 0), 'mi' (nats),
    'uncertainty' (I / H(domain), the fraction of the domain's entropy the
    expert explains; 0 if H(domain) = 0), 'tokens'}.
  """
  expert = np.asarray(expert)
  valid = np.ones(expert.shape, bool) if valid is None else np.asarray(valid)
  labels = np.broadcast_to(np.asarray(domain)[:, None], expert.shape)
  joint = contingency(expert[valid], labels[valid])  # [E', N']
  mi = mutual_information(joint)
  h_domain = entropy(joint.sum(0))
  return {
      'nmi': nmi_from_joint(joint),
      'nmi_shuffled': (shuffled_nmi(expert, domain, valid, num_shuffles, seed)
                       if num_shuffles else float('nan')),
      'mi': mi,
      'uncertainty': mi / h_domain if h_domain > 0 else 0.0,
      'tokens': int(valid.sum()),
  }
