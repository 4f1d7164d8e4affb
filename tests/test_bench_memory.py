"""The benchmark's memory gate (experiments/bench_memory.py).

The shape estimate is held to 2x of XLA's own count
(`compiled.memory_analysis()`: argument + output + temp bytes) on small
rows of every dispatcher, chosen so that the activations, not the params,
dominate: the one-hot tensors for 'einsum', the masked dense copies for
'ragged', the weight slices for 'per_token'. Rows over the budget are
skipped before anything of them is compiled (jax.monitoring counts the
backend compiles) and never handed to the timer; --dry_run compiles
nothing at all.
"""

import jax
import jax.numpy as jnp
import pytest

from experiments import bench_common
from experiments import bench_layer
from experiments import bench_memory
from experiments import benchmark
import moejax

COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
# T=1024 in 4 groups of S=256, D=32, F=64: the activations dominate the
# params (E=8: 2 * (8*2*32*64 + 32*8) * 4 bytes = 0.26 MiB).
SMALL = dict(tokens=1024, d_model=32, d_ff=64, group_size=256, repeats=1,
             skip_model=True)


class CompileCounter:
  """Counts XLA backend compiles while registered."""

  def __init__(self):
    self.count = 0

  def __call__(self, event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event == COMPILE_EVENT:
      self.count += 1


@pytest.fixture
def compiles():
  counter = CompileCounter()
  jax.monitoring.register_event_duration_secs_listener(counter)
  yield counter
  jax.monitoring.unregister_event_duration_listener(counter)


def _xla_bytes(s, dispatcher, e, k):
  """XLA's argument + output + temp bytes of a row's fwd+bwd program,
  compiled on abstract inputs (nothing allocated)."""
  x = jax.ShapeDtypeStruct((1, s.tokens, s.d_model),
                           bench_common.DTYPES[s.dtype])
  if dispatcher == 'dense':
    module = moejax.DenseFfn(d_ff=k * s.d_ff, activation='relu',
                                       dtype=x.dtype)
  else:
    module = bench_layer._moe(s, dispatcher, e, k)
  params = jax.eval_shape(lambda: module.init(
      jax.random.key(1, impl='rbg'), jnp.zeros(x.shape, x.dtype))['params'])
  compiled = jax.jit(bench_layer._layer_grad(module)).lower(
      params, x).compile()
  return bench_memory.compiled_bytes(compiled)


@pytest.mark.skipif(jax.default_backend() != 'cpu',
                    reason='the coefficients are fitted on CPU; elsewhere '
                           'the compiled_gate holds rows to XLA\'s count')
@pytest.mark.parametrize('dispatcher, dtype', [
    ('gather', 'float32'), ('einsum', 'float32'), ('ragged', 'float32'),
    ('per_token', 'float32'), ('dense', 'float32'), ('gather', 'bfloat16'),
    ('blocked', 'float32'), ('gather:dropless', 'float32'),
])
def test_estimate_within_2x_of_xla(dispatcher, dtype):
  s = bench_common.Settings(dtype=dtype, **SMALL)
  e, k = 8, 2
  if dispatcher == 'dense':
    estimate_mib = bench_layer._dense_row(s, k, None)['estimate_mib']
  else:
    estimate_mib = bench_layer._layer_row(s, dispatcher, e, k)[
        'estimate_mib']
  ratio = estimate_mib * 2**20 / _xla_bytes(s, dispatcher, e, k)
  assert 0.5 <= ratio <= 2.0, (dispatcher, dtype, ratio)


def test_layer_bytes_by_hand():
  # T=8, S=4 (G=2), E=2, K=1, C=3, D=4, F=8, float32 on CPU (a=4):
  #   params  2 * (2*2*4*8 + 4*2) * 4 = 1088
  #   tokens  8 * 8*4 * 4             = 1024
  #   router  6 * 8*2 * 4             = 384
  #   gather buffers 3 * 2*2*3 * (4+8) * 4 = 1728
  #   einsum one-hot 3 * 2*4*2*3 * 4       = 576
  #   ragged buffers 3 * 8 * 12 * 4        = 1152  (N = T*K = 8)
  #          masked  4 * 2*8 * 12 * 4      = 3072  (CPU only)
  shape = bench_memory.LayerShape(tokens=8, group_size=4, num_experts=2,
                                  top_k=1, capacity=3, d_model=4, d_ff=8)
  gather = bench_memory.layer_bytes('gather', shape, 4, 'cpu')
  assert gather == {'params': 1088, 'tokens': 1024, 'router': 384,
                    'buffers': 1728, 'total': 4224}
  einsum = bench_memory.layer_bytes('einsum', shape, 4, 'cpu')
  assert einsum['one_hot'] == 576 and einsum['total'] == 4224 + 576
  ragged = bench_memory.layer_bytes('ragged', shape, 4, 'cpu')
  assert ragged['buffers'] == 1152 and ragged['masked'] == 3072
  # A grouped-matmul kernel (GPU) has no masked copies.
  assert 'masked' not in bench_memory.layer_bytes('ragged', shape, 4, 'gpu')
  # blocked: N = 8, E = 2: b = 16 (8 / 2 = 4, clipped up to 16), Bk =
  # (8 + 2*15) // 16 = 2 blocks, P = 32 rows: 3 * 32 * 12 * 4 = 4608.
  assert bench_memory.layer_bytes('blocked', shape, 4, 'cpu')[
      'buffers'] == 4608


def test_gate_names_the_largest_part():
  estimate = {'params': 3 * 2**30, 'masked': 28 * 2**30,
              'total': 31 * 2**30}
  status = bench_memory.gate(estimate, 11 * 2**30)
  assert status == ('skipped: estimated 31.0 GiB > budget 11.0 GiB '
                    f'({bench_memory.NOTES["masked"]})')
  assert bench_memory.gate(estimate, 31 * 2**30) == 'ok'  # not over: runs
  assert bench_memory.gate(estimate, None) == 'ok'  # no limit known
  assert bench_memory.gate(estimate, 32 * 2**30, dry_run=True).startswith(
      'fits')


class FakeDevice:
  platform = 'gpu'

  def __init__(self, stats):
    self.stats = stats

  def memory_stats(self):
    return self.stats


def test_memory_budget(monkeypatch):
  assert bench_memory.memory_budget(1.5, None) == (
      int(1.5 * 2**30), '--memory_budget_gb')
  monkeypatch.setattr(bench_memory, 'host_available_bytes', lambda: 8 << 30)
  budget, source = bench_memory.memory_budget(0, jax.devices('cpu')[0])
  assert budget == 4 << 30 and 'MemAvailable 8.0 GiB' in source
  gpu = FakeDevice({'bytes_limit': 100 << 30, 'bytes_in_use': 10 << 30})
  assert bench_memory.memory_budget(0, gpu)[0] == int(0.9 * (90 << 30))
  assert bench_memory.memory_budget(0, FakeDevice({}))[0] is None


def test_over_budget_run_compiles_nothing(compiles, capsys):
  s = bench_common.Settings(**dict(
      SMALL, dispatchers=('gather', 'ragged'), num_experts=(4,), top_k=(1,),
      memory_budget_gb=1e-6, skip_model=False, model_sizes=('tiny',),
      model_kinds=('switch',)))
  report = benchmark.run(s, log=benchmark._log)
  kinds = [r['kind'] for r in report['rows']]
  assert kinds == ['matmul', 'dense', 'layer', 'layer', 'model']
  for row in report['rows']:
    assert row['status'].startswith('skipped: estimated '), row
    assert row['seconds'] is None and row['estimate_mib'] > 0
  assert compiles.count == 0
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == len(kinds)
  assert all(line.startswith('skipped ') for line in lines)


def test_over_budget_row_is_not_timed(monkeypatch):
  """Between the gather and the ragged estimate: gather runs, ragged
  (masked dense on CPU) is skipped and never reaches the timer."""
  s = bench_common.Settings(dispatchers=('gather', 'ragged'),
                            num_experts=(8,), top_k=(2,), **SMALL)
  gather, ragged = (bench_layer._layer_row(s, d, 8, 2)['estimate_mib']
                    for d in s.dispatchers)
  if jax.default_backend() == 'cpu':
    assert ragged > 2 * gather
  s.memory_budget_gb = (gather + ragged) / 2 / 1024
  timed = []
  real = bench_layer.time_interleaved

  def spy(entries, repeats, budget=None):
    timed.extend(entries)
    return real(entries, repeats, budget)

  monkeypatch.setattr(bench_layer, 'time_interleaved', spy)
  rows = bench_layer.layer_rows(s, 1e9, int(s.memory_budget_gb * 2**30),
                                lambda row: None)
  by_kind = {r['dispatcher']: r for r in rows}
  assert by_kind['gather']['status'] == 'ok'
  assert by_kind['gather']['seconds'] > 0
  assert by_kind['gather']['compiled_mib'] > 0
  if jax.default_backend() == 'cpu':
    assert by_kind['ragged']['status'].startswith('skipped: estimated')
    assert 'masked dense' in by_kind['ragged']['status']
    assert by_kind['ragged']['seconds'] is None
    assert 'ragged' not in timed
  assert 'gather' in timed


def test_compiled_gate_skips_before_running():
  calls = []

  def fn(x):
    jax.debug.callback(lambda: calls.append(1))
    return x * 2

  result = bench_common.time_interleaved(
      {'f': (fn, (jnp.ones(1024),))}, repeats=1, budget=1)['f']
  assert result['status'].startswith('skipped: compiled ')
  assert result['seconds'] is None and result['compiled_mib'] > 0
  assert calls == []  # compiled, never run
  ok = bench_common.time_interleaved(
      {'f': (fn, (jnp.ones(1024),))}, repeats=1, budget=2**30)['f']
  assert ok['status'] == 'ok' and calls  # the same program fits a GiB


def test_dry_run_of_the_default_grid(compiles):
  """Every default row is planned or skipped, nothing is compiled; with a
  10 GiB budget on CPU the 'ragged' rows at E >= 64 are skipped."""
  s = bench_common.Settings(dry_run=True, memory_budget_gb=10)
  report = benchmark.run(s, log=lambda row: None)
  assert compiles.count == 0
  rows = report['rows']
  assert len(rows) == 1 + 2 + 3 * 3 * 2 + 2 * 3  # matmul, dense, layer, model
  skipped = {(r.get('dispatcher'), r.get('num_experts'), r.get('top_k'))
             for r in rows
             if r['status'].startswith('skipped')}
  for row in rows:
    assert row['seconds'] is None and row['estimate_mib'] > 0
    assert row['status'].startswith(('fits (--dry_run', 'skipped: ')), row
  if jax.default_backend() == 'cpu':
    assert skipped == {('ragged', e, k) for e in (64, 256) for k in (1, 2)}
  assert report['machine']['memory_budget_mib'] == 10 * 1024
