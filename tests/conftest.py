"""Shared pytest set-up: a modest, deadline-free hypothesis profile."""

import hypothesis

hypothesis.settings.register_profile(
    'moejax', max_examples=40, deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile('moejax')


def init_key(seed: int):
  """A PRNG key for initialising test modules.

  'rbg' keys compile their random draws several times faster than the
  default threefry on CPU (init of a fresh shape drops from ~6 s to ~1.5 s
  here); tests that need threefry's cross-sharding guarantees don't use it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  return jax.random.key(seed, impl='rbg')
