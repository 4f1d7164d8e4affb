"""Expert parallelism on 8 fake CPU devices (run by test_sharding.py).

Not collected by a plain `pytest` run (the name does not match test_*.py):
the fake devices must exist before JAX starts, so
`test_sharding.test_multidevice_checks` runs this module in a subprocess
with XLA_FLAGS=--xla_force_host_platform_device_count=8 and PJRT_NPROC=16.
To run it by hand:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 PJRT_NPROC=16 \
      python -m pytest -q tests/sharding/multidevice_checks.py

Shapes are tiny, params are drawn with numpy (no init programs to
compile), and one forward-and-gradient program of both dispatchers is
compiled per mesh and reused by the HLO test. test_sharding.py adds
--xla_backend_optimization_level=0 (half the compile time; the same flags
for the single-device reference and the meshes).
"""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import moejax
from moejax import sharding
from moejax.dispatch import DISPATCHERS
from moejax.interop import hf
from moejax.models.transformer import TransformerLM
from moejax.routing import RoutingDecision
from moejax.train import make_train_step
from moejax.train.state import TrainState

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason='needs 8 devices: set XLA_FLAGS=--xla_force_host_platform_'
    'device_count=8 before JAX starts (test_sharding.py does)')

# B=8 sequences of L=8 tokens, one group per sequence: G=8, S=8. E=4, K=2,
# cf=0.75: C = ceil(0.75 * 8 * 2 / 4) = 3 (min_capacity=0), so assignments
# drop, and on the (1, 8, 1) mesh (R = 8 / 4 = 2 replicas per expert) C is
# padded to 4 and split into two chunks of 2.
B, L, D, F, E = 8, 8, 8, 16, 4
MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2)]
# einsum with a gated activation (wi_0, wi_1), gather with one wi.
ACTIVATIONS = {'einsum': 'swiglu', 'gather': 'relu'}


@pytest.fixture(autouse=True, scope='module')
def _exact_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


def _layer(dispatcher, num_experts=E):
  return moejax.MoeLayer(
      num_experts=num_experts, d_ff=F, top_k=2, capacity_factor=0.75,
      eval_capacity_factor=0.75, min_capacity=0, dispatcher=dispatcher,
      activation=ACTIVATIONS[dispatcher])


def _random_params(abstract, seed):
  """Normal(0, 0.5) values for a tree of ShapeDtypeStructs (numpy: no
  init program to compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), a.dtype),
      abstract)


@functools.lru_cache(maxsize=None)
def _inputs():
  """x [B, L, D], the output cotangent r, and both layers' params."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  params = {}
  for name in ACTIVATIONS:
    abstract = jax.eval_shape(_layer(name).init, jax.random.key(0), x)
    params[name] = _random_params(abstract['params'], 1)
    # A decisive router: no near-ties in top-K.
    params[name]['router']['kernel'] = params[name]['router']['kernel'] * 4.0
  return x, r, params


def _loss_and_grads(params, x, r):
  """Both dispatchers: ({name: y [B, L, D]}, {name: (d params, d x)})."""
  def loss(p, x, name):
    y, aux = _layer(name).apply({'params': p}, x)
    return jnp.sum(y * r) + aux['aux_loss'], y

  ys, grads = {}, {}
  for name in ACTIVATIONS:
    (_, ys[name]), grads[name] = jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True)(params[name], x, name)
  return ys, grads


@functools.lru_cache(maxsize=None)
def _run(mesh_shape):
  """(outputs, grads, compiled HLO text) on a mesh; None = no mesh."""
  x, r, params = _inputs()
  if mesh_shape is None:
    compiled = jax.jit(_loss_and_grads).lower(params, x, r).compile()
    return (*compiled(params, x, r), compiled.as_text())
  mesh = sharding.make_mesh(*mesh_shape)
  with jax.set_mesh(mesh):
    params = jax.device_put(params, sharding.tree_shardings(params, mesh))
    x = jax.device_put(x, sharding.batch_sharding(mesh))
    compiled = jax.jit(_loss_and_grads).lower(params, x, r).compile()
    out = jax.block_until_ready(compiled(params, x, r))
  return (*out, compiled.as_text())


