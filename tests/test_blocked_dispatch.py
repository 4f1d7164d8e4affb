"""The 'blocked' dispatcher (moejax.blocked): its block arithmetic by hand,
and its outputs and every gradient against 'gather' with no drops.

Axis letters as in moejax/layers.py: B batch, L length, D width, F expert
width, E experts, K choices, G groups, S tokens per group, C capacity; N
assignments, b rows per block.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import blocked
from moejax.routing import RoutingDecision

B, L, D, F, E = 2, 12, 8, 16, 4  # G = B groups of S = L tokens
# Padding: the last 3 tokens of sequence 0 and the first of sequence 1.
PADDING = np.zeros((B, L), bool)
PADDING[0, -3:] = PADDING[1, 0] = True
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


def _decision(expert_index, kept):
  """A RoutingDecision of one group, K = 1, from [S] lists."""
  index = jnp.asarray(expert_index, jnp.int32).reshape(1, -1, 1)
  kept = jnp.asarray(kept).reshape(1, -1, 1)
  return RoutingDecision(expert_index=index, slot=jnp.zeros_like(index),
                         gate=jnp.ones(index.shape, jnp.float32),
                         request=kept, kept=kept, num_experts=3,
                         capacity=8)


def test_block_plan_hand_case():
  # S = 9 tokens, E = 3, b = 4; token 8 (expert 0) is dropped. Kept:
  # expert 0 takes tokens 0, 2, 3, 5, 7 (5 rows), expert 1 none, expert 2
  # tokens 1, 4, 6 (3 rows): group sizes [5, 0, 3] pad to
  # ceil(5/4)*4 + 0 + ceil(3/4)*4 = 8 + 0 + 4 = 12 rows in 3 used blocks.
  # Static bound: N = 9 assignments, Bk = (9 + 3 * 3) // 4 = 4 blocks,
  # P = 16 rows.
  plan = blocked.block_plan(_decision([0, 2, 0, 0, 2, 0, 2, 0, 0],
                                      [1, 1, 1, 1, 1, 1, 1, 1, 0]), 4)
  t = 9  # token index of padding rows (T = 9 tokens)
  assert blocked.num_blocks(9, 3, 4) == 4
  np.testing.assert_array_equal(
      plan.token_of_row,
      [0, 2, 3, 5, 7, t, t, t, 1, 4, 6, t, t, t, t, t])
  # Row of each token's choice; 16 = P for the dropped one.
  np.testing.assert_array_equal(plan.row_of_choice[:, 0],
                                [0, 8, 1, 2, 9, 3, 10, 4, 16])
  assert int(plan.used_blocks) == 3
  np.testing.assert_array_equal(plan.block_expert[:3], [0, 0, 2])
  assert plan.choice_of_row.shape == (16, 1)


@pytest.mark.parametrize('rows,experts,b', [(4096, 64, 64), (4096, 8, 128),
                                            (4096, 256, 16), (24, 4, 16),
                                            (8, 64, 16)])
def test_default_block_size(rows, experts, b):
  # The largest power of two <= N / E, clipped to [16, 128]: 4096 / 64 =
  # 64; 4096 / 8 = 512 -> 128; 4096 / 256 = 16; 24 / 4 = 6 -> 16; 8 / 64
  # -> 1 -> 16.
  assert blocked.default_block_size(rows, experts) == b


def _layer(dispatcher, **kw):
  kw = dict(dict(num_experts=E, d_ff=F, top_k=2, capacity_factor=None,
                 eval_capacity_factor=None), **kw)
  return moejax.MoeLayer(dispatcher=dispatcher, **kw)


def _inputs(layer, seed, skew=0.0):
  """x [B, L, D] and params drawn with numpy. skew > 0 makes expert 0 take
  most tokens and expert E-1 none: x's feature 0 is 3 + noise, and the
  router's row 0 is +skew for expert 0, -3 skew for expert E-1."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, L, D))
  router = 2.0 * rng.standard_normal((D, E))
  if skew:
    x[..., 0] += 3.0
    router[0, 0], router[0, -1] = skew, -3 * skew
  abstract = jax.eval_shape(layer.init, jax.random.key(0),
                            jnp.asarray(x, jnp.float32))['params']
  experts = jax.tree.map(
      lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), a.dtype),
      abstract['experts'])
  params = {'router': {'kernel': jnp.asarray(router, jnp.float32)},
            'experts': experts}
  return jnp.asarray(x, jnp.float32), params


def _value_and_grads(layer, params, x, padding):
  """y, and the gradients of sum(y * r) + aux_loss w.r.t. params and x."""
  r = jnp.asarray(np.random.default_rng(7).standard_normal(x.shape),
                  jnp.float32)

  def loss(p, x):
    y, aux = layer.apply({'params': p}, x, padding, deterministic=False)
    return jnp.sum(y * r) + aux['aux_loss'], (y, aux)

  return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)


