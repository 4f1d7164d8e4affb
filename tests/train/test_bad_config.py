"""Bad configs exit with code 2 and a message naming the key, before any
data is built or anything is traced or compiled."""

import json
import os
import subprocess
import sys

import jax
import pytest

from experiments import config_lib
from experiments import train
from tests.train import helpers

# (category, config, override key, override text, texts the message must
# contain: the key with the value, and what is allowed).
BAD = [
    # wrong types
    ('type', 'switch', 'model.moe.capacity_factor', 'high',
     ["model.moe.capacity_factor='high'", 'expected a number or None']),
    ('type', 'dense', 'train.steps', 'many',
     ["train.steps='many'", 'expected an int']),
    ('type', 'dense', 'data.name', '5', ['data.name=5', 'expected a string']),
    ('type', 'switch', 'model.moe.top_k', '1.5',
     ['model.moe.top_k=1.5', 'expected an int, got float']),
    ('type', 'dense', 'model.tie_embeddings', '1',
     ['model.tie_embeddings=1', 'expected a bool, got int']),
    ('type', 'dense', 'seed', 'abc', ["seed='abc'", 'expected an int']),
    # out of range
    ('range', 'gshard', 'model.moe.top_k', '0',
     ['model.moe.top_k must be an int >= 1, got 0']),
    ('range', 'switch', 'model.moe.capacity_factor', '0',
     ['model.moe.capacity_factor must be a number > 0, or None for '
      'dropless; got 0']),
    ('range', 'switch', 'model.moe.eval_capacity_factor', '-1',
     ['model.moe.eval_capacity_factor', 'got -1', '> 0, or None']),
    ('range', 'switch', 'model.moe.num_experts', '-2',
     ['model.moe.num_experts=-2', '0 (dense) or an int >= 1']),
    ('range', 'switch', 'model.moe.min_capacity', '-1',
     ['model.moe.min_capacity must be an int >= 0, got -1']),
    ('range', 'switch', 'model.moe.jitter_eps', '1.5',
     ['model.moe.jitter_eps must be in [0, 1), got 1.5']),
    ('range', 'switch', 'model.moe.aux_loss_weight', '-0.01',
     ['model.moe.aux_loss_weight=-0.01', '>= 0']),
    ('range', 'switch', 'model.moe.moe_every', '0',
     ['model.moe.moe_every must be an int >= 1, got 0']),
    ('range', 'dense', 'train.steps', '0', ['train.steps=0', 'int >= 1']),
    ('range', 'dense', 'train.batch_size', '-4',
     ['train.batch_size=-4', 'int >= 1']),
    ('range', 'dense', 'train.learning_rate', '0',
     ['train.learning_rate=0', 'a number > 0']),
    ('range', 'dense', 'train.b2', '1.0', ['train.b2=1.0', '[0, 1)']),
    ('range', 'dense', 'train.keep_checkpoints', '0',
     ['train.keep_checkpoints=0', 'int >= 1']),
    ('range', 'dense', 'seed', '-1', ['seed=-1', '[0, 2**32)']),
    ('range', 'dense', 'data.seq_len', '32',
     ['data.seq_len=32', 'data.seq_len <= 16']),
    ('range', 'dense', 'data.pad_id', '64',
     ['data.pad_id=64', 'None or a token id in [0, 64)']),
    # unknown keys and values
    ('unknown', 'switch', 'model.moe.num_expert', '8',
     ["'model.moe.num_expert'", 'Did you mean model.moe.num_experts']),
    ('unknown', 'switch', 'model.moe.router', 'no_such_router',
     ["model.moe.router='no_such_router'", "allowed values: 'topk'"]),
    ('unknown', 'switch', 'model.moe.dispatcher', 'scatter',
     ["model.moe.dispatcher='scatter'", "'gather'"]),
    ('unknown', 'gshard', 'model.moe.second_expert_policy', 'sometimes',
     ["model.moe.second_expert_policy='sometimes'", "'all', 'random'"]),
    ('unknown', 'dense', 'model.activation', 'tanh',
     ["model.activation='tanh'", "'relu', 'gelu', 'swiglu', 'geglu'"]),
    ('unknown', 'dense', 'model.dtype', 'float8',
     ["model.dtype='float8'", "'float32', 'bfloat16'"]),
    ('unknown', 'dense', 'data.name', 'no_such_dataset_xyz',
     ["data.name='no_such_dataset_xyz'", "'synthetic_mixture', 'local_text'"]),
    # contradictory settings
    ('contradiction', 'switch', 'model.moe.top_k', '5',
     ['model.moe.top_k=5 must be <= model.moe.num_experts=4']),
    ('contradiction', 'switch', 'model.moe.group_size', '7',
     ['model.moe.group_size=7', 'None or a divisor of 64']),
    ('contradiction', 'switch', 'model.moe.first_dense_layers', '2',
     ['model.moe.first_dense_layers=2', 'leaves no MoE layer',
      'model.moe.first_dense_layers + model.moe.moe_every <= 2']),
    ('contradiction', 'switch', 'model.moe.second_expert_policy', 'random',
     ["model.moe.second_expert_policy='random'", 'model.moe.top_k=1',
      "'all' with top_k=1, or model.moe.top_k >= 2"]),
    ('contradiction', 'dense', 'model.num_heads', '3',
     ['model.num_heads=3 must divide model.d_model=32']),
    ('contradiction', 'dense', 'model.d_model', '30',
     ['model.d_model=30', 'odd head width 15',
      'a multiple of 2 x model.num_heads = 4']),
    # causal model with non-causal routing
    ('causal', 'switch', 'model.moe.priority', 'score',
     ["model.moe.priority='score'", "'choice' or 'token'",
      'model.moe.allow_noncausal_routing=True']),
    # dense config with MoE-only keys set
    ('dense+moe', 'dense', 'model.moe.top_k', '2',
     ['model.moe.top_k=2 is an MoE-only setting',
      'the default 1, or set model.moe.num_experts >= 1']),
    ('dense+moe', 'dense', 'model.moe.aux_loss_weight', '0.1',
     ['model.moe.aux_loss_weight=0.1', 'the default 0.01']),
    ('dense+moe', 'dense', 'model.moe.priority', 'score',
     ["model.moe.priority='score' is an MoE-only setting",
      "the default 'choice'"]),
]
# Mesh / device-count mismatches (experts not divisible by the expert mesh
# axis, ...) come with the sharding work and its config keys.


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