@pytest.mark.parametrize('mesh_shape', MESHES)
def test_layer_output_and_grads_match_one_device(mesh_shape):
  ys0, grads0, _ = _run(None)
  ys, grads, _ = _run(mesh_shape)
  for name in ACTIVATIONS:
    np.testing.assert_allclose(ys[name], ys0[name], rtol=1e-5, atol=1e-5)
    flat0 = jax.tree_util.tree_leaves_with_path(grads0[name])
    flat = jax.tree.leaves(grads[name])
    assert len(flat) == len(flat0) == 1 + 1 + (3 if name == 'einsum' else 2)
    for (path, g0), g in zip(flat0, flat):
      np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-5,
                                 err_msg=f'{name} {path}')
  assert float(jnp.max(jnp.abs(ys0['gather']))) > 0.1  # not trivially zero


def _collectives(hlo: str) -> dict:
  """{op: count} of the collectives in a compiled HLO text."""
  ops = ('all-to-all', 'all-reduce', 'all-gather', 'reduce-scatter',
         'collective-permute')
  return {op: len(re.findall(rf'= [^=]* {op}(?:-start)?\(', hlo))
          for op in ops}


@pytest.mark.parametrize('mesh_shape', [(2, 4, 1), (2, 2, 2)])
def test_hlo_has_all_to_all_and_no_expert_weight_all_gather(mesh_shape):
  hlo = _run(mesh_shape)[2]
  counts = _collectives(hlo)
  print(mesh_shape, counts)
  # Forward: dispatch and return exchange; backward: their transposes; per
  # dispatcher. XLA may merge independent all-to-alls into one tuple op.
  assert counts['all-to-all'] >= 2
  gathered = re.findall(r'= (\S+) all-gather(?:-start)?\(', hlo)
  f_shard = F // mesh_shape[2]  # all E experts' weights, whole or F-split
  full = {f'f32[{E},{D},{f}]' for f in (F, f_shard)} | {
      f'f32[{E},{f},{D}]' for f in (F, f_shard)}  # wi*, wo
  assert not any(shape.split('{')[0] in full for shape in gathered), gathered
  # Stronger: nothing at all is all-gathered. The batch-sharded routing
  # decision and buffers stay on their devices; only the all-to-alls (and
  # the psum over 'model') move data.
  assert counts['all-gather'] == 0, counts
  if mesh_shape[2] > 1:  # the psum over 'model' after wo
    assert counts['all-reduce'] >= 1


