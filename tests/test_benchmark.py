"""experiments.benchmark end to end on its tiniest grid (no timing checks).

One subprocess run of `python -m experiments.benchmark --quick` restricted
to E=4, K in {1, 2}, the tiny dense and switch models; XLA's backend
optimisations are off in it (compile time dominates a grid this small).
The --profile rows are checked in-process on one (E, K), and the command
line (--quick's defaults, comma lists, one-line errors with exit code 2)
through parse_args, without measuring anything. The memory gate has its
own tests (tests/test_bench_memory.py); here every row of the quick run
fits the budget, carries its estimate, and the estimate is within 2x of
XLA's count for the rows that ran.
"""

import itertools
import json
import os
import subprocess
import sys

import pytest

from tests.cli_helpers import assert_bad_flag

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
                    'compiled_mib', 'device_peak_mib')
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
  assert machine['memory_budget_mib'] > 0  # read from the device
  assert machine['memory_budget_source']


def test_every_row_has_its_estimate_within_2x(result):
  rows = [r for r in result[0]['rows'] if r['kind'] != 'profile']
  assert len(rows) == 1 + len(TOP_K) * (1 + len(DISPATCHERS)) + len(
      MODEL_KINDS)
  for row in rows:
    assert row['status'] == 'ok', row  # the quick grid fits any machine
    ratio = row['estimate_mib'] / row['compiled_mib']
    assert 0.5 <= ratio <= 2.0, (row, ratio)


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
  from experiments import bench_layer  # pylint: disable=g-import-not-at-top
  from experiments import benchmark  # pylint: disable=g-import-not-at-top
  s = benchmark.Settings(dispatchers=('gather',), num_experts=(4,),
                         top_k=(2,), tokens=64, d_model=8, d_ff=16,
                         group_size=32, repeats=1, profile=True)
  x = jax.random.normal(jax.random.key(0), (1, 64, 8))
  params = benchmark.init_params(bench_layer._moe(s, 'gather', 4, 2), x)
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


def test_shared_experts_widen_the_dense_pair_and_the_flops():
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import bench_layer  # pylint: disable=g-import-not-at-top
  from experiments import benchmark  # pylint: disable=g-import-not-at-top
  s = benchmark.Settings(dispatchers=('gather',), num_experts=(4,),
                         top_k=(1,), tokens=64, d_model=8, d_ff=16,
                         group_size=32, repeats=1, shared_experts=2)
  x = jax.random.normal(jax.random.key(0), (1, 64, 8))
  layer = bench_layer._moe(s, 'gather', 4, 1)
  params = benchmark.init_params(layer, x)
  assert params['shared']['wi'].shape == (8, 2 * 16)  # n * F wide
  dense = benchmark.dense_entry(s, 1, x)
  assert dense[1][0]['wi'].shape == (8, (1 + 2) * 16)  # (K + n) * F
  row = benchmark.layer_group(s, 4, 1, x, params, dense, peak=1e9)[0]
  # 12 * T * D * F * (K + n) + 6 * T * D * E = 12*64*8*16*3 + 6*64*8*4.
  assert row['flops'] == 294912 + 12288
  assert row['status'] == 'ok' and row['ratio_to_dense'] > 0
  assert row['pct_of_vendor_peak'] is None  # float32 on CPU: no vendor peak


def test_presets_set_the_shapes_under_the_flags_given():
  from experiments import bench_common  # pylint: disable=g-import-not-at-top
  from experiments import benchmark  # pylint: disable=g-import-not-at-top
  s, _ = benchmark.parse_args(['--preset', 'deepseek', '--preset_scale',
                               '16', '--top_k', '4'])
  # D = 2048 / 16, F = 1408 / 16; K given on the command line wins.
  assert (s.d_model, s.d_ff, s.num_experts, s.top_k,
          s.shared_experts) == (128, 88, (64,), (4,), 2)
  s, _ = benchmark.parse_args(['--preset', 'mixtral'])  # CPU: scale 8
  assert (s.d_model, s.d_ff, s.num_experts, s.top_k) == (512, 1792, (8,),
                                                          (2,))
  assert bench_common.vendor_peak('NVIDIA H100 80GB HBM3',
                                  'bfloat16') == 989e12
  assert bench_common.vendor_peak('TPU v5p', 'bfloat16') == 459e12
  assert bench_common.vendor_peak('NVIDIA H100 80GB HBM3', 'float32') is None
  assert bench_common.vendor_peak('cpu', 'bfloat16') is None


