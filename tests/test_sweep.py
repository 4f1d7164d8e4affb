"""experiments.sweep: a 2-point sweep of a tiny model, end to end.

Point `learning_rate=0.01` trains (4 steps of a 1-layer, D=32 Switch LM);
point `learning_rate=1e+30` is a valid config that diverges in training
(the trainer's non-finite guard: exit 3). The sweep must report the
failure, finish the other point, write the tables and plots, and on a
second invocation skip the finished point (no new attempt, checkpoints and
metrics untouched) while retrying the failed one. A sweep with an invalid
value in its 2nd point (`top_k=8` > num_experts = 4) must fail before
anything trains, naming the point and the key. The dense baseline is left
out here (--no_baseline) to keep the test to one training run; its runs are
planned in test_plan_with_baseline and the baseline arithmetic is tested in
tests/analysis/test_results.py.
"""

import csv
import importlib.util
import json
import math
import os
import re

import pytest

from experiments import sweep
from experiments.sweep import points as points_lib
from moejax.data import load_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = dict(num_train=128, num_eval=16, example_len=17, vocab_size=64)
CONFIG = '''
from configs import switch

def get_config(arg=None):
  return switch.get_config(arg)

def get_sweeps(arg=None):
  return {'two': [{'train.learning_rate': 0.01},
                  {'train.learning_rate': 1e30}],
          'bad_second': [{'model.moe.top_k': 1}, {'model.moe.top_k': 8}],
          'bad_lr': [{'train.learning_rate': 0.01},
                     {'train.learning_rate': float('inf')}]}
'''


def _overrides(data_dir):
  values = {'data.data_dir': data_dir, 'data.seq_len': 16,
            'data.num_train': DATA['num_train'],
            'data.num_eval': DATA['num_eval'],
            'data.example_len': DATA['example_len'],
            'data.vocab_size': DATA['vocab_size'], 'model.d_model': 32,
            'model.d_ff': 64, 'model.num_heads': 2, 'model.num_layers': 1,
            'train.batch_size': 4,
            'train.steps': 4, 'train.log_every': 2, 'train.eval_every': 4,
            'train.checkpoint_every': 4, 'train.eval_batches': 2,
            'train.warmup_steps': 1}
  return [f'--config.{k}={v}' for k, v in values.items()]


@pytest.fixture(scope='module')
def sweep_setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('sweep')
  data_dir = str(root / 'tfds')
  for split in ('train', 'validation'):
    load_source('synthetic_mixture', split, data_dir, **DATA)
  config = root / 'tiny_sweep.py'
  config.write_text(CONFIG)
  return str(config), data_dir, str(root / 'out')


def _attempts(workdir):
  with open(os.path.join(workdir, 'sweep_point.json')) as f:
    return json.load(f)['attempts']