def test_ragged_dispatcher_on_a_mesh_matches_one_device():
  # One combined case: 'ragged' with padding (the last 3 tokens of sequence
  # 0, the first of sequence 3), priority 'score', a gated activation and
  # drops (C = ceil(0.75 * 8 * 2 / 4) = 3 slots for 4 requests per expert
  # on average), on the (2, 2, 2) mesh: batch over data x expert, expert
  # weights over 'expert', F over 'model'. ragged is not expert-parallel
  # (XLA partitions the sort and the grouped matmuls itself), so this pins
  # only that its values and gradients are those of one device, and that
  # those are 'gather''s (same decision, same params).
  kw = dict(num_experts=E, d_ff=F, top_k=2, capacity_factor=0.75,
            eval_capacity_factor=0.75, min_capacity=0, priority='score',
            activation='swiglu')
  layers = {name: moejax.MoeLayer(**kw, dispatcher=name)
            for name in ('ragged', 'gather')}
  x, r, _ = _inputs()
  pad = jnp.zeros((B, L), bool).at[0, -3:].set(True).at[3, 0].set(True)
  abstract = jax.eval_shape(layers['ragged'].init, jax.random.key(0), x)
  params = _random_params(abstract['params'], 3)
  params['router']['kernel'] = params['router']['kernel'] * 4.0

  def loss(p, x, name):
    y, aux = layers[name].apply({'params': p}, x, pad)
    return jnp.sum(y * r) + aux['aux_loss'], (y, aux['drop_fraction'])

  grad_fn = {name: jax.jit(jax.value_and_grad(
      functools.partial(loss, name=name), argnums=(0, 1), has_aux=True))
             for name in layers}
  (_, (y_gather, _)), g_gather = grad_fn['gather'](params, x)
  (_, (y_one, drops)), g_one = grad_fn['ragged'](params, x)
  mesh = sharding.make_mesh(2, 2, 2)
  with jax.set_mesh(mesh):
    on_mesh = jax.block_until_ready(grad_fn['ragged'](
        jax.device_put(params, sharding.tree_shardings(params, mesh)),
        jax.device_put(x, sharding.batch_sharding(mesh))))
  (_, (y_mesh, _)), g_mesh = on_mesh
  assert float(drops) > 0  # the drop path is exercised
  np.testing.assert_array_equal(np.asarray(y_one)[np.asarray(pad)], 0.0)
  assert float(jnp.max(jnp.abs(y_one))) > 0.1  # not trivially zero
  for got, want, what in [(y_mesh, y_one, 'mesh'), (y_one, y_gather, 'gather')]:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=what)
  for (path, want), got, theirs in zip(
      jax.tree_util.tree_leaves_with_path(g_one), jax.tree.leaves(g_mesh),
      jax.tree.leaves(g_gather)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5,
                               err_msg=f'mesh {path}')
    np.testing.assert_allclose(want, theirs, rtol=1e-5, atol=1e-5,
                               err_msg=f'gather {path}')


def _check_value_and_grads_on_meshes(value_fn, shapes, atol):
  """value_fn(params, x) -> scalar, for the gather layer's params: its value
  and gradients on each mesh equal one device's; returns that value."""
  x, _, params = _inputs()
  grad = jax.jit(jax.value_and_grad(value_fn))
  want, g_want = grad(params['gather'], x)
  for shape in shapes:
    mesh = sharding.make_mesh(*shape)
    with jax.set_mesh(mesh):
      got, g_got = jax.block_until_ready(grad(
          jax.device_put(params['gather'],
                         sharding.tree_shardings(params['gather'], mesh)),
          jax.device_put(x, sharding.batch_sharding(mesh))))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5,
                               err_msg=str(shape))
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol,
                                 err_msg=str(shape))
  return float(want)


def test_batch_scope_balance_loss_on_meshes_matches_one_device():
  # Global-batch balancing (aux_loss_scope='batch'): f and P are sums over
  # all 8 groups, which the meshes split over their data-parallel devices;
  # the loss and its gradients must be those of one device (and differ
  # from the per-group loss here, so the scope is really applied).
  x, _, params = _inputs()
  layer = _layer('gather').clone(aux_loss_scope='batch')
  want = _check_value_and_grads_on_meshes(
      lambda p, x: layer.apply({'params': p}, x)[1]['aux_loss'],
      ((8, 1, 1), (2, 4, 1)), atol=1e-6)
  per_group = _layer('gather').apply({'params': params['gather']}, x)[1]
  assert abs(want - float(per_group['aux_loss'])) > 1e-3


