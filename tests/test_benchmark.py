"""experiments.benchmark end to end on its tiniest grid (no timing checks).

One subprocess run of `python -m experiments.benchmark --quick` restricted
to E=4, K in {1, 2}, the tiny dense and switch models; XLA's backend
optimisations are off in it (compile time dominates a grid this small).
The --profile rows are checked in-process on one (E, K).
"""

import itertools
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DISPATCHERS = ('einsum', 'gather', 'ragged')
NUM_EXPERTS = (4,)
TOP_K = (1, 2)
MODEL_KINDS = ('dense', 'switch')
NUMBER = (int, float)
LAYER_TYPES = {'kind': str, 'dispatcher': str, 'num_experts': int,
               'top_k': int, 'tokens': int, 'group_size': int,
               'status': str}
OPTIONAL_NUMBERS = ('seconds', 'dense_seconds', 'ratio_to_dense',
                    'speedup_vs_einsum', 'pct_of_matmul_peak', 'temp_mib',
                    'device_peak_mib')
MODEL_TYPES = {'kind': str, 'model': str, 'size': str, 'num_experts': int,
               'top_k': int, 'seconds': NUMBER, 'tokens_per_s': NUMBER,
               'ratio_to_dense': NUMBER, 'flops_per_token': int,
               'mfu_pct': NUMBER}


@pytest.fixture(scope='module')
def result(tmp_path_factory):
  """(report dict, stdout) of one quick run."""
  out = tmp_path_factory.mktemp('bench') / 'bench.json'
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      ' --xla_backend_optimization_level=0').strip()
  cmd = [sys.executable, '-m', 'experiments.benchmark', '--quick',
         '--dispatchers', ','.join(DISPATCHERS),
         '--num_experts', ','.join(map(str, NUM_EXPERTS)),
         '--top_k', ','.join(map(str, TOP_K)),
         '--model_kinds', ','.join(MODEL_KINDS), '--json', str(out)]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=240, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    return json.load(f), proc.stdout


def _check_types(row, types):
  for key, kind in types.items():
    assert key in row, (key, row)
    assert isinstance(row[key], kind), (key, row[key])


def test_machine(result):
  machine = result[0]['machine']
  for key in ('backend', 'device_kind'):
    assert isinstance(machine[key], str) and machine[key]
  assert isinstance(machine['device_count'], int)
  assert machine['device_count'] >= 1
  assert isinstance(machine['jax_version'], str)
  assert machine['matmul_flops_per_s'] > 0


def test_layer_rows_cover_the_grid(result):
  rows = [r for r in result[0]['rows'] if r['kind'] == 'layer']
  grid = {(r['dispatcher'], r['num_experts'], r['top_k']) for r in rows}
  assert grid == set(itertools.product(DISPATCHERS, NUM_EXPERTS, TOP_K))
  assert len(rows) == len(grid)
  for row in rows:
    _check_types(row, LAYER_TYPES)
    for key in OPTIONAL_NUMBERS:
      assert key in row and (row[key] is None or
                             isinstance(row[key], NUMBER)), (key, row)
    assert row['tokens'] == 512
    if row['dispatcher'] == 'ragged':  # dropless: no capacity
      assert row['capacity'] is None and row['capacity_factor'] is None
    else:
      assert row['capacity'] >= 1
    assert row['status'] == 'ok', row
    assert row['seconds'] > 0 and row['pct_of_matmul_peak'] > 0
    assert row['ratio_to_dense'] > 0 and row['speedup_vs_einsum'] > 0
    if row['dispatcher'] == 'einsum':
      assert row['speedup_vs_einsum'] == 1.0


def test_dense_rows(result):
  rows = [r for r in result[0]['rows'] if r['kind'] == 'dense']
  assert sorted(r['top_k'] for r in rows) == list(TOP_K)
  for row in rows:
    assert row['seconds'] > 0 and row['ratio_to_dense'] == 1.0
    assert row['d_ff'] == row['top_k'] * 128  # K * F: equal activated FLOPs


def test_model_rows(result):
  rows = [r for r in result[0]['rows'] if r['kind'] == 'model']
  assert [(r['size'], r['model']) for r in rows] == [
      ('tiny', kind) for kind in MODEL_KINDS]
  for row in rows:
    _check_types(row, MODEL_TYPES)
    assert row['seconds'] > 0 and row['tokens_per_s'] > 0
    assert row['flops_per_token'] > 0 and row['mfu_pct'] > 0
  assert rows[0]['ratio_to_dense'] == 1.0


def test_markdown_table(result):
  report, stdout = result
  lines = stdout.strip().splitlines()
  assert lines[0].startswith('machine: backend=')
  table = [line for line in lines if line.startswith('|')]
  separators = [i for i, line in enumerate(table) if line.startswith('|---')]
  assert len(separators) == 3  # matmul, layer (+ dense), model tables
  for i in separators:  # each separator follows its header row
    assert i >= 1 and not table[i - 1].startswith('|---')
    assert table[i - 1].count('|') == table[i].count('|')
  body = len(table) - 2 * len(separators)
  assert body == len(report['rows'])  # one line per row
  assert sum('| gather |' in line for line in table) == len(TOP_K)
  assert not any('skipped' in line for line in table)


def test_profile_rows_in_process():
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import benchmark  # pylint: disable=g-import-not-at-top
  s = benchmark.Settings(dispatchers=('gather',), num_experts=(4,),
                         top_k=(2,), tokens=64, d_model=8, d_ff=16,
                         group_size=32, repeats=1, profile=True)
  x = jax.random.normal(jax.random.key(0), (1, 64, 8))
  params = benchmark.init_params(benchmark._moe(s, 'gather', 4, 2), x)
  rows = benchmark.layer_group(s, 4, 2, x, params,
                               benchmark.dense_entry(s, 2, x), peak=1e9)
  assert [r['kind'] for r in rows] == ['layer'] + ['profile'] * 4
  assert rows[0]['seconds'] > 0 and rows[0]['dense_seconds'] > 0
  assert rows[0]['speedup_vs_einsum'] is None  # no einsum row to pair with
  assert [r['component'] for r in rows[1:]] == [
      'router', 'dispatch', 'experts', 'combine']
  for row in rows[1:]:
    assert row['status'] == 'ok' and row['seconds'] > 0
    assert row['pct_of_layer'] > 0 and row['ratio_to_dense'] > 0
  text = benchmark.markdown({'backend': 'test'}, rows)
  assert sum(line.startswith('| gather | 4 | 2 |')
             for line in text.splitlines()) == len(rows)
