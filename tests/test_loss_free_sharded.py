"""The loss-free balancing update counts the global batch: with the batch
sharded over several devices it equals the single-device update.

Runs in a subprocess with 4 fake CPU devices (the flag must be set before
JAX starts; the rest of the suite keeps one device)."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    import moejax
    from moejax import sharding
    assert jax.device_count() == 4, jax.devices()
    layer = moejax.MoeLayer(num_experts=4, d_ff=16, top_k=2,
                            score_fn='sigmoid', renormalize=True,
                            bias_update_rate=0.01, capacity_factor=None)
    # A skewed batch: 8 sequences of 6 tokens; every group's counts differ.
    x = jax.random.normal(jax.random.key(0), (8, 6, 8)) + jnp.linspace(
        -1, 1, 8)
    variables = layer.init(jax.random.key(1), x)
    def update(variables, x):
      _, new = layer.apply(variables, x, deterministic=False,
                           mutable=['moe_state'])
      return new['moe_state']['router']['bias']
    want = np.asarray(jax.jit(update)(variables, x))
    assert np.abs(want).max() > 0
    for shape in ((4, 1, 1), (2, 2, 1)):
      mesh = sharding.make_mesh(*shape)
      with jax.set_mesh(mesh):
        xs = jax.device_put(x, sharding.batch_sharding(mesh))
        assert len(xs.sharding.device_set) == 4
        got = np.asarray(jax.jit(update)(variables, xs))
      np.testing.assert_array_equal(got, want)
      print('mesh', shape, 'bias', got.tolist())
    print('OK')
''')


def test_bias_update_is_the_same_on_4_devices():
  env = dict(os.environ, PYTHONPATH=REPO, PJRT_NPROC='16',
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  proc = subprocess.run([sys.executable, '-c', SCRIPT], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and 'OK' in proc.stdout, (
      proc.stdout[-2000:] + proc.stderr[-4000:])
