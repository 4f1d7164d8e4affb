"""The 'ragged' dispatcher against the naive loop (tests/reference.py): every
overflow priority with every activation, with padding and drops.

Axis letters as in moejax/layers.py: B batch, L length, D width, F expert
width, E experts, K choices, G groups, S tokens per group, C capacity.

tests/test_routers.py compares 'ragged' with 'gather' (values and
gradients) for one activation and the default priority, and
tests/sharding/multidevice_checks.py runs it on an 8-device mesh; here the
routing options that change *which* assignments are kept (priority,
padding, capacity) meet every FFN the experts support.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import capacity as capacity_lib
from moejax import routing
from moejax.experts import ACTIVATIONS
from tests import reference
from tests.conftest import pairwise

B, L, D, F, E = 2, 12, 8, 16, 4  # G = B groups of S = L tokens
# Padding: the last 3 tokens of sequence 0 and the first of sequence 1.
PADDING = np.zeros((B, L), bool)
PADDING[0, -3:] = PADDING[1, 0] = True
# (capacity factor, C) with K = 2 (with K = 1, 'choice' and 'token' order
# the requests alike) and min_capacity 0: C = ceil(cf * S * K / E) =
# ceil(.5 * 12 * 2 / 4) = 3 and ceil(.75 * 12 * 2 / 4) = ceil(4.5) = 5 slots
# per expert, for 18 / 4 = 4.5 and 22 / 4 = 5.5 requests on average (the 9
# and 11 valid tokens of groups 0 and 1, 2 choices each).
K = 2
DROPS = [(0.5, 3), (0.75, 5)]


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


def _inputs(layer, seed):
  """x [B, L, D] and params drawn with numpy (no init program to compile):
  a decisive router (Normal(0, 2): no near-ties in top-K), drawn before the
  experts (Normal(0, 0.5)) so the routing does not depend on the activation.
  """
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  router = jnp.asarray(2.0 * rng.standard_normal((D, E)), jnp.float32)
  abstract = jax.eval_shape(layer.init, jax.random.key(0), x)['params']
  experts = jax.tree.map(
      lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), a.dtype),
      abstract['experts'])
  return x, {'router': {'kernel': router}, 'experts': experts}


def _flat(params):
  return {'router': params['router']['kernel'], **params['experts']}


# Every (priority, activation) pair, each with drops: 12 cases.
CASES = pairwise([list(routing.PRIORITIES), list(ACTIVATIONS), DROPS])


@pytest.mark.parametrize('priority,activation,drops', CASES,
                         ids=[f'{p}-{a}-cf{d[0]}' for p, a, d in CASES])
def test_ragged_matches_naive_loop(priority, activation, drops):
  cf, c = drops
  layer = moejax.MoeLayer(num_experts=E, d_ff=F, top_k=K, capacity_factor=cf,
                          eval_capacity_factor=cf, min_capacity=0,
                          priority=priority, dispatcher='ragged',
                          activation=activation)
  x, params = _inputs(layer, seed=0)
  y, aux = jax.jit(layer.apply)({'params': params}, x, jnp.asarray(PADDING))
  assert capacity_lib.compute_capacity(L, E, K, cf, 0) == c
  assert float(aux['capacity']) == c
  assert float(aux['drop_fraction']) > 0  # the drop path is exercised
  want = reference.moe_layer(np.asarray(x), ~PADDING, _flat(params), K, c,
                             priority, activation)
  np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(y[PADDING], 0.0)  # padding: exactly zero
  # The case tells the priorities apart: the loop with another priority
  # keeps other assignments, so a dispatcher that kept the wrong ones (or
  # all of them) would fail above.
  for other in [p for p in routing.PRIORITIES if p != priority]:
    theirs = reference.moe_layer(np.asarray(x), ~PADDING, _flat(params), K,
                                 c, other, activation)
    assert np.abs(theirs - want).max() > 1e-3, other
