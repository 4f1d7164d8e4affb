"""MoeLayer against a naive loop; einsum == gather; jitter and eval semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from tests.conftest import init_key
from tests.conftest import pairwise
from moejax import capacity as capacity_lib
from tests import reference

D, F = 8, 16


@pytest.fixture(autouse=True)
def _exact_matmuls():
  # GPUs and TPUs run float32 matmuls at reduced precision (TF32 / bf16
  # passes) by default; these tests compare against exact references.
  with jax.default_matmul_precision('highest'):
    yield


def _flat_params(variables):
  p = variables['params']
  flat = {'router': p['router']['kernel']}
  flat.update(p['experts'])
  return flat


def _x(b=2, l=12, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, l, D))


# Every pair of (activation, dispatcher, drop setting) in 16 of 32 cases.
@pytest.mark.parametrize('activation,dispatcher,drops', pairwise([
    ['relu', 'gelu', 'swiglu', 'geglu'], ['einsum', 'gather'],
    [(None, 'choice'), (0.5, 'choice'), (0.5, 'token'), (0.75, 'score')]]))
def test_layer_matches_naive_loop(activation, dispatcher, drops):
  cf, priority = drops
  # cf=None: nothing drops, y = sum_k w_k FFN_{e_k}(x). cf=0.5 with S=12,
  # E=4, K=2: C = ceil(.5*12*2/4) = 3 < 6 slots needed on average, so many
  # assignments drop and must contribute exactly 0.
  layer = moejax.MoeLayer(num_experts=4, d_ff=F, top_k=2, capacity_factor=cf,
                          eval_capacity_factor=cf, min_capacity=0,
                          priority=priority, dispatcher=dispatcher,
                          activation=activation)
  x = _x()
  padding = jnp.zeros((2, 12), bool).at[1, 3:5].set(True)
  variables = layer.init(init_key(1), x)
  # Make the router decisive so top-K has no near-ties.
  variables['params']['router']['kernel'] *= 20.0
  y, aux = layer.apply(variables, x, padding)
  c = capacity_lib.compute_capacity(12, 4, 2, cf, 0)
  expected = reference.moe_layer(np.asarray(x), ~np.asarray(padding),
                                 _flat_params(variables), 2, c, priority,
                                 activation)
  np.testing.assert_allclose(y, expected, rtol=2e-5, atol=2e-5)
  if cf is not None:
    assert float(aux['drop_fraction']) > 0.1  # the drop path is exercised
  np.testing.assert_array_equal(y[1, 3:5], 0.0)  # padding gets zero output


def _grid():
  # Every pair of values of (E, K, capacity factor, priority) with K <= E,
  # in 21 cases (the full product has 135): see conftest.pairwise.
  return pairwise([[1, 2, 8, 32], [1, 2, 4], [0.5, 1.0, 1.25, 2.0, None],
                   ['choice', 'token', 'score']],
                  allowed=lambda case: case[1] <= case[0])


# Row 0 of each mask: no padding; row 1: padding at [0, 5:] and [1, 0].
_PADDINGS = jnp.zeros((2, 2, 8), bool).at[1, 0, 5:].set(True).at[1, 1, 0].set(
    True)


@pytest.mark.parametrize('e,k,cf,priority', _grid())
def test_einsum_equals_gather(e, k, cf, priority):
  # Same params, same decision: outputs and gradients w.r.t. the input and
  # every parameter agree, without and with padding (vmapped over masks).
  x = _x(2, 8, seed=e + k)
  layers = {name: moejax.MoeLayer(num_experts=e, d_ff=F, top_k=k,
                                  capacity_factor=cf, priority=priority,
                                  min_capacity=1, dispatcher=name)
            for name in ('einsum', 'gather')}
  variables = layers['gather'].init(init_key(2), x)

  def loss(variables, x, padding, name):
    y, aux = layers[name].apply(variables, x, padding, deterministic=False)
    return jnp.sum(y * jnp.cos(y)) + aux['aux_loss'], y

  def run(name):  # jitted: one compile instead of op-by-op dispatch
    grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    return jax.jit(jax.vmap(grad_fn, in_axes=(None, None, 0, None)),
                   static_argnums=3)(variables, x, _PADDINGS, name)

  (_, y_e), grads_e = run('einsum')
  (_, y_g), grads_g = run('gather')
  np.testing.assert_allclose(y_e, y_g, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_e), jax.tree.leaves(grads_g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # The padded variant really differs (padding is not a no-op).
  assert not np.allclose(y_g[0], y_g[1])
