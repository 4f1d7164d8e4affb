"""moejax.sharding: mesh validation, layout rules, batch rows; and the
multi-device checks, run in a subprocess with 8 fake CPU devices.

The rest of the suite sees 1 device, so everything here that needs 8 runs in
`multidevice_checks.py` (the layer) and `trainer_checks.py` (the trainer on
a mesh, and 2 processes x 4 devices with jax.distributed), started by
`test_multidevice_checks` in one subprocess with the environment JAX needs
before it starts.
"""
# pylint: disable=protected-access

import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from moejax import sharding
from moejax.models.transformer import TransformerLM
from tests.sharding import fake_devices

CHECKS = [os.path.join('tests', 'sharding', name)
          for name in ('multidevice_checks.py', 'trainer_checks.py')]
# Tests in CHECKS, parametrized cases counted: 19 layer + 7 trainer.
NUM_CHECKS = 26


def test_multidevice_checks():
  fake_devices.run_checks(CHECKS, NUM_CHECKS)


@pytest.mark.parametrize('shape,devices,expected', [
    ((1, 1, 1), 8, (1, 1, 1)),
    ((-1, 1, 1), 8, (8, 1, 1)),
    ((2, -1, 1), 8, (2, 4, 1)),
    ((2, 2, -1), 8, (2, 2, 2)),
    ((1, 2, 2), 8, (1, 2, 2)),  # smaller than the devices: the first 4
])
def test_resolve_mesh_shape(shape, devices, expected):
  assert sharding.resolve_mesh_shape(*shape, devices) == expected


@pytest.mark.parametrize('shape,message', [
    ((4, 4, 1), r'mesh \(mesh\.data=4, mesh\.expert=4, mesh\.model=1\) '
     r'needs 16 devices but only 8 are available'),
    ((3, -1, 1), r'mesh\.expert=-1 cannot fill 8 devices: .* multiply to 3'),
    ((-1, -1, 1), r'only one of .* got -1 for mesh\.data, mesh\.expert'),
    ((0, 1, 1), r'mesh\.data=0 must be an int >= 1, or -1'),
    ((1, 2.0, 1), r'mesh\.expert=2\.0 must be an int'),
    ((1, 1, -2), r'mesh\.model=-2 must be an int'),
    ((16, -1, 1), r'needs 16 devices'),
])
def test_resolve_mesh_shape_errors(shape, message):
  with pytest.raises(ValueError, match=message):
    sharding.resolve_mesh_shape(*shape, 8)


def test_make_mesh_larger_than_devices():
  with pytest.raises(ValueError, match='needs 2 devices but only 1'):
    sharding.make_mesh(1, 2, 1, devices=jax.devices()[:1])
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  assert mesh.axis_names == ('data', 'expert', 'model')
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3


@pytest.mark.parametrize('mesh,num_experts,groups,message', [
    (dict(data=1, expert=4, model=1), 6, None,
     r'model\.moe\.num_experts=6 must be divisible by mesh\.expert=4'),
    (dict(data=1, expert=8, model=1), 3, None,
     r'mesh\.expert=8 is larger than model\.moe\.num_experts=3 and must '
     r'then be a multiple'),
    (dict(data=2, expert=2, model=2), 4, 6,
     r'G=6 groups .* mesh\.data \* mesh\.expert = 4'),
])
def test_check_moe_mesh_errors(mesh, num_experts, groups, message):
  with pytest.raises(ValueError, match=message):
    sharding.check_moe_mesh(mesh, num_experts, groups)


@pytest.mark.parametrize('mesh,num_experts,groups', [
    (dict(data=2, expert=4, model=1), 4, 8),  # Pe == E
    (dict(data=1, expert=8, model=1), 4, 8),  # Pe > E: 2 replicas each
    (dict(data=4, expert=2, model=1), 8, 16),  # Pe < E: 4 experts each
    (dict(data=8, expert=1, model=1), 3, 8),  # no expert axis
])
def test_check_moe_mesh_accepts(mesh, num_experts, groups):
  sharding.check_moe_mesh(mesh, num_experts, groups)


def test_check_batch_size():
  sharding.check_batch_size(dict(data=2, expert=4, model=2), 16)
  with pytest.raises(ValueError, match=r'train\.batch_size=12 must be '
                     r'divisible by .* = 8'):
    sharding.check_batch_size(dict(data=2, expert=4, model=2), 12)


def _abstract_state():
  """Abstract params and AdamW state of a 2-block LM, block 1 MoE."""
  model = TransformerLM(num_layers=2, d_model=16, num_heads=4, d_ff=32,
                        vocab_size=64, activation='swiglu',
                        tie_embeddings=False, moe=dict(num_experts=8),
                        moe_every=2)
  tokens = jnp.zeros((2, 8), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)['params']
  # As moejax.train.optim: clipping, then AdamW decaying matrices only.
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      1e-3, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
  opt_state = jax.eval_shape(optimizer.init, params)
  return {'params': params, 'opt_state': opt_state,
          'step': jax.ShapeDtypeStruct((), jnp.int32)}


