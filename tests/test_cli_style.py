"""One command-line style (experiments/cli.py) for every `python -m
experiments.X`: argparse through cli.Parser, a bad flag is one stderr line
`error: ... (see --help)` naming it and exit code 2, and --help says what
the program does and its exit codes.

In-process and parse-only (nothing is timed, imported or trained): the
programs without a test file of their own (bench_accumulate, bench_mesh,
benchmark_decode, hf_parity, hf_import_memory, finetune_baselines) get
their flags checked here (bench_mesh's meshes run in
tests/sharding/multidevice_checks.py).
"""

import ast
import json
import os

import pytest

from experiments import bench_accumulate
from experiments import bench_mesh
from experiments import benchmark_decode
from experiments import finetune_baselines
from experiments import hf_import_memory
from experiments import hf_parity
from tests.cli_helpers import assert_bad_flag

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# python -m experiments.X -> the module that parses its flags.
PROGRAMS = {'bench_accumulate': 'bench_accumulate',
            'bench_mesh': 'bench_mesh', 'benchmark': 'benchmark',
            'benchmark_decode': 'benchmark_decode',
            'convert': 'convert', 'demo': 'demo',
            'finetune_baselines': 'finetune_baselines',
            'generate': 'generate', 'hf_import_memory': 'hf_import_memory',
            'hf_parity': 'hf_parity', 'readme_table': 'readme_table',
            'sweep': 'sweep.cli', 'train': 'train'}


def _source(module: str) -> str:
  path = os.path.join(REPO, 'experiments', *module.split('.')) + '.py'
  with open(path, encoding='utf-8') as f:
    return f.read()


def test_every_program_is_listed():
  mains = set()
  for root, _, files in os.walk(os.path.join(REPO, 'experiments')):
    for name in files:
      if name.endswith('.py'):
        with open(os.path.join(root, name), encoding='utf-8') as f:
          if "__name__ == '__main__'" in f.read():
            rel = os.path.relpath(os.path.join(root, name[:-3]),
                                  os.path.join(REPO, 'experiments'))
            mains.add(rel.replace(os.sep, '.').replace('.__main__', ''))
  assert mains == set(PROGRAMS)