def test_runner_reports_failure_and_skips_finished(sweep_setup, capsys,
                                                   monkeypatch):
  config, data_dir, out = sweep_setup
  # The runs inherit the environment: XLA's cheapest CPU backend
  # optimisation halves their compile time; this test checks plumbing, not
  # numbers.
  monkeypatch.setenv('XLA_FLAGS', (os.environ.get('XLA_FLAGS', '') +
                                   ' --xla_backend_optimization_level=0'))
  argv = ([f'--config={config}:tiny', '--sweep=two', f'--workdir={out}',
           '--no_baseline', '--parallel=2'] + _overrides(data_dir))
  assert sweep.main(argv) == 1  # one point failed
  log = capsys.readouterr().out
  assert 'FAILED learning_rate=1e+30,seed=0: exit 3' in log
  assert 'non-finite' in log  # the trainer's stderr is reported
  assert 'done learning_rate=0.01,seed=0' in log

  good = os.path.join(out, 'learning_rate=0.01,seed=0')
  with open(os.path.join(out, 'results.csv')) as f:
    rows = {r['point']: r for r in csv.DictReader(f)}
  assert set(rows) == {'learning_rate=0.01', 'learning_rate=1e+30'}
  ok, failed = rows['learning_rate=0.01'], rows['learning_rate=1e+30']
  assert ok['status'] == 'ok' and failed['status'] == 'failed'
  assert math.isfinite(float(ok['eval_loss']))
  assert 0 <= float(ok['spec_nmi']) <= 1
  assert float(ok['params_total']) > float(ok['params_active'])
  assert failed['eval_loss'] == ''
  with open(os.path.join(out, 'results.md')) as f:
    text = f.read()
  assert '| 0.01 | ' in text and '0/1 ok' in text and '## Failed runs' in text
  for name in ('metrics_vs_value', 'loss_curves', 'expert_load'):
    assert os.path.getsize(os.path.join(out, 'plots', name + '.png')) > 0
  with open(os.path.join(good, 'analysis.json')) as f:
    layers = json.load(f)['layers']
  assert sorted(layers) == ['block_0']
  for layer in layers.values():  # K = 1: captured top-1 load = layer's load
    assert layer['top1_load'] == pytest.approx(layer['expert_load'], abs=1e-6)
    assert 0.0 <= layer['nmi'] <= 1.0

  stamps = {p: os.stat(os.path.join(good, p)).st_mtime_ns
            for p in ('metrics.jsonl', 'analysis.json', 'checkpoints')}
  assert sweep.main(argv) == 1
  log = capsys.readouterr().out
  assert 'skip learning_rate=0.01,seed=0: finished (step 4)' in log
  assert 'train learning_rate=0.01' not in log
  assert 'train learning_rate=1e+30,seed=0' in log
  assert len(_attempts(good)) == 1
  assert len(_attempts(os.path.join(out, 'learning_rate=1e+30,seed=0'))) == 2
  assert stamps == {p: os.stat(os.path.join(good, p)).st_mtime_ns
                    for p in stamps}


@pytest.mark.parametrize('name,expected', [
    ('bad_second', ['sweep point 2 of 2 (top_k=8,seed=0)',
                    'model.moe.top_k=8 must be <= model.moe.num_experts=4']),
    ('bad_lr', ['sweep point 2 of 2 (learning_rate=inf,seed=0)',
                'train.learning_rate=inf', 'a finite number'])])
def test_every_point_is_validated_before_the_first_trains(
    sweep_setup, tmp_path, capsys, name, expected):
  config, data_dir, _ = sweep_setup
  out = tmp_path / 'out'
  argv = ([f'--config={config}:tiny', f'--sweep={name}', f'--workdir={out}',
           '--no_baseline'] + _overrides(data_dir))
  assert sweep.main(argv) == 2
  captured = capsys.readouterr()
  assert captured.err.startswith('error: '), captured.err
  for text in expected:
    assert text in captured.err, (text, captured.err)
  assert 'train ' not in captured.out  # no run was started
  assert not out.exists()  # not even the sweep dir


def test_data_that_cannot_be_built_stops_the_sweep_first(sweep_setup,
                                                         tmp_path, capsys):
  config, data_dir, _ = sweep_setup
  out = tmp_path / 'out'
  argv = ([f'--config={config}:tiny', '--sweep=data.name=synthetic_mixture,'
           'no_such_dataset', f'--workdir={out}', '--no_baseline'] +
          _overrides(data_dir))
  assert sweep.main(argv) == 2
  captured = capsys.readouterr()
  assert "the data of run name=no_such_dataset,seed=0: data.name=" in \
      captured.err, captured.err
  assert 'train ' not in captured.out
  assert not (out / 'name=synthetic_mixture,seed=0').exists()


def test_plan_with_baseline_and_seeds(sweep_setup, capsys):
  config, data_dir, out = sweep_setup
  argv = ([f'--config={config}:tiny', '--sweep=two', f'--workdir={out}',
           '--seeds=2', '--dry_run', '--baseline_config=configs/dense.py:tiny',
           '--config.model.moe.jitter_eps=0.01'] + _overrides(data_dir))
  assert sweep.main(argv) == 0
  lines = capsys.readouterr().out.splitlines()
  names = [line.split(':')[0] for line in lines]
  assert names == ['dense,seed=0', 'dense,seed=1', 'learning_rate=0.01,seed=0',
                   'learning_rate=0.01,seed=1', 'learning_rate=1e+30,seed=0',
                   'learning_rate=1e+30,seed=1']
  dense = lines[1]
  assert f'--config={REPO}/configs/dense.py:tiny' in dense
  assert '--config.seed=1' in dense and 'model.moe' not in dense
  assert '--config.train.steps=4' in dense  # global overrides apply
  assert '--config.train.learning_rate=1e+30' in lines[5]
  assert '--config.model.moe.jitter_eps=0.01' in lines[5]
  # No dense.py next to this config and no --baseline_config: exit 2.
  assert sweep.main([f'--config={config}:tiny', '--sweep=two',
                     f'--workdir={out}', '--dry_run']) == 2
  assert 'dense baseline config' in capsys.readouterr().err