def _assert_same(layer_kw, seed=0, skew=0.0, padding=PADDING, tol=2e-5):
  """blocked == gather (values, every gradient); returns gather's aux."""
  x, params = _inputs(_layer('gather', **layer_kw), seed, skew)
  padding = None if padding is None else jnp.asarray(padding)
  (_, (y_ref, aux)), g_ref = _value_and_grads(_layer('gather', **layer_kw),
                                              params, x, padding)
  (_, (y, _)), g = _value_and_grads(_layer('blocked', **layer_kw), params,
                                    x, padding)
  assert float(jnp.abs(y_ref).max()) > 0.1  # not trivially zero
  np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
  if padding is not None:
    np.testing.assert_array_equal(np.asarray(y)[np.asarray(padding)], 0.0)
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(g_ref),
                               jax.tree.leaves(g)):
    assert float(jnp.abs(want).max()) > 0, path  # every gradient is used
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol,
                               err_msg=str(path))
  return aux


# (K, activation, padding, skew): K = 1 and 2, every activation, with and
# without padding, balanced and unbalanced routing.
CASES = [(1, 'relu', True, 0.0), (2, 'gelu', False, 0.0),
         (2, 'swiglu', True, 6.0), (1, 'swiglu', True, 6.0)]


@pytest.mark.parametrize('k,activation,pad,skew', CASES)
def test_blocked_matches_gather_dropless(k, activation, pad, skew,
                                         monkeypatch):
  # b = 4 (MIN_BLOCK lowered from 16): the experts' rows span several
  # blocks, whose weight gradients add up in their expert's slot.
  monkeypatch.setattr(blocked, 'MIN_BLOCK', 4)
  aux = _assert_same(dict(top_k=k, activation=activation), seed=k,
                     skew=skew, padding=PADDING if pad else None)
  assert float(aux['drop_fraction']) == 0.0  # dropless: C = S
  load = np.asarray(aux['expert_load'])  # fraction of assignments
  if skew:
    # Expert 0 takes at least 45% of the (24 - 4) * K >= 20 assignments
    # (at most 50% with K = 2: one of a token's 2 choices), >= 9 rows in
    # 3 or more blocks; expert 3 takes none.
    assert load[0] >= 0.45 and load[-1] == 0.0, load


def test_blocked_honours_capacity_drops():
  # cf = 0.75, K = 2: C = ceil(0.75 * 12 * 2 / 4) = 5 slots for 4.5 and
  # 5.5 requests per expert on average: some assignments drop, and
  # 'blocked' drops the same ones as 'gather'.
  aux = _assert_same(dict(capacity_factor=0.75, eval_capacity_factor=0.75,
                          min_capacity=0, priority='token'), seed=4)
  assert float(aux['drop_fraction']) > 0


def test_blocked_with_lora_matches_gather():
  # Adapters on the routed experts: wi_lora_a/b, wo_lora_a/b get their
  # gradients through the block VJP (lora_b drawn non-zero).
  _assert_same(dict(lora_rank=2, activation='gelu'), seed=5)


def test_blocked_with_expert_choice_matches_gather():
  # Each expert takes its top C = ceil(2 * 12 / 4) = 6 tokens: a decision
  # with K = E choices per token, most of them not kept.
  _assert_same(dict(router='expert_choice', top_k=1, capacity_factor=2.0,
                    eval_capacity_factor=2.0), seed=6)


def test_blocked_bfloat16_close_to_float32():
  # Compute in bfloat16 (params float32): within bfloat16's precision of
  # the float32 result (forward only).
  x, params = _inputs(_layer('blocked'), seed=8)
  y32, _ = jax.jit(_layer('blocked').apply)({'params': params}, x)
  y16, _ = jax.jit(_layer('blocked', dtype=jnp.bfloat16).apply)(
      {'params': params}, x)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=0.05,
                             atol=0.05 * float(jnp.abs(y32).max()))


def test_blocked_on_eight_devices_matches_one():
  # A subprocess with 8 fake CPU devices (they must exist before JAX
  # starts): tests/sharding/blocked_checks.py.
  env = {k: v for k, v in os.environ.items() if not k.startswith('PYTEST_')}
  # Optimization level 0 halves the compile time (as test_sharding.py).
  env.update(XLA_FLAGS='--xla_force_host_platform_device_count=8 '
             '--xla_backend_optimization_level=0',
             PJRT_NPROC='16', JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      ['timeout', '-s', 'KILL', '300', sys.executable,
       os.path.join('tests', 'sharding', 'blocked_checks.py')],
      cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  assert 'blocked on meshes (8, 1, 1), (2, 2, 2): ok' in proc.stdout