@pytest.mark.parametrize('program', sorted(PROGRAMS))
def test_program_parses_with_cli_parser_not_absl(program):
  source = _source(PROGRAMS[program])
  imported = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      imported |= {a.name.split('.')[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      imported.add(node.module.split('.')[0])
  assert 'absl' not in imported
  assert 'argparse.ArgumentParser(' not in source
  assert 'cli.Parser' in source


def test_no_absl_in_experiments_or_moejax():
  for package in ('experiments', 'moejax'):
    for root, _, files in os.walk(os.path.join(REPO, package)):
      for name in files:
        if name.endswith('.py'):
          with open(os.path.join(root, name), encoding='utf-8') as f:
            tree = ast.parse(f.read())
          for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(
                node, ast.Import) else [node.module or ''] if isinstance(
                    node, ast.ImportFrom) else [])
            assert not any(n.split('.')[0] == 'absl' for n in names), name


@pytest.mark.parametrize('program', sorted(PROGRAMS))
def test_help_says_what_and_exit_codes(program, capsys):
  module = __import__(f'experiments.{PROGRAMS[program]}',
                      fromlist=['main'])
  with pytest.raises(SystemExit) as exit_info:
    module.main(['--help'])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith(f'usage: python -m experiments.{program} ')
  assert 'exit codes' in out.lower()
  assert 'error: ' in out  # how a user error looks


# ---------------------------------------------------------------- bench_mesh
@pytest.mark.parametrize('argv, flag, allowed', [
    (['--meshes', '1x1x1,2x4'], '--meshes', 'DATAxEXPERTxMODEL'),
    (['--meshes', '0x1x1'], '--meshes', 'DATAxEXPERTxMODEL'),
    (['--steps', '0'], '--steps', 'an int >= 1'),
    (['--json', '/nonexistent/dir/a.json'], '--json', 'does not exist'),
])
def test_bench_mesh_bad_flag(capsys, argv, flag, allowed):
  assert_bad_flag(capsys, bench_mesh.main, argv, flag, allowed)


def test_bench_mesh_refuses_a_mesh_larger_than_the_devices(capsys):
  # This process has 1 CPU device: a mesh of 2 is refused, naming how to
  # get fake devices, before anything compiles (a config that does not fit
  # a mesh: tests/sharding/trainer_checks.py).
  assert bench_mesh.main(['--config', 'configs/switch.py:tiny',
                          '--dense_config', '', '--meshes', '1x1x1,1x2x1']
                         ) == 2
  err = capsys.readouterr().err.splitlines()
  assert err == ['error: mesh 1x2x1 needs 2 devices but 1 are available; '
                 'allowed: meshes of at most 1 devices; on CPU start with '
                 'XLA_FLAGS=--xla_force_host_platform_device_count=2 '
                 'PJRT_NPROC=4.']


def test_bench_mesh_table_by_hand():
  one, two = (1, 1, 1), (2, 1, 1)
  times = {('moe', one): [2.0, 4.0, 3.0], ('dense', one): [1.0, 1.0, 1.0],
           ('moe', two): [6.0], ('dense', two): [2.0]}
  rows = bench_mesh.table_rows(times, {'moe': 300, 'dense': 300}, [one, two])
  got = {(r['config'], r['mesh']): r for r in rows}
  # moe on 1x1x1: median 3 s -> 300 / 3 = 100 tok/s, 3 / 1 x dense.
  assert got['moe', '1x1x1']['tokens_per_s'] == 100.0
  assert got['moe', '1x1x1']['ratio_to_dense'] == 3.0
  assert got['moe', '1x1x1']['ratio_to_first_mesh'] == 1.0
  # moe on 2x1x1: 6 / 2 = 3 x its dense, 6 / 3 = 2 x its first mesh.
  assert got['moe', '2x1x1']['ratio_to_dense'] == 3.0
  assert got['moe', '2x1x1']['ratio_to_first_mesh'] == 2.0
  assert got['dense', '2x1x1']['ratio_to_dense'] is None
  assert got['dense', '2x1x1']['ratio_to_first_mesh'] == 2.0


# ---------------------------------------------------------- bench_accumulate
@pytest.mark.parametrize('argv, flag, allowed', [
    (['--micro', '2,0'], '--micro', 'a comma-separated list of ints >= 1'),
    (['--scopes', 'group,global'], '--scopes', "'group', 'batch'"),
    (['--repeats', '0'], '--repeats', 'an int >= 1'),
    (['--json', '/nonexistent/dir/a.json'], '--json', 'does not exist'),
])
def test_bench_accumulate_bad_flag(capsys, argv, flag, allowed):
  assert_bad_flag(capsys, bench_accumulate.main, argv, flag, allowed)


def test_bench_accumulate_bad_micro_for_the_batch(capsys):
  # configs/switch.py:tiny has batch_size 16: M = 3 is refused as the
  # trainer refuses it, before anything compiles.
  assert bench_accumulate.main(['--config', 'configs/switch.py:tiny',
                                '--micro', '1,3']) == 2
  err = capsys.readouterr().err.splitlines()
  assert err == ['error: train.grad_accum_steps=3 is not allowed; allowed '
                 'values: a divisor of train.batch_size=16.']


def test_bench_accumulate_rows(tmp_path, capsys):
  out = tmp_path / 'acc.json'
  assert bench_accumulate.main([
      '--config', 'configs/switch.py:tiny', '--micro', '1,2', '--scopes',
      'batch', '--steps', '1', '--repeats', '1', '--json', str(out)]) == 0
  with open(out, encoding='utf-8') as f:
    rows = json.load(f)['rows']
  assert [(r['scope'], r['grad_accum_steps']) for r in rows] == [
      ('batch', 1), ('batch', 2)]
  assert rows[0]['ratio_to_m1'] == 1.0 and rows[1]['ratio_to_m1'] > 0
  assert 'batch    2' in capsys.readouterr().out


# ---------------------------------------------------------- benchmark_decode
TINY = ['--d_model', '16', '--num_heads', '2', '--num_layers', '1',
        '--d_ff', '8', '--vocab_size', '32']


def test_benchmark_decode_defaults_are_the_absl_ones():
  args = benchmark_decode.build_parser().parse_args([])
  assert vars(args) == dict(
      batch_sizes=(1, 64), d_model=512, num_layers=4, num_heads=8,
      d_ff=1024, num_experts=8, top_k=2, vocab_size=256, prompt_len=64,
      new_tokens=33, repeats=3, dispatchers=('auto', 'gather', 'ragged'),
      json=None)


def test_benchmark_decode_flags_reach_the_models():
  args = benchmark_decode.parse_args(
      TINY + ['--batch_sizes=2,3', '--num_experts', '4', '--top_k=1',
              '--dispatchers', 'per_token,einsum'])
  assert args.batch_sizes == (2, 3)
  assert args.dispatchers == ('per_token', 'einsum')
  nets = benchmark_decode.models(args)
  assert nets['dense'].d_ff == 8 and nets['moe'].d_ff == 8  # K * F = 1 * 8
  assert nets['moe'].moe['num_experts'] == 4 and nets['moe'].moe['top_k'] == 1
  assert nets['moe'].num_layers == 1 and nets['moe'].vocab_size == 32


@pytest.mark.parametrize('argv, flag, allowed', [
    (['--batch_sizes', '1,0'], '--batch_sizes',
     'a comma-separated list of ints >= 1'),
    (['--batch_sizes', ''], '--batch_sizes', 'ints >= 1'),
    (['--d_model', 'wide'], '--d_model', 'an int >= 1'),
    (['--new_tokens', '1'], '--new_tokens', 'an int >= 2'),
    (['--dispatchers', 'auto,fast'], '--dispatchers', 'auto, einsum, gather'),
    (TINY + ['--top_k', '9'], '--top_k, --num_experts',
     'top_k=9 must be <= num_experts=8'),
    (TINY + ['--num_heads', '3'], '--num_heads, --d_model',
     'num_heads=3 must divide d_model=16'),
    (TINY + ['--json', '/nonexistent/dir/x.json'], '--json',
     'does not exist'),
    (['--batch_size', '1'], '--batch_size', 'unrecognized arguments'),
    (['64'], '64', 'unrecognized arguments'),
])
def test_benchmark_decode_bad_flag(capsys, argv, flag, allowed):
  assert_bad_flag(capsys, benchmark_decode.main, argv, flag, allowed)


# ----------------------------------------------------------------- hf_parity
def test_hf_parity_defaults_find_the_fixtures():
  args = hf_parity.parse_args([])
  assert args.fixtures == os.path.join('tests', 'fixtures', 'hf')
  assert args.out == os.path.join('results', 'hf_parity.md')
  names = hf_parity.fixture_names(os.path.join(REPO, 'tests', 'fixtures',
                                               'hf'))
  assert 'mixtral' in names and names == sorted(names)


@pytest.mark.parametrize('argv, flag, allowed', [
    (['--fixtures', '/nonexistent'], '--fixtures', 'does not exist'),
    (['--fixtures', os.path.join(REPO, 'setup.py')], '--fixtures',
     'is not a directory'),
    (['--fixtures', REPO], '--fixtures', 'holds no model directory with a '
     'reference.npz'),
    (['--output', 'x.md'], '--output', 'unrecognized arguments'),
])
def test_hf_parity_bad_flag(capsys, argv, flag, allowed):
  assert_bad_flag(capsys, hf_parity.main, argv, flag, allowed)


# ---------------------------------------------------------- hf_import_memory
def test_hf_import_memory_defaults_are_the_absl_ones():
  assert vars(hf_import_memory.parse_args([])) == dict(
      dir='/tmp/moejax_big_mixtral', keep=False, num_layers=8, d_model=1024,
      d_ff=2816, num_experts=8, vocab_size=32000)
  assert hf_import_memory.parse_args(['--keep']).keep


@pytest.mark.parametrize('argv, flag, allowed', [
    (['--num_layers', '0'], '--num_layers', 'an int >= 1'),
    (['--d_model', '24'], '--d_model', 'divisible by 16'),
    (['--num_experts', '1'], '--num_experts', 'an int >= 2'),
    (['--dir', os.path.join(REPO, 'setup.py')], '--dir', 'is a file'),
    (['--keep=yes'], '--keep', 'ignored explicit argument'),
])
def test_hf_import_memory_bad_flag(capsys, argv, flag, allowed):
  assert_bad_flag(capsys, hf_import_memory.main, argv, flag, allowed)


# -------------------------------------------------------- finetune_baselines
@pytest.mark.parametrize('argv, flag, allowed', [
    ([], '--part', 'allowed values: upcycle, finetune'),
    (['--part', 'pretrain'], '--part', "'upcycle', 'finetune'"),
    (['--part', 'upcycle', '--size', 'base'], '--size', "'tiny', 'small'"),
    (['--evaluate', 'w', '--domains', '6,x'], '--domains', 'ints >= 0'),
])
def test_finetune_baselines_bad_flag(capsys, argv, flag, allowed):
  assert_bad_flag(capsys, finetune_baselines.main, argv, flag, allowed)