def test_declared_sweeps_and_bad_arguments(capsys):
  # Every declared sweep of the shipped configs names real keys.
  for name in ('switch', 'gshard', 'dense'):
    spec = os.path.join(REPO, 'configs', name + '.py') + ':small'
    sweeps = points_lib.load_sweeps(spec)
    assert 'seeds' in sweeps
    for sweep_name in sweeps:
      assert sweep.main([f'--config={spec}', f'--sweep={sweep_name}',
                         '--workdir=/nonexistent', '--dry_run']) == 0
  capsys.readouterr()
  switch = os.path.join(REPO, 'configs', 'switch.py') + ':tiny'
  assert sweep.main([f'--config={switch}', '--sweep=nope',
                     '--workdir=/nonexistent']) == 2
  assert "allowed values: 'experts'" in capsys.readouterr().err
  assert sweep.main([f'--config={switch}', '--sweep=model.moe.topk=1,2',
                     '--workdir=/nonexistent']) == 2
  assert "unknown config key 'model.moe.topk'" in capsys.readouterr().err
  assert sweep.main([f'--config={switch}', '--sweep=seeds', '--seeds=2',
                     '--workdir=/nonexistent']) == 2
  assert 'sets seed, so --seeds must be 1' in capsys.readouterr().err


@pytest.mark.parametrize('argv, needles', [
    (['--parallel', '0'], ['argument --parallel', "'0'", 'an int >= 1']),
    (['--seeds=two'], ['argument --seeds', "'two'", 'an int >= 1']),
    (['--seedz', '2', '--workdir', 'w'], ["unrecognized argument '--seedz'"]),
    (['--config.train.steps'], ['--config.<key>=<value>']),
    ([], ['required: --config, --sweep, --workdir']),
])
def test_bad_flags_are_one_line_and_exit_2(capsys, argv, needles):
  base = {'--config': 'configs/switch.py:tiny', '--sweep': 'experts',
          '--workdir': '/nonexistent'}
  if argv:
    argv = [a for k, v in base.items() if k not in argv for a in (k, v)] + argv
  with pytest.raises(SystemExit) as exit_info:  # cli.Parser
    sweep.main(argv)
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.out == ''
  lines = captured.err.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), captured.err
  assert lines[0].endswith('(see --help)'), lines[0]
  for text in needles:
    assert text in lines[0], (text, lines[0])


def test_citation_version_matches_setup():
  # CITATION.cff (CFF 1.2.0) must cite the version setup.py installs.
  with open(os.path.join(REPO, 'setup.py')) as f:
    version = re.search(r"version='([^']+)'", f.read()).group(1)
  with open(os.path.join(REPO, 'CITATION.cff')) as f:
    cff = f.read()
  assert cff.startswith('cff-version: 1.2.0\n')
  assert f'\nversion: "{version}"\n' in cff
  for key in ('message:', 'title:', 'authors:', 'date-released:'):
    assert f'\n{key}' in cff


