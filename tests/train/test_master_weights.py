"""Float32 master weights for low-precision params (train.master_weights;
moejax.train.optim.with_float32_master)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import train
from moejax.train import finetune
from moejax.train import optim
from tests.train import helpers


def _run(optimizer, params, grads, steps):
  """params after `steps` updates with the same grads."""
  state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  for _ in range(steps):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_master_copy_keeps_the_updates_bfloat16_rounds_away():
  # Adam with a constant gradient moves every step by lr (m / sqrt(v) = 1
  # after bias correction; eps negligible): 10 steps of 1e-3 from 1.0 ->
  # 0.99. In bfloat16 (spacing 2**-8 below 1) a 1e-3 step rounds back to
  # 1.0 every time; the master copy holds 0.99, stored as the nearest
  # bfloat16, 253 / 256 = 0.98828125. A float32 leaf moves the same
  # either way.
  params = {'w': jnp.ones((3,), jnp.bfloat16), 'r': jnp.ones((2,))}
  grads = {'w': jnp.ones((3,), jnp.bfloat16), 'r': jnp.ones((2,))}
  plain, _ = _run(optax.adam(1e-3), params, grads, 10)
  mixed, state = _run(optim.with_float32_master(optax.adam(1e-3)), params,
                      grads, 10)
  np.testing.assert_array_equal(plain['w'], 1.0)
  assert mixed['w'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(mixed['w'].astype(jnp.float32), 0.98828125)
  assert state.master['w'].dtype == jnp.float32
  np.testing.assert_allclose(state.master['w'], 0.99, rtol=1e-6)
  assert isinstance(state.master['r'], optax.MaskedNode)  # float32: none
  np.testing.assert_array_equal(mixed['r'], plain['r'])


def test_float32_params_train_exactly_as_without_it():
  """make_optimizer(master_weights=True) on float32 params: no master
  copies, and bit for bit the plain optimizer's params."""
  key = jax.random.key(0)
  params = {'kernel': jax.random.normal(key, (4, 3)), 'scale': jnp.ones(3)}
  grads = jax.tree.map(lambda p: 0.1 * jnp.cos(p), params)
  kw = dict(learning_rate=1e-2, warmup_steps=2, total_steps=10)
  want, _ = _run(optim.make_optimizer(**kw), params, grads, 4)
  got, state = _run(optim.make_optimizer(**kw, master_weights=True),
                    params, grads, 4)
  helpers.assert_bitwise_equal(got, want)
  assert not jax.tree.leaves(state.master)


def test_frozen_params_get_no_master_copy():
  """A frozen bfloat16 leaf (fine-tuning) keeps no float32 copy and does
  not move; a trained one does."""
  params = {'base': jnp.ones((2, 2), jnp.bfloat16),
            'adapter': jnp.ones((2, 2), jnp.bfloat16)}
  plan = finetune.FinetunePlan(freeze=('base',))
  optimizer = optim.make_optimizer(1e-3, 0, 10, grad_clip=0.0, plan=plan,
                                   master_weights=True)
  grads = jax.tree.map(jnp.ones_like, params)
  got, state = _run(optimizer, params, grads, 3)
  assert isinstance(state.master['base'], optax.MaskedNode)
  assert state.master['adapter'].dtype == jnp.float32
  np.testing.assert_array_equal(got['base'], params['base'])
  assert not np.array_equal(state.master['adapter'], 1.0)


def test_trainer_stores_bfloat16_params_and_float32_masters(data_dir,
                                                            tmp_path):
  """A bfloat16 run with master weights: the checkpoint's params are its
  float32 masters rounded to bfloat16, leaf for leaf."""
  argv = helpers.small_args(
      'switch', str(tmp_path / 'run'), data_dir, train__steps=6,
      train__checkpoint_every=6, train__eval_every=6, model__dtype='bfloat16',
      model__param_dtype='bfloat16', train__master_weights=True)
  assert train.main(argv) == 0
  state, records = helpers.final_state(argv)
  master = state.opt_state.master
  pairs = 0
  for p, m in zip(jax.tree.leaves(state.params),
                  jax.tree.leaves(master, is_leaf=lambda x: isinstance(
                      x, optax.MaskedNode))):
    if isinstance(m, optax.MaskedNode):
      assert p.dtype == jnp.float32  # the routers
      continue
    assert p.dtype == jnp.bfloat16 and m.dtype == jnp.float32
    np.testing.assert_array_equal(p, m.astype(jnp.bfloat16))
    pairs += 1
  assert pairs >= 10
  assert np.isfinite(records[-1]['eval/loss'])


def test_master_copies_are_sharded_like_their_params():
  """On a (2, 4, 1) mesh every master copy gets its param's partition spec
  (the expert banks split over 'expert'): sharding follows param paths."""
  from experiments import config_lib  # pylint: disable=g-import-not-at-top
  from moejax import sharding  # pylint: disable=g-import-not-at-top
  from moejax.train import abstract_train_state  # pylint: disable=g-import-not-at-top
  config = config_lib.apply_overrides(
      config_lib.load_config('configs/switch.py:tiny'),
      {'model.param_dtype': 'bfloat16', 'train.master_weights': True})
  model = config_lib.build_model(config)
  optimizer, _ = config_lib.build_optimizer(config)
  abstract = abstract_train_state(model, optimizer, (16, 64))
  specs = sharding.tree_partition_specs(
      abstract, {'data': 2, 'expert': 4, 'model': 1})
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  params = dict(jax.tree_util.tree_flatten_with_path(
      specs.params, is_leaf=is_spec)[0])
  masters = jax.tree_util.tree_flatten_with_path(
      specs.opt_state.master, is_leaf=is_spec)[0]
  assert len(masters) >= 10
  for path, spec in masters:
    assert spec == params[path], (jax.tree_util.keystr(path), spec)
  expert = [s for p, s in masters if 'experts' in jax.tree_util.keystr(p)]
  assert expert and all(s[0] == 'expert' for s in expert)