def test_position_groups_on_meshes_match_one_device():
  # Groups of 2 whole sequences, position-major (group_size=16,
  # group_order='position'): G = 8 * 8 / 16 = 4, one per batch shard of the
  # (4, 1, 1) and (2, 2, 2) meshes (the mesh check wants G divisible by
  # them); on (2, 2, 2) the experts run expert-parallel. Outputs and
  # gradients must be one device's, and differ from per-sequence groups
  # (the order is used).
  x, r, params = _inputs()
  layer = _layer('gather').clone(group_size=2 * L, group_order='position')
  want = _check_value_and_grads_on_meshes(
      lambda p, x: jnp.sum(layer.apply({'params': p}, x)[0] * r),
      ((4, 1, 1), (2, 2, 2)), atol=1e-5)
  per_seq = jnp.sum(_layer('gather').apply({'params': params['gather']},
                                           x)[0] * r)
  assert abs(want - float(per_seq)) > 1e-3


def _dummy_decision(g, s, k, e, c):
  """A fixed RoutingDecision: choice j of token t goes to (3t + j + g) % E,
  slots in choice-major order, gates 0.5 / 0.25 (exact in float)."""
  gi, si, ki = np.meshgrid(np.arange(g), np.arange(s), np.arange(k),
                           indexing='ij')
  expert = (3 * si + ki + gi) % e  # [G, S, K]
  slot = np.zeros_like(expert)
  for gg in range(g):
    count = np.zeros(e, int)
    for kk in range(k):
      for ss in range(s):
        slot[gg, ss, kk] = count[expert[gg, ss, kk]]
        count[expert[gg, ss, kk]] += 1
  gate = np.where(ki == 0, 0.5, 0.25).astype(np.float32)
  return RoutingDecision(
      expert_index=jnp.asarray(expert, jnp.int32),
      slot=jnp.asarray(slot, jnp.int32), gate=jnp.asarray(gate),
      request=jnp.ones(expert.shape, bool), kept=jnp.asarray(slot < c),
      num_experts=e, capacity=c)


@pytest.mark.parametrize('mesh_shape', [(2, 4, 1), (1, 8, 1), (4, 2, 1)],
                         ids=['expert_eq_E', 'expert_gt_E', 'expert_lt_E'])
def test_dummy_experts_give_exact_outputs(mesh_shape):
  # Expert e adds e + 1 to its slots, through the weights [E] = 1..E, so a
  # wrong exchange or a wrong weight slice changes the output. Token t gets
  #   y = sum_k kept_k * gate_k * (x + e_k + 1),
  # every term exact (integer x, gates 1/2 and 1/4).
  g, s, k, c = 8, 6, 2, 3  # 12 choices over 4 experts: 3 each on average
  decision = _dummy_decision(g, s, k, E, c)
  x = jnp.asarray(np.arange(g * s * D).reshape(g, s, D) % 7, jnp.float32)
  weights = jnp.arange(1, E + 1, dtype=jnp.float32)  # [E]
  add = lambda rows, w: rows + w[:, None, None]  # [E', N, D] + [E', 1, 1]

  def run(x, weights):
    return {name: d.combine(sharding.expert_parallel_apply(
        add, d.dispatch(x, decision), weights, jax.sharding.PartitionSpec(),
        mesh), decision) for name, d in DISPATCHERS.items()}

  kept = np.asarray(decision.kept)
  e_idx = np.asarray(decision.expert_index)
  w = np.asarray(decision.gate) * kept  # [G, S, K]
  expected = np.einsum('gsk,gsd->gsd', w, np.asarray(x)) + np.sum(
      w * (e_idx + 1), axis=-1)[..., None]
  assert 0 < kept.sum() < kept.size  # some drops: slots past C = 3
  mesh = sharding.make_mesh(*mesh_shape)
  with jax.set_mesh(mesh):
    out = jax.jit(run)(x, weights)
  for name, y in out.items():
    np.testing.assert_array_equal(y, expected, err_msg=name)


