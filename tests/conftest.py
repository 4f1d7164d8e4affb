"""Shared pytest set-up: hypothesis profiles, test keys, all-pairs cases.

Hypothesis runs derandomized by default ('ci': the examples are a fixed
function of each test, the same on every machine and every run, so CI
cannot fail by chance and a failure replays as is). For a randomised search
locally set MOEJAX_HYPOTHESIS=dev (or pass --hypothesis-profile=dev):
new examples on every run, failures kept in .hypothesis/ and replayed
first. Both are modest (40 examples) and deadline-free (the first example
of a shape pays its compile).
"""

import os

import hypothesis

_COMMON = dict(max_examples=40, deadline=None,
               suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.register_profile('ci', derandomize=True, database=None,
                                     **_COMMON)
hypothesis.settings.register_profile('dev', print_blob=True, **_COMMON)
hypothesis.settings.load_profile(os.environ.get('MOEJAX_HYPOTHESIS', 'ci'))


def init_key(seed: int):
  """A PRNG key for initialising test modules.

  'rbg' keys compile their random draws several times faster than the
  default threefry on CPU (init of a fresh shape drops from ~6 s to ~1.5 s
  here); tests that need threefry's cross-sharding guarantees don't use it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  return jax.random.key(seed, impl='rbg')


def pairwise(factors, allowed=lambda case: True):
  """A covering set of test cases: every pair of factor values appears.

  The full product of many factors is mostly redundant for bugs that
  involve at most two of them; this greedy all-pairs design keeps every
  allowed pair of values (e.g. each top-k with each capacity factor, each
  capacity factor with each priority) in at least one case, usually with a
  fraction of the product's cases. Deterministic: the candidate covering
  the most new pairs wins, ties going to the earliest in product order.

  Args:
    factors: sequence of value lists, one per factor.
    allowed: case tuple -> bool, e.g. top_k <= num_experts.

  Returns:
    list of case tuples (one value per factor).
  """
  import itertools  # pylint: disable=g-import-not-at-top
  candidates = [c for c in itertools.product(*factors) if allowed(c)]

  def pairs(case):
    return {(i, case[i], j, case[j])
            for i, j in itertools.combinations(range(len(case)), 2)}

  uncovered = set().union(*map(pairs, candidates))
  chosen = []
  while uncovered:
    best = max(candidates, key=lambda c: len(pairs(c) & uncovered))
    chosen.append(best)
    uncovered -= pairs(best)
  return chosen