def test_no_flags_are_the_settings_defaults():
  from experiments import benchmark  # pylint: disable=g-import-not-at-top
  assert benchmark.parse_args([]) == (benchmark.Settings(), None)


def test_every_setting_is_a_flag():
  import dataclasses  # pylint: disable=g-import-not-at-top
  from experiments import benchmark  # pylint: disable=g-import-not-at-top
  dests = {a.dest for a in benchmark.build_parser()._actions}
  assert {f.name for f in dataclasses.fields(benchmark.Settings)} <= dests


def test_quick_sets_only_the_flags_not_given(tmp_path):
  from experiments import benchmark  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'b.json')
  settings, json_path = benchmark.parse_args([
      '--quick', '--tokens', '8192', '--group_size=512', '--dispatchers',
      'einsum,gather', '--num_experts', '4,16', '--skip_model', '--json',
      out, '--memory_budget_gb', '2.5', '--dry_run'])
  assert json_path == out
  # Given: kept, even where equal to the non-quick default (tokens 8192).
  assert (settings.tokens, settings.group_size) == (8192, 512)
  assert settings.dispatchers == ('einsum', 'gather')
  assert settings.num_experts == (4, 16) and settings.skip_model
  assert settings.memory_budget_gb == 2.5 and settings.dry_run
  # Not given: QUICK's value where it has one, else the Settings default.
  assert (settings.d_model, settings.d_ff, settings.repeats) == (64, 128, 2)
  assert settings.model_sizes == ('tiny',) and settings.matmul_size == 1024
  assert settings.capacity_factor == 1.25 and not settings.profile
  assert settings.model_kinds == ('dense', 'switch', 'gshard')


@pytest.mark.parametrize('argv, flag, allowed', [
    (['--dispatchers', 'einsum,sparse'], '--dispatchers',
     'einsum, gather, ragged'),
    (['--num_experts', '8,x'], '--num_experts', 'ints >= 1'),
    (['--top_k', '1,'], '--top_k', 'ints >= 1'),
    (['--num_experts', '2', '--top_k', '1,3'], '--top_k', '1 <= K <= every E'),
    (['--quick', '--top_k', '8'], '--num_experts 4', '1 <= K <= every E'),
    (['--tokens', '512', '--group_size', '200'], '--group_size',
     'a divisor of --tokens'),
    (['--dtype', 'float16'], '--dtype', 'float32, bfloat16'),
    (['--model_sizes', 'huge'], '--model_sizes', 'tiny'),
    (['--model_kinds', 'dense,moe'], '--model_kinds', 'switch, gshard'),
    (['--capacity_factor', '-1'], '--capacity_factor', 'a number > 0'),
    (['--repeats', '0'], '--repeats', 'an int >= 1'),
    (['--memory_budget_gb', '-1'], '--memory_budget_gb', 'a number >= 0'),
    (['--preset', 'mixtrall'], '--preset', 'mixtral, deepseek, switch'),
    (['--shared_experts', '-1'], '--shared_experts', 'an int >= 0'),
    (['--json', '/nonexistent/dir/b.json'], '--json', 'does not exist'),
    (['--quick', 'extra'], 'extra', 'unrecognized arguments'),
])
def test_bad_flag_is_one_line_and_exit_2(capsys, argv, flag, allowed):
  from experiments import benchmark  # pylint: disable=g-import-not-at-top
  assert_bad_flag(capsys, benchmark.main, argv, flag, allowed)


def test_help_says_what_and_exit_codes(capsys):
  from experiments import benchmark  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as exit_info:
    benchmark.main(['--help'])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert 'Speed of the MoE layer' in out and 'exit codes:' in out
  assert 'E values; default 8,64,256; --quick: 4,8' in out