def test_header_names_the_stdlib_corpus(tmp_path, monkeypatch):
  """A sweep on python_stdlib records the corpus's provenance line, once
  per (data_dir, example_len); other data adds none."""
  # pylint: disable-next=import-outside-toplevel
  from experiments.sweep import cli as sweep_cli
  seen = []

  def fake_info(data_dir, example_len):
    seen.append((data_dir, example_len))
    return {'python_version': '3.11.7', 'root': '/x',
            'content_sha256': 'ab' * 32, 'num_files': 3,
            'splits': {'train': {'bytes': 2.5e6},
                       'validation': {'bytes': 0.5e6}}}

  monkeypatch.setattr(sweep_cli.data_lib, 'stdlib_corpus_info', fake_info)
  runs = []
  for i, name in enumerate(('python_stdlib', 'python_stdlib',
                            'synthetic_mixture')):
    workdir = tmp_path / f'run{i}'
    workdir.mkdir()
    (workdir / 'config.json').write_text(json.dumps(
        {'data': {'name': name, 'data_dir': str(tmp_path),
                  'example_len': 129}}))
    runs.append(points_lib.Run(name=f'r{i}', group='g', seed=i, point={},
                               overrides={}, config='c', workdir=str(workdir),
                               steps=1))
  assert sweep_cli._data_line(runs) == [
      'Data: python_stdlib: Python 3.11.7 stdlib, sha256 abababababababab, 3 '
      'files, 2.5M train + 0.5M validation byte tokens  ']
  assert seen == [(str(tmp_path), 129)]
  assert sweep_cli._data_line(runs[2:]) == []


def test_labelled_points_name_their_runs_and_rows(sweep_setup):
  config, _, out = sweep_setup
  labelled = [{points_lib.LABEL_KEY: 'low lr', 'train.learning_rate': 0.01},
              {points_lib.LABEL_KEY: 'two-experts',
               'model.moe.num_experts': 2}]
  assert points_lib.swept_keys(labelled) == ['train.learning_rate',
                                             'model.moe.num_experts']
  assert points_lib.table_keys(labelled) == []  # the labels are the column
  assert points_lib.table_keys(labelled[1:] and [{'a.b': 1}]) == ['a.b']
  args = sweep_cli_args(config, out)
  runs = points_lib.make_runs(args, labelled, {})
  assert [r.name for r in runs] == ['low_lr,seed=0', 'two-experts,seed=0']
  assert runs[1].point == {'model.moe.num_experts': 2}  # no label in overrides
  assert points_lib.LABEL_KEY not in runs[1].overrides
  for bad, needle in (([labelled[0], {'model.moe.num_experts': 2}],
                       'on some'),
                      ([{points_lib.LABEL_KEY: ''}], 'non-empty string')):
    with pytest.raises(ValueError, match=needle):
      points_lib.make_runs(args, bad, {})


def sweep_cli_args(config, out):
  import argparse  # pylint: disable=import-outside-toplevel
  return argparse.Namespace(config=f'{config}:tiny', workdir=out, seeds=1,
                            no_baseline=True, baseline_config=None,
                            baseline_root=None)


def _sweep_configs(argv, capsys) -> list:
  """tools/sweep_configs.py's output for a sweep command."""
  path = os.path.join(REPO, 'tools', 'sweep_configs.py')
  spec = importlib.util.spec_from_file_location('sweep_configs', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  capsys.readouterr()
  assert module.main(argv) == 0
  return json.loads(capsys.readouterr().out)


def test_switch_configs_default_to_one_group_of_the_whole_batch(capsys):
  """The Switch / GShard configs route each batch as one position-major
  group (k = train.batch_size sequences); the per-sequence tables' flags
  and the capacity_groups points give the layouts the README says, as
  tools/sweep_configs.py reports them."""
  for name in ('switch', 'gshard'):
    for size, batch in (('tiny', 16), ('small', 8)):
      argv = ['--config', f'configs/{name}.py:{size}', '--sweep',
              'model.moe.capacity_factor=1.0,2.0', '--workdir', '/x',
              '--no_baseline']
      runs = _sweep_configs(argv, capsys)
      assert [r['model']['moe']['groups'] for r in runs] == [
          [batch, 'position']] * 2, (name, size)
      per_seq = _sweep_configs(argv + [
          '--config.model.moe.group_sequences=None',
          '--config.model.moe.group_order=sequence'], capsys)
      assert [r['model']['moe']['groups'] for r in per_seq] == [[1, 'any']] * 2
  # capacity_groups names its groups itself: the whole batch of 8 whole
  # sequences whatever the flags say.
  runs = _sweep_configs(['--config', 'configs/switch.py:small', '--sweep',
                         'capacity_groups', '--workdir', '/x',
                         '--no_baseline',
                         '--config.model.moe.group_sequences=None'], capsys)
  assert {tuple(r['model']['moe']['groups']) for r in runs} == {
      (8, 'position')}
  assert len(runs) == 4
