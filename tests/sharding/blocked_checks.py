"""'blocked' on 8 fake CPU devices equals 1 device (run by
tests/test_blocked_dispatch.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 and PJRT_NPROC=16;
prints 'blocked on meshes ...: ok' and exits 0 when it holds).

Not a pytest module (no test_ prefix): the fake devices must exist before
JAX starts. To run it by hand:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 PJRT_NPROC=16 \\
      python tests/sharding/blocked_checks.py

Meshes: (8, 1, 1), data-parallel (the batch over 8 devices, weights
replicated), and (2, 2, 2) (weights over 'expert', F over 'model'):
'blocked' is not expert-parallel, XLA partitions its sort and block loop
itself (as for 'ragged'); values and gradients must be one device's.
B=8 sequences of L=8 tokens, E=4, K=2, dropless, padding in sequences 0
and 3, a gated activation.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

import moejax
from moejax import sharding

B, L, D, F, E = 8, 8, 8, 16, 4
MESHES = [(8, 1, 1), (2, 2, 2)]


def _setup():
  layer = moejax.MoeLayer(num_experts=E, d_ff=F, top_k=2,
                          capacity_factor=None, eval_capacity_factor=None,
                          activation='swiglu', dispatcher='blocked')
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  abstract = jax.eval_shape(layer.init, jax.random.key(0), x)['params']
  params = jax.tree.map(
      lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), abstract)
  pad = jnp.zeros((B, L), bool).at[0, -3:].set(True).at[3, 0].set(True)

  def loss(p, x):
    y, aux = layer.apply({'params': p}, x, pad)
    return jnp.sum(y * r) + aux['aux_loss'], y

  return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True)), params, x


def main() -> int:
  assert jax.device_count() == 8, jax.devices()
  with jax.default_matmul_precision('highest'):
    grad_fn, params, x = _setup()
    (_, y_one), g_one = grad_fn(params, x)
    assert float(jnp.abs(y_one).max()) > 0.1
    for shape in MESHES:
      mesh = sharding.make_mesh(*shape)
      with jax.set_mesh(mesh):
        (_, y), g = jax.block_until_ready(grad_fn(
            jax.device_put(params, sharding.tree_shardings(params, mesh)),
            jax.device_put(x, sharding.batch_sharding(mesh))))
      np.testing.assert_allclose(y, y_one, rtol=1e-5, atol=1e-5,
                                 err_msg=str(shape))
      for (path, want), got in zip(
          jax.tree_util.tree_leaves_with_path(g_one), jax.tree.leaves(g)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5,
                                   err_msg=f'{shape} {path}')
  print('blocked on meshes ' + ', '.join(map(str, MESHES)) + ': ok')
  return 0


if __name__ == '__main__':
  sys.exit(main())