def test_the_table_is_distinct_and_covers_every_category():
  assert len({(b[1], b[2], b[3]) for b in BAD}) == len(BAD) >= 20
  assert {b[0] for b in BAD} == {'type', 'range', 'unknown', 'contradiction',
                                 'causal', 'dense+moe'}


@pytest.mark.parametrize('category,config,key,value,expected', BAD,
                         ids=[f'{b[0]}:{b[1]}:{b[2]}={b[3]}' for b in BAD])
def test_bad_config_exits_2_naming_the_key(category, config, key, value,
                                           expected, data_dir, tmp_path,
                                           capsys, compile_events):
  del category
  workdir = tmp_path / 'run'
  argv = helpers.small_args(config, str(workdir), data_dir) + [
      f'--config.{key}={value}']
  assert train.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: '), err
  for text in expected:
    assert text in err, (text, err)
  assert not workdir.exists()  # no config.json, metrics or checkpoints
  assert not compile_events


def test_unknown_key_in_a_config_file(data_dir, tmp_path, capsys,
                                      compile_events):
  path = tmp_path / 'extra_key.py'
  path.write_text(
      'from configs import base\n\n'
      'def get_config(arg=None):\n'
      '  c = base.sized_config(arg, dict(num_experts=4))\n'
      '  c.model.moe.num_shared_experts = 1\n'
      '  return c\n')
  argv = helpers.small_args('switch', str(tmp_path / 'run'), data_dir)
  argv[0] = f'--config={path}:tiny'
  assert train.main(argv) == 2
  err = capsys.readouterr().err
  assert "unknown config key 'model.moe.num_shared_experts'" in err, err
  assert not compile_events


def test_noncausal_routing_accepted_when_explicitly_allowed(data_dir):
  argv = helpers.small_args('switch', '/unused', data_dir) + [
      '--config.model.moe.priority=score',
      '--config.model.moe.allow_noncausal_routing=true']
  args, overrides = train.parse_args(argv)
  config = train.load_and_validate(args.config, overrides)
  model = config_lib.build_model(config)
  assert model.moe['priority'] == 'score'
  assert model.moe['allow_noncausal_routing'] is True


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


def test_resuming_with_another_config_is_refused(data_dir, tmp_path,
                                                 capsys, compile_events):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  args, overrides = train.parse_args(
      helpers.small_args('switch', str(workdir), data_dir))
  saved = config_lib.resolved_config(
      train.load_and_validate(args.config, overrides))
  (workdir / 'config.json').write_text(json.dumps(saved))
  argv = helpers.small_args('switch', str(workdir), data_dir) + [
      '--config.model.d_model=64', '--config.train.steps=50']
  assert train.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: --workdir {workdir} holds a run with a '
                        'different config'), err
  assert '\n  model.d_model: 32 -> 64\n  train.steps: 40 -> 50\n' in err
  assert sorted(os.listdir(workdir)) == ['config.json']
  assert not compile_events
