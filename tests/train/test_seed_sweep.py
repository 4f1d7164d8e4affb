"""README, Determinism: "The seed is an argument of the compiled train step,
so a seed sweep compiles it only once."

The runs of a sweep are separate processes (experiments/sweep); what they
share is JAX's persistent compilation cache (<workdir>/.jax_cache). So here
the train steps of seeds 0 and 1 are built as two runs build them
(`make_train_step`) and run against one fresh cache, counting XLA compiles
with jax.monitoring's events: the second seed must load the first's
program. Were the seed a compile-time constant (a static argument, or a
value the step closes over), its program would differ and compile again.

The model is a toy defined here, so the test compiles in about a second and
does not depend on any router.
"""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax.train import create_train_state
from moejax.train import make_train_step
from tests.train import helpers

V = 8  # vocab
REQUESTS = '/jax/compilation_cache/compile_requests_use_cache'
HITS = '/jax/compilation_cache/cache_hits'


class _NoisyBigramLM(nn.Module):
  """logits[b, l] = table[tokens[b, l]] (+ Normal noise drawn from the
  'router' RNG in training, as a router's jitter or GShard's random second
  expert would): the train step's result depends on the seed."""

  @nn.compact
  def __call__(self, tokens, padding_mask=None, deterministic=True):
    del padding_mask
    table = self.param('table', nn.initializers.normal(1.0), (V, V))
    logits = table[tokens]  # [B, L, V]
    if not deterministic:
      logits = logits + jax.random.normal(self.make_rng('router'),
                                          logits.shape)
    zero = jnp.zeros((), jnp.float32)
    return logits, {'layers': {}, 'aux_loss': zero, 'z_loss': zero,
                    'drop_fraction': zero, 'max_violation': zero}


def test_a_seed_sweep_compiles_the_train_step_once(tmp_path):
  model, optimizer = _NoisyBigramLM(), optax.adamw(0.1)
  tokens = jnp.array([[0, 1, 2, 3, 4], [5, 6, 7, 0, 1]], jnp.int32)
  # One state per run (the step donates it), made before counting.
  states = {seed: create_train_state(model, optimizer, (2, 4), seed=0)
            for seed in (0, 1)}
  events = collections.Counter()
  count = lambda name, **kwargs: events.update([name])
  seen, losses = [], {}
  with helpers.persistent_compilation_cache(tmp_path / 'jax_cache'):
    jax.monitoring.register_event_listener(count)
    try:
      for seed in (0, 1):
        step = make_train_step(model, optimizer, seed=seed)
        _, metrics = step(states[seed], tokens)
        losses[seed] = float(metrics['loss'])
        seen.append((events[REQUESTS], events[HITS]))
    finally:
      jax.monitoring.unregister_event_listener(count)
  # (compile requests, persistent cache hits) after each seed's first step:
  # seed 0 compiles (1, 0); seed 1 asks again and is answered from the
  # cache (2, 1). One XLA compile in all: requests - hits = 1.
  assert seen == [(1, 0), (2, 1)], seen
  # The shared program still takes the seed: the noise, hence the loss,
  # differs.
  assert np.isfinite(losses[0]) and losses[0] != losses[1], losses