def test_params_do_not_depend_on_the_mesh():
  # ExpertBank creates its params on the expert-parallel path itself: same
  # names, shapes and values as without a mesh (default threefry keys give
  # the same values however the draw is partitioned).
  bank = moejax.ExpertBank(num_experts=E, d_ff=F, activation='geglu')
  buffers = jnp.ones((8, E, 2, D))  # [G, E, C, D]
  init = lambda: jax.jit(bank.init)(jax.random.key(5), buffers)['params']
  plain = init()
  with jax.set_mesh(sharding.make_mesh(2, 4, 1)):
    on_mesh = init()
  assert set(on_mesh) == {'wi_0', 'wi_1', 'wo'}
  assert jax.tree.structure(on_mesh) == jax.tree.structure(plain)
  for a, b in zip(jax.tree.leaves(on_mesh), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(a, b)


def test_transformer_lm_on_a_mesh_matches_one_device():
  # One MoE block (attention heads and F over 'model', experts over
  # 'expert'), params placed by tree_shardings.
  model = TransformerLM(num_layers=1, d_model=16, num_heads=2, d_ff=16,
                        vocab_size=32, moe=dict(num_experts=4,
                                                capacity_factor=1.0))
  tokens = jnp.asarray(np.arange(64).reshape(8, 8) * 5 % 32, jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
  params = _random_params(abstract['params'], 2)
  forward = jax.jit(lambda p, t: model.apply({'params': p}, t)[0])
  logits0 = forward(params, tokens)
  mesh = sharding.make_mesh(2, 2, 2)
  shardings = sharding.tree_shardings(params, mesh)
  wi = shardings['block_0']['ffn']['experts']['wi']  # [E, D, F]
  assert wi.spec == jax.sharding.PartitionSpec('expert', None, 'model')
  with jax.set_mesh(mesh):
    logits = forward(jax.device_put(params, shardings),
                     jax.device_put(tokens, sharding.batch_sharding(mesh)))
  np.testing.assert_allclose(logits, logits0, rtol=1e-5, atol=1e-5)


def test_accumulated_train_step_on_a_mesh_matches_one_device():
  # Gradient accumulation on (2, 2, 2): B = 8 in M = 2 micro-batches of 4
  # rows, each split over the 4 batch shards, experts over 'expert'. With
  # global-batch balancing ('batch': the counting pass sums f over every
  # micro-batch and device) and the loss-free bias (updated once from the
  # whole batch's counts), the update equals one device's, accumulated or
  # not (SGD with learning rate 1: params compare gradients).
  model = TransformerLM(num_layers=1, d_model=16, num_heads=2, d_ff=16,
                        vocab_size=32, moe=dict(
                            num_experts=4, top_k=2, score_fn='sigmoid',
                            capacity_factor=1.0, bias_update_rate=0.05,
                            aux_loss_scope='batch', priority='token'))
  tokens = jnp.asarray(np.arange(72).reshape(8, 9) * 7 % 31 + 1, jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), tokens[:, :-1])
  params = _random_params(abstract['params'], 3)
  opt = optax.sgd(1.0)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=opt.init(params),
                     model_state={'moe_state': jax.tree.map(
                         jnp.zeros_like, abstract['moe_state'])})

  def run(mesh_shape, micro):
    mesh = None if mesh_shape is None else sharding.make_mesh(*mesh_shape)
    shardings = None if mesh is None else sharding.tree_shardings(state, mesh)
    step = make_train_step(model, opt, seed=0, aux_loss_weight=0.3,
                           mesh=mesh, state_shardings=shardings,
                           grad_accum_steps=micro)
    copy = jax.tree.map(jnp.copy, state)  # the step donates its state
    if mesh is not None:
      copy = jax.device_put(copy, shardings)
    return jax.block_until_ready(step(copy, tokens))

  whole, m_whole = run(None, 1)
  for mesh_shape, micro in ((None, 2), ((2, 2, 2), 2)):
    got, m_got = run(mesh_shape, micro)
    for key in ('loss', 'aux_loss', 'grad_norm'):
      np.testing.assert_allclose(m_got[key], m_whole[key], rtol=1e-5,
                                 err_msg=f'{mesh_shape} {micro} {key}')
    for a, b in zip(jax.tree.leaves((got.params, got.model_state)),
                    jax.tree.leaves((whole.params, whole.model_state))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5,
                                 err_msg=f'{mesh_shape} {micro}')
  bias = whole.model_state['moe_state']['block_0']['ffn']['router']['bias']
  assert float(jnp.abs(bias).max()) > 0


