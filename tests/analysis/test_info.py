"""NMI and friends on hand-computed cases (numpy only, no compiles)."""

import math

import numpy as np
import pytest

from moejax.analysis import info


def test_perfect_alignment_is_one():
  # Experts are a relabelling of the domains: a bijection -> NMI 1.
  domain = np.array([0, 0, 1, 1, 2, 2, 2, 0])
  expert = np.array([2, 2, 0, 0, 1, 1, 1, 2])
  assert info.normalized_mutual_information(expert, domain) == pytest.approx(
      1.0, abs=1e-12)


def test_independence_is_zero():
  # Every (expert, domain) pair equally often: the joint factorises exactly.
  expert, domain = np.meshgrid(np.arange(4), np.arange(3), indexing='ij')
  expert, domain = np.tile(expert.ravel(), 5), np.tile(domain.ravel(), 5)
  assert info.mutual_information(info.contingency(expert, domain)) == 0.0
  assert info.normalized_mutual_information(expert, domain) == 0.0


def test_random_independent_labels_near_zero():
  # Independent draws: the plug-in MI is only the finite-sample bias,
  # about (E - 1)(N - 1) / (2 T) = 7 * 7 / 40000 nats ~ 0.0012 nats.
  rng = np.random.default_rng(0)
  expert, domain = rng.integers(0, 8, 20000), rng.integers(0, 8, 20000)
  mi = info.mutual_information(info.contingency(expert, domain))
  assert 0.0 < mi < 0.004
  assert info.normalized_mutual_information(expert, domain) < 0.002


def test_intermediate_symmetric_case():
  # Joint counts [[3, 1], [1, 3]]: uniform marginals, H = ln 2 each, and
  # I = ln 2 - H(1/4 | 3/4) in nats, so NMI = 1 - h2(1/4) with h2 the binary
  # entropy in bits: 1 - 0.811278 = 0.188722.
  joint = np.array([[3, 1], [1, 3]])
  h2 = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
  assert info.nmi_from_joint(joint) == pytest.approx(1 - h2, abs=1e-12)
  assert info.mutual_information(joint) == pytest.approx(
      (1 - h2) * math.log(2), abs=1e-12)
  # The same table from label arrays.
  expert = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  domain = np.array([0, 0, 0, 1, 0, 1, 1, 1])
  assert info.normalized_mutual_information(expert, domain) == pytest.approx(
      1 - h2, abs=1e-12)


def test_arithmetic_normalisation():
  # 4 equally used experts, domain = expert // 2: I = H(domain) = ln 2,
  # H(expert) = ln 4, so NMI = ln 2 / ((ln 2 + ln 4) / 2) = 2 / 3 (sqrt
  # normalisation would give 0.707, max 0.5, min 1.0).
  expert = np.repeat(np.arange(4), 10)
  domain = expert // 2
  result = info.score_layer(expert.reshape(4, 10), domain[::10], None, 0)
  assert result['nmi'] == pytest.approx(2 / 3, abs=1e-12)
  assert result['uncertainty'] == pytest.approx(1.0, abs=1e-12)
  assert result['mi'] == pytest.approx(math.log(2), abs=1e-12)
  assert math.isnan(result['nmi_shuffled'])


def test_degenerate_cases():
  assert info.normalized_mutual_information([0, 0, 0], [1, 1, 1]) == 0.0
  assert info.normalized_mutual_information([0, 0, 1], [0, 0, 0]) == 0.0
  with pytest.raises(ValueError, match='same size'):
    info.contingency([0, 1], [0])
  with pytest.raises(ValueError, match='>= 0'):
    info.contingency([0, -1], [0, 0])


def test_score_layer_skips_padding_and_shuffles_by_sequence():
  # 4 sequences of 3 tokens; expert = domain everywhere except the padding
  # positions, which hold garbage and must be ignored -> NMI exactly 1.
  domain = np.array([0, 1, 0, 1])
  expert = np.repeat(domain[:, None], 3, axis=1)
  valid = np.ones((4, 3), bool)
  valid[:, 2] = False
  expert[:, 2] = 5
  result = info.score_layer(expert, domain, valid, num_shuffles=20, seed=1)
  assert result['nmi'] == pytest.approx(1.0)
  assert result['tokens'] == 8
  # Permuting the 4 domain labels across sequences gives either the same
  # assignment up to relabelling (NMI 1: permutations keeping the pairs
  # {0, 2} / {1, 3} apart, 8 of 24) or a fully mixed one (NMI 0), so the
  # chance level lies strictly between, far below 1.
  assert 0.0 < result['nmi_shuffled'] < 1.0
  # Reference: the mean over all 24 permutations is 8 / 24 = 1 / 3.
  assert abs(info.shuffled_nmi(expert, domain, valid, 2000, 0) - 1 / 3) < 0.05