def test_partition_specs_of_a_train_state():
  state = _abstract_state()
  specs = sharding.tree_partition_specs(
      state, dict(data=2, expert=4, model=2))
  p = specs['params']
  experts = p['block_1']['ffn']['experts']
  # [E, D, F] = [8, 16, 32]: E over 'expert' (8 % 4), F over 'model'.
  assert experts['wi_0'] == experts['wi_1'] == P('expert', None, 'model')
  assert experts['wo'] == P('expert', 'model', None)  # [E, F, D]
  assert p['block_1']['ffn']['router']['kernel'] == P(None, None)
  assert p['block_0']['ffn']['wi_0'] == P(None, 'model')  # dense [D, F]
  assert p['block_0']['ffn']['wo'] == P('model', None)
  assert p['block_0']['attn']['query'] == P(None, 'model', None)  # heads
  assert p['block_0']['attn']['out'] == P('model', None, None)
  assert p['embed']['embedding'] == P(None, None)
  assert p['head']['kernel'] == P(None, None)
  assert p['final_norm']['scale'] == P(None)
  assert specs['step'] == P()
  # AdamW's moments mirror the params; its step count is replicated.
  adam = specs['opt_state'][1][0]
  assert adam.mu == p and adam.nu == p
  assert adam.count == P()


def test_partition_specs_fall_back_to_replicated():
  params = _abstract_state()['params']
  # mesh.expert = 16 > E = 8 (each expert on 2 devices): E replicated; 3
  # does not divide F = 32 or H = 4: replicated; no 'model' axis at all.
  specs = sharding.tree_partition_specs(params, dict(data=1, expert=16,
                                                     model=3))
  experts = specs['block_1']['ffn']['experts']
  assert experts['wi_0'] == P(None, None, None)
  assert specs['block_0']['attn']['query'] == P(None, None, None)
  specs = sharding.tree_partition_specs(params, dict(data=2, expert=2))
  assert specs['block_1']['ffn']['experts']['wo'] == P('expert', None, None)
  # A leaf no rule matches is replicated.
  tree = {'moe_state': {'router': {'bias': jax.ShapeDtypeStruct((8,),
                                                                 jnp.float32)}}}
  assert sharding.tree_partition_specs(tree, dict(expert=8)) == {
      'moe_state': {'router': {'bias': P(None)}}}


def test_logical_rules_are_one_flax_table():
  rules = sharding.LOGICAL_AXIS_RULES
  assert nn.logical_to_mesh_axes(('batch', 'embed'), rules) == P(
      ('data', 'expert'), None)
  assert nn.logical_to_mesh_axes(('expert', 'expert_mlp', 'embed'),
                                 rules) == P('expert', 'model', None)
  assert nn.logical_to_mesh_axes(('embed', 'heads', 'kv'), rules) == P(
      None, 'model', None)


def _fake_devices(shape, process_of):
  """An object array of stand-in devices with a `process_index`."""
  ids = np.arange(np.prod(shape)).reshape(shape)
  return np.vectorize(lambda i: types.SimpleNamespace(
      id=int(i), process_index=process_of(int(i))), otypes=[object])(ids)


@pytest.mark.parametrize('shape,process,expected', [
    # 2 processes x 4 devices, devices in process order.
    ((2, 4, 1), 0, slice(0, 8)), ((2, 4, 1), 1, slice(8, 16)),
    ((1, 8, 1), 1, slice(8, 16)),
    # model axis: process 1 owns data row 1 -> batch shards 2, 3 of 4.
    ((2, 2, 2), 1, slice(8, 16)),
    ((8, 1, 1), 0, slice(0, 8)),
])
def test_process_batch_rows(shape, process, expected):
  devices = _fake_devices(shape, lambda i: i // 4)
  rows = sharding._process_rows(devices, sharding.MESH_AXES, 16, process)
  assert rows == expected


def test_process_batch_rows_not_contiguous():
  devices = _fake_devices((2, 4, 1), lambda i: i % 2)  # interleaved
  with pytest.raises(ValueError, match='not one contiguous block'):
    sharding._process_rows(devices, sharding.MESH_AXES, 16, 0)


def test_no_expert_parallelism_without_a_mesh():
  assert sharding.expert_parallel_mesh() is None
  with jax.set_mesh(sharding.make_mesh(devices=jax.devices()[:1])):
    assert sharding.expert_parallel_mesh() is None  # one device: plain path