def test_hf_import_onto_a_mesh_matches_one_device():
  # load_pretrained places each leaf on the mesh as it reads it; the
  # expert-parallel forward then gives HF's logits (and the 1-device ones).
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                      'fixtures', 'hf', 'olmoe')
  ref = np.load(os.path.join(path, 'reference.npz'))
  tokens = np.tile(ref['input_ids'], (2, 1))  # B=4: one row per batch shard
  model, variables0 = hf.load_pretrained(path)
  forward = jax.jit(lambda v, t: model.apply(v, t)[0])
  logits0 = forward(variables0, tokens)
  mesh = sharding.make_mesh(2, 2, 2)
  _, variables = hf.load_pretrained(path, mesh=mesh)
  wi = variables['params']['block_1']['ffn']['experts']['wi_0']  # [E, D, F]
  assert wi.sharding.spec == jax.sharding.PartitionSpec('expert', None,
                                                         'model')
  with jax.set_mesh(mesh):
    logits = forward(variables,
                     jax.device_put(tokens, sharding.batch_sharding(mesh)))
  np.testing.assert_allclose(logits, logits0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[:2], ref['logits'], atol=1e-4)


def test_shard_batch_one_process():
  mesh = sharding.make_mesh(2, 4, 1)
  tokens = np.arange(8 * 5).reshape(8, 5)
  assert sharding.process_batch_rows(mesh, 8) == slice(0, 8)
  batch = sharding.shard_batch({'tokens': tokens}, mesh, 8)['tokens']
  np.testing.assert_array_equal(batch, tokens)
  assert batch.sharding.spec == jax.sharding.PartitionSpec(('data', 'expert'))
  # Device (data 1, expert 2) holds batch shard 1 * 4 + 2 = 6: row 6.
  shard = [s for s in batch.addressable_shards
           if s.device == mesh.devices[1, 2, 0]][0]
  np.testing.assert_array_equal(shard.data, tokens[6:7])
  with pytest.raises(ValueError, match='rows 0:8'):
    sharding.shard_batch({'tokens': tokens[:4]}, mesh, 8)


def test_mesh_errors_before_compiling():
  with pytest.raises(ValueError, match=r'needs 16 devices but only 8'):
    sharding.make_mesh(16, 1, 1)
  with pytest.raises(ValueError, match=r'mesh\.expert=-1 cannot fill 8'):
    sharding.make_mesh(3, -1, 1)
  with pytest.raises(ValueError, match=r'only one of .* mesh\.data, '
                     r'mesh\.model'):
    sharding.make_mesh(-1, 2, -1)
  assert sharding.make_mesh(2, -1, 1).shape == {'data': 2, 'expert': 4,
                                                'model': 1}
  cases = [  # (mesh, num_experts, batch, message)
      ((2, 4, 1), 6, B, r'model\.moe\.num_experts=6 must be divisible by '
       r'mesh\.expert=4'),
      ((1, 8, 1), 3, B, r'mesh\.expert=8 is larger than model\.moe\.'
       r'num_experts=3'),
      ((2, 4, 1), E, 2, r'G=2 groups .* mesh\.data \* mesh\.expert = 8'),
  ]
  for shape, num_experts, batch, message in cases:
    layer = _layer('gather', num_experts)
    x = jax.ShapeDtypeStruct((batch, L, D), jnp.float32)
    with jax.set_mesh(sharding.make_mesh(*shape)):
      with pytest.raises(ValueError, match=message):
        jax.eval_shape(layer.init, jax.random.key(0), x)  # traces only
