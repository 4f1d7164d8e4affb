"""LoRA adapters on the expert-parallel path, on 8 fake CPU devices (run by
test_lora_sharded.py in a subprocess; the name is not test_*.py, so a plain
`pytest` run does not collect it). By hand:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 PJRT_NPROC=16 \
      python -m pytest -q tests/sharding/lora_checks.py

A MoeLayer with adapters on its experts and its shared expert (non-zero B,
drawn with numpy), forward and gradients w.r.t. every param (adapters
included) and x, on meshes vs no mesh. E=4, so (1, 8, 1) puts each expert
on R = 2 devices; F=16 is split over model=2 (the psum after wo and wo's
adapter a).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import sharding

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason='needs 8 devices: set XLA_FLAGS=--xla_force_host_platform_'
    'device_count=8 before JAX starts (test_lora_sharded.py does)')

# B=8 sequences of L=4 tokens (G=8, S=4), E=4, K=2, cf=1: C = 2, drops.
B, L, D, F, E, R = 8, 4, 8, 16, 4, 2
MESHES = [(2, 4, 1), (1, 4, 2), (1, 8, 1)]


@pytest.fixture(autouse=True, scope='module')
def _exact_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


def _layer():
  return moejax.MoeLayer(
      num_experts=E, d_ff=F, top_k=2, capacity_factor=1.0,
      eval_capacity_factor=1.0, min_capacity=0, dispatcher='einsum',
      activation='swiglu', num_shared_experts=1, lora_rank=R,
      lora_alpha=3.0, lora_targets=('experts', 'shared'))


@functools.lru_cache(maxsize=None)
def _inputs():
  """x [B, L, D], the output cotangent r, params (all non-zero)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  abstract = jax.eval_shape(_layer().init, jax.random.key(0), x)['params']
  params = jax.tree.map(
      lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), a.dtype),
      abstract)
  params['router']['kernel'] = params['router']['kernel'] * 4.0  # no ties
  return x, r, params


def _loss(p, x, r):
  y, aux = _layer().apply({'params': p}, x)
  return jnp.sum(y * r) + aux['aux_loss'], y


@functools.lru_cache(maxsize=None)
def _run(mesh_shape):
  """(y, (d params, d x), compiled HLO text); None = no mesh."""
  x, r, params = _inputs()
  grad_fn = jax.value_and_grad(_loss, argnums=(0, 1), has_aux=True)
  if mesh_shape is None:
    compiled = jax.jit(grad_fn).lower(params, x, r).compile()
    (_, y), grads = compiled(params, x, r)
    return y, grads, compiled.as_text()
  mesh = sharding.make_mesh(*mesh_shape)
  with jax.set_mesh(mesh):
    params = jax.device_put(params, sharding.tree_shardings(params, mesh))
    x = jax.device_put(x, sharding.batch_sharding(mesh))
    compiled = jax.jit(grad_fn).lower(params, x, r).compile()
    (_, y), grads = jax.block_until_ready(compiled(params, x, r))
  return y, grads, compiled.as_text()


@pytest.mark.parametrize('mesh_shape', MESHES)
def test_adapted_layer_on_a_mesh_matches_one_device(mesh_shape):
  y0, grads0, _ = _run(None)
  y, grads, hlo = _run(mesh_shape)
  assert 'all-to-all' in hlo  # the expert-parallel path ran
  np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)
  flat0 = jax.tree_util.tree_leaves_with_path(grads0)
  flat = jax.tree.leaves(grads)
  names = [jax.tree_util.keystr(path) for path, _ in flat0]
  assert sum('lora' in n for n in names) == 12  # 3 kernels x 2 x 2 FFNs
  for (path, g0), g in zip(flat0, flat):
    assert float(jnp.max(jnp.abs(g0))) > 1e-3, path  # every grad is live
    np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
