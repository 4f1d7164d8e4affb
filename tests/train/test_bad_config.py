"""Bad configs exit with code 2 and a message naming the key, before any
data is built or anything is traced or compiled."""

import json
import os
import subprocess
import sys

import jax
import pytest

from experiments import train
from tests.train import helpers

# (config, override key, override text, text the message must contain)
BAD = [
    ('switch', 'model.moe.top_k', '5', 'model.moe.top_k=5'),
    ('gshard', 'model.moe.top_k', '0', 'model.moe.top_k'),
    ('switch', 'model.moe.capacity_factor', '0', 'model.moe.capacity_factor'),
    ('switch', 'model.moe.capacity_factor', 'high',
     'model.moe.capacity_factor'),
    ('switch', 'model.moe.router', 'expert_choice', 'model.moe.router'),
    ('switch', 'model.moe.dispatcher', 'scatter', 'model.moe.dispatcher'),
    ('switch', 'model.moe.priority', 'score', 'model.moe.priority'),
    ('gshard', 'model.moe.second_expert_policy', 'sometimes',
     'model.moe.second_expert_policy'),
    ('switch', 'model.moe.group_size', '7', 'model.moe.group_size=7'),
    ('switch', 'model.moe.num_expert', '8', 'model.moe.num_experts'),
    ('dense', 'model.activation', 'tanh', 'model.activation'),
    ('dense', 'model.dtype', 'float8', 'model.dtype'),
    ('dense', 'model.num_heads', '3', 'model.num_heads=3'),
    ('dense', 'train.steps', '0', 'train.steps'),
    ('dense', 'train.steps', 'many', 'train.steps'),
    ('dense', 'train.batch_size', '-4', 'train.batch_size'),
    ('dense', 'train.learning_rate', '0', 'train.learning_rate'),
    ('dense', 'data.seq_len', '32', 'data.seq_len=32'),
    ('dense', 'data.name', '5', 'data.name'),
    ('dense', 'data.name', 'no_such_dataset_xyz', 'data.name'),
]


@pytest.fixture
def compile_events():
  """Names of JAX trace/compile events recorded while the test runs."""
  events = []

  def listener(name, duration, **kwargs):
    del duration, kwargs
    if name.startswith('/jax/core/compile/'):
      events.append(name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  yield events
  jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize('config,key,value,expected', BAD,
                         ids=[f'{b[1]}={b[2]}' for b in BAD])
def test_bad_config_exits_2_naming_the_key(config, key, value, expected,
                                           data_dir, tmp_path, capsys,
                                           compile_events):
  workdir = tmp_path / 'run'
  argv = helpers.small_args(config, str(workdir), data_dir) + [
      f'--config.{key}={value}']
  assert train.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and expected in err, err
  assert not workdir.exists()  # no config.json, metrics or checkpoints
  assert not compile_events


def test_unknown_top_level_key_suggests_the_right_one(data_dir, tmp_path,
                                                      capsys):
  argv = helpers.small_args('dense', str(tmp_path / 'run'), data_dir) + [
      '--config.trian.steps=5']
  assert train.main(argv) == 2
  err = capsys.readouterr().err
  assert "'trian.steps'" in err and 'train.steps' in err


def test_bad_variant_and_missing_file(tmp_path, capsys):
  for spec, expected in (('configs/switch.py:huge', "'huge'"),
                         ('configs/nope.py', 'nope.py')):
    argv = [f'--config={spec}', f'--workdir={tmp_path}/run']
    assert train.main(argv) == 2
    assert expected in capsys.readouterr().err


def test_cli_process_exits_2(data_dir, tmp_path):
  argv = helpers.small_args('switch', str(tmp_path / 'run'), data_dir) + [
      '--config.model.moe.top_k=9']
  env = dict(os.environ, PYTHONPATH=helpers.REPO)
  proc = subprocess.run([sys.executable, '-m', 'experiments.train'] + argv,
                        cwd=helpers.REPO, env=env, capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 2
  assert proc.stderr.startswith('error: model.moe.top_k=9'), proc.stderr
  assert not (tmp_path / 'run').exists()


def test_resuming_with_other_model_shapes_is_refused(data_dir, tmp_path,
                                                     capsys, compile_events):
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints').mkdir(parents=True)
  args, overrides = train.parse_args(
      helpers.small_args('switch', str(workdir), data_dir))
  saved = train.load_and_validate(args.config, overrides).to_dict()
  (workdir / 'config.json').write_text(json.dumps(saved))
  argv = helpers.small_args('switch', str(workdir), data_dir) + [
      '--config.model.d_model=64']
  assert train.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: model.d_model=64 differs from 32'), err
  assert not (workdir / 'metrics.jsonl').exists()
  assert not compile_events
