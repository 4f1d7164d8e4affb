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
    ('range', 'switch', 'model.moe.group_sequences', '0',
     ['model.moe.group_sequences must be None (one group per sequence), an '
      'int >= 1, or -1 (one group of the whole batch); got 0']),
    ('contradiction', 'switch', 'train.master_weights', 'true',
     ['train.master_weights=True is not allowed', "True needs "
      "model.param_dtype='bfloat16'"]),
    ('range', 'switch', 'model.moe.group_sequences', '-2',
     ['model.moe.group_sequences must be', 'an int >= 1, or -1', 'got -2']),
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
    ('range', 'dense', 'train.grad_accum_steps', '0',
     ['train.grad_accum_steps=0', 'int >= 1']),
    ('contradiction', 'dense', 'train.grad_accum_steps', '3',
     ['train.grad_accum_steps=3', 'a divisor of train.batch_size=4']),
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
    # non-finite numbers (1e999 parses as inf) in any float key
    ('range', 'dense', 'train.learning_rate', '1e999',
     ['train.learning_rate=inf', 'allowed values: a finite number.']),
    ('range', 'switch', 'model.moe.capacity_factor', '-1e999',
     ['model.moe.capacity_factor=-inf', 'a finite number or None']),
    ('range', 'dense', 'model.rope_base', '1e400',
     ['model.rope_base=inf', 'a finite number']),
    # unknown keys and values
    ('unknown', 'switch', 'model.moe.num_expert', '8',
     ["'model.moe.num_expert'", 'Did you mean model.moe.num_experts']),
    ('unknown', 'switch', 'model.moe.router', 'no_such_router',
     ["model.moe.router='no_such_router'", "allowed values: 'topk'"]),
    ('unknown', 'switch', 'model.moe.group_order', 'rows',
     ["model.moe.group_order='rows'", "'sequence', 'position'"]),
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
    ('contradiction', 'switch', 'model.moe.group_sequences', '3',
     ['model.moe.group_sequences=3 does not divide the 4 sequences of a '
      'batch (train.batch_size=4)', 'None or a divisor of 4']),
    # groups of 2 whole sequences (S = 2 * 16) in memory order: a leak
    ('contradiction', 'switch', 'model.moe.group_order', 'sequence',
     ["model.moe.group_sequences=-1 (S=64 tokens) with "
      "model.moe.group_order='sequence'", 'which the causal LM must not '
      "see; allowed: model.moe.group_order='position'"]),
    # the config's group of the whole batch and a group size in tokens
    ('contradiction', 'switch', 'model.moe.group_size', '32',
     ['model.moe.group_size=32 and model.moe.group_sequences=-1 both set '
      'the size of a routing group', 'one of them (the other None) (-1 is '
      'the default of configs/switch.py and configs/gshard.py: give '
      'model.moe.group_sequences=None with a group_size)']),
    ('contradiction', 'switch', 'model.moe.first_dense_layers', '2',
     ['model.moe.first_dense_layers=2', 'leaves no MoE layer',
      'model.moe.first_dense_layers + model.moe.moe_every <= 2']),
    ('contradiction', 'switch', 'model.moe.second_expert_policy', 'random',
     ["model.moe.second_expert_policy='random'", 'model.moe.top_k=1',
      "'all' with top_k=1, or model.moe.top_k >= 2"]),
    ('contradiction', 'dense', 'model.num_heads', '3',
     ['model.num_heads=3 must divide model.d_model=32']),
    # train / data sizes that were silently clamped or repeated
    ('contradiction', 'dense', 'train.warmup_steps', '41',
     ['train.warmup_steps=41', 'allowed values: an int in [0, '
      'train.steps=40]']),
    ('contradiction', 'dense', 'data.num_train', '3',
     ['data.num_train=3 examples is fewer than train.batch_size=4',
      'train.batch_size <= 3']),
    ('contradiction', 'dense', 'data.num_eval', '7',
     ['data.num_eval=7 examples is too few for train.eval_batches=2 x '
      'train.batch_size=4', '>= 8 eval examples']),
    ('contradiction', 'dense', 'model.d_model', '30',
     ['model.d_model=30', 'odd head width 15',
      'a multiple of 2 x model.num_heads = 4']),
    # causal model with non-causal routing
    ('causal', 'switch', 'model.moe.priority', 'score',
     ["model.moe.priority='score'", "'choice' or 'token'",
      'model.moe.allow_noncausal_routing=True']),
    ('causal', 'switch', 'model.moe.top_k', '2',
     ["model.moe.priority='choice' with 2 choices per token and a capacity "
      '(model.moe.capacity_factor=1.25, model.moe.eval_capacity_factor=2.0',
      "later tokens' 1st choices", "priority 'choice' or 'token'",
      'model.moe.allow_noncausal_routing=True']),
    ('causal', 'switch', 'model.moe.router', 'expert_choice',
     ["model.moe.router='expert_choice'", "router='topk'",
      'model.moe.allow_noncausal_routing=True']),
    ('causal', 'switch', 'model.moe.router', 'soft_moe',
     ["model.moe.router='soft_moe'", "router='topk'"]),
    # router options
    ('unknown', 'switch', 'model.task', 'seq2seq',
     ["model.task='seq2seq'", "'lm', 'classify'"]),
    ('contradiction', 'expert_choice', 'model.moe.top_k', '2',
     ['model.moe.top_k=2', "router='topk' or 'relu' only",
      'leave it at 1']),
    ('contradiction', 'deepseek', 'model.moe.granularity', '3',
     ['model.d_ff=64', 'model.moe.granularity=3']),
    ('contradiction', 'deepseek', 'model.moe.num_groups', '3',
     ['model.moe.num_groups=3 must divide the 8']),
    ('contradiction', 'deepseek', 'model.moe.topk_groups', '4',
     ['model.moe.topk_groups=4 must be <= model.moe.num_groups=2']),
    ('range', 'deepseek', 'model.moe.bias_update_rate', '-0.1',
     ['model.moe.bias_update_rate', '>= 0']),
    ('range', 'soft_moe', 'model.moe.slots_per_expert', '0',
     ['model.moe.slots_per_expert', 'must be an int >= 1']),
    ('contradiction', 'soft_moe', 'model.moe.dispatcher', 'ragged',
     ["dispatcher='ragged'", "'gather', 'einsum'"]),
    # dense config with MoE-only keys set
    ('dense+moe', 'dense', 'model.moe.top_k', '2',
     ['model.moe.top_k=2 is an MoE-only setting',
      'the default 1, or set model.moe.num_experts >= 1']),
    ('dense+moe', 'dense', 'model.moe.group_sequences', '2',
     ['model.moe.group_sequences=2 is an MoE-only setting',
      'the default None']),
    ('dense+moe', 'dense', 'model.moe.aux_loss_weight', '0.1',
     ['model.moe.aux_loss_weight=0.1', 'the default 0.01']),
    ('dense+moe', 'dense', 'model.moe.priority', 'score',
     ["model.moe.priority='score' is an MoE-only setting",
      "the default 'choice'"]),
    # ReMoE, null experts, Mixture-of-Depths (their options and owners)
    ('unknown', 'switch', 'model.moe.router', 'relux',
     ["model.moe.router='relux'", "'topk'", "'relu'"]),
    ('contradiction', 'switch', 'model.moe.relu_l1_alpha', '0.9',
     ['model.moe.relu_l1_alpha=0.9', "router='relu' only", 'leave it at 1.2']),
    ('contradiction', 'remoe', 'model.moe.num_null_experts', '2',
     ['model.moe.num_null_experts=2', "router='topk' only", 'leave it at 0']),
    ('range', 'switch', 'model.moe.num_null_experts', '-2',
     ['model.moe.num_null_experts', 'an int >= 0', 'got -2']),
    ('range', 'mod', 'model.mod.every', '-1',
     ['model.mod.every=-1', '0 (off) or an int >= 1']),
    ('range', 'mod', 'model.mod.capacity', '1.5',
     ['model.mod.capacity=1.5', 'a number in (0, 1]']),
    ('unknown', 'mod', 'model.mod.predictor', 'lstm',
     ["model.mod.predictor='lstm'", "'mlp', 'router'"]),
    ('contradiction', 'switch', 'model.mod.capacity', '0.5',
     ['model.mod.capacity=0.5 applies only to Mixture-of-Depths blocks',
      'the default 0.125, or model.mod.every >= 1']),
    ('contradiction', 'expert_choice', 'model.mod.every', '2',
     ['model.mod.every=2', "model.task='lm' only"]),
]
# The device mesh and jax.distributed (these tests run with 1 device, so a
# mesh of 2 is larger than the devices available).
BAD += [
    ('mesh', 'switch', 'mesh.expert', '3',
     ['model.moe.num_experts=4 must be divisible by mesh.expert=3',
      'allowed mesh.expert values: divisors or multiples of 4']),
    ('mesh', 'switch', 'mesh.expert', '6',
     ['mesh.expert=6 is larger than model.moe.num_experts=4 and must then '
      'be a multiple of it']),
    ('mesh', 'dense', 'mesh.data', '8',
     ['train.batch_size=4 must be divisible by the batch shards mesh.data * '
      'mesh.expert = 8']),
    ('mesh', 'dense', 'mesh.expert', '2',
     ['the mesh (mesh.data=1, mesh.expert=2, mesh.model=1) needs 2 devices '
      'but only 1 are available', 'mesh.data * mesh.expert * mesh.model <= '
      '1']),
    ('mesh', 'dense', 'mesh.model', '0',
     ['mesh.model=0 must be an int >= 1, or -1']),
    ('mesh', 'dense', 'distributed.process_id', '1',
     ['distributed.process_id=1 is set but jax.distributed is not started',
      "distributed.coordinator_address='host:port'"]),
    ('mesh', 'dense', 'distributed.coordinator_address', 'localhost',
     ["distributed.coordinator_address='localhost'", "'host:port' of "
      'process 0']),
    ('mesh', 'dense', 'distributed.num_processes', '0',
     ['distributed.num_processes=0', 'None or an int >= 1']),
]
# Mesh and micro-batch errors that need two keys: (config, overrides,
# expected texts).
BAD_MESH_PAIRS = [
    # Micro-batches of 4 / 2 = 2 rows (32 tokens) cannot hold a group of 4
    # whole sequences, nor split over 4 batch shards.
    ('switch', {'train.grad_accum_steps': 2, 'model.moe.group_size': 64,
                'model.moe.group_sequences': None,
                'model.moe.group_order': 'position'},
     ['model.moe.group_size=64 does not divide the 32 tokens of a '
      'micro-batch (train.batch_size=4 / train.grad_accum_steps=2',
      'None or a divisor of 32']),
    ('switch', {'mesh.data': 4, 'train.grad_accum_steps': 2,
                'model.moe.group_sequences': None},
     ['train.grad_accum_steps=2 makes micro-batches of train.batch_size=4 / '
      '2 = 2 rows, which the batch shards mesh.data * mesh.expert = 4 do not '
      'divide', 'a train.grad_accum_steps dividing 1']),
    # B=4 sequences of L=16 in groups of S=32: G = 4 * 16 / 32 = 2 groups,
    # not divisible by the 4 batch shards (B = 4 is).
    ('switch', {'mesh.data': 4, 'model.moe.group_size': 32,
                'model.moe.group_sequences': None,
                'model.moe.group_order': 'position'},
     ['G=2 groups', 'must be divisible by the batch shards mesh.data * '
      'mesh.expert = 4']),
    ('switch', {'model.moe.group_size': 7, 'model.moe.group_sequences': None},
     ['model.moe.group_size=7', 'None or a divisor of 64']),
    # groups of 2 sequences (L = 16) in memory order: a causal leak
    ('switch', {'model.moe.group_size': 32, 'model.moe.group_sequences': None,
                'model.moe.group_order': 'sequence'},
     ["model.moe.group_size=32 with model.moe.group_order='sequence'",
      "which the causal LM must not see; allowed: "
      "model.moe.group_order='position' with group_size a multiple of 16"]),
    ('switch', {'model.moe.group_size': 32, 'model.moe.group_sequences': 2,
                'model.moe.group_order': 'position'},
     ['model.moe.group_size=32 and model.moe.group_sequences=2 both set the '
      'size of a routing group', 'one of them (the other None)']),
    # 2 sequences per micro-batch: a group of 4 whole sequences cannot fit.
    ('switch', {'train.grad_accum_steps': 2, 'model.moe.group_sequences': 4,
                'model.moe.group_order': 'position'},
     ['model.moe.group_sequences=4 does not divide the 2 sequences of a '
      'micro-batch (train.batch_size=4 / train.grad_accum_steps=2',
      'None or a divisor of 2']),
    # Mixture-of-Depths blocks (every 2nd) route Lc = ceil(0.125 * 16) = 2
    # tokens per sequence: 4 * 2 = 8 tokens, which S = 32 does not divide
    # (the other blocks' 64 tokens it does); caught before the model runs.
    ('mod', {'model.moe.num_experts': 4, 'model.moe.group_size': 32,
             'model.moe.group_order': 'position'},
     ['model.moe.group_size=32 does not divide the 8 tokens of a batch '
      '(train.batch_size=4 x Lc=2) in the Mixture-of-Depths blocks',
      'or model.moe.group_sequences (groups of whole sequences, k * 2 '
      'tokens here)']),
    # One group of the whole batch (-1): each micro-batch would be its own
    # group; on a mesh, 2 batch shards cannot split one group.
    ('switch', {'train.grad_accum_steps': 2, 'model.moe.group_sequences': -1,
                'model.moe.group_order': 'position'},
     ['model.moe.group_sequences=-1 makes one routing group of the whole '
      'batch, but train.grad_accum_steps=2 runs micro-batches of 2 '
      'sequences', 'allowed: model.moe.group_sequences = a divisor of 2, or '
      'train.grad_accum_steps=1']),
    ('switch', {'mesh.data': 2, 'model.moe.group_sequences': -1,
                'model.moe.group_order': 'position'},
     ['model.moe.group_sequences=-1 makes one routing group of the whole '
      'batch, which the batch shards mesh.data * mesh.expert = 2 cannot '
      'split', 'allowed: model.moe.group_sequences = a divisor of 2 (the '
      'sequences of one batch shard)']),
    ('dense', {'mesh.data': -1, 'mesh.expert': -1},
     ['only one of mesh.data, mesh.expert, mesh.model may be -1; got -1 for '
      'mesh.data, mesh.expert']),
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


def test_the_table_is_distinct_and_covers_every_category():
  assert len({(b[1], b[2], b[3]) for b in BAD}) == len(BAD) >= 20
  assert {b[0] for b in BAD} == {'type', 'range', 'unknown', 'contradiction',
                                 'causal', 'dense+moe', 'mesh'}


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


@pytest.mark.parametrize('config,overrides,expected', BAD_MESH_PAIRS)
def test_bad_mesh_exits_2_naming_the_keys(config, overrides, expected,
                                          data_dir, tmp_path, capsys,
                                          compile_events):
  workdir = tmp_path / 'run'
  argv = helpers.small_args(config, str(workdir), data_dir) + [
      f'--config.{k}={v}' for k, v in overrides.items()]
  assert train.main(argv) == 2
  err = capsys.readouterr().err
  for text in expected:
    assert text in err, (text, err)
  assert not workdir.exists()
  assert not compile_events


def test_unknown_key_in_a_config_file(data_dir, tmp_path, capsys,
                                      compile_events):
  path = tmp_path / 'extra_key.py'
  path.write_text(
      'from configs import base\n\n'
      'def get_config(arg=None):\n'
      '  c = base.sized_config(arg, dict(num_experts=4))\n'
      '  c.model.moe.num_shared_expert = 1\n'
      '  return c\n')
  argv = helpers.small_args('switch', str(tmp_path / 'run'), data_dir)
  argv[0] = f'--config={path}:tiny'
  assert train.main(argv) == 2
  err = capsys.readouterr().err
  assert "unknown config key 'model.moe.num_shared_expert'" in err, err
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


def test_classifier_needs_domain_labels(tmp_path):
  config = config_lib.load_config(
      os.path.join(helpers.REPO, 'configs', 'expert_choice.py') + ':tiny')
  config.data.name = 'local_text'
  config.data.pattern = str(tmp_path / '*.txt')
  with pytest.raises(ValueError, match="data.name='local_text'") as info:
    config_lib.validate_config(config)
  assert "data.name='synthetic_mixture'" in str(info.value)


# Config files that cannot be loaded: (file text, texts of the one line).
BROKEN_FILES = [
    ('syntax', 'from configs import base\n\ndef get_config(arg=None)\n'
     '  return base.sized_config(arg, {})\n',
     ['has a syntax error at line 3', "'def get_config(arg=None)'"]),
    ('indent', 'def get_config(arg=None):\nreturn None\n',
     ['has a syntax error at line 2', 'expected an indented block']),
    ('import', 'from configs import base\nimport no_such_module_xyz\n',
     ['raised ModuleNotFoundError at line 2 when imported',
      "No module named 'no_such_module_xyz'"]),
    ('get_config', 'from configs import base\n\ndef get_config(arg=None):\n'
     '  c = base.sized_config(arg, {})\n  return c.model.no_such_key\n',
     ["get_config('tiny') raised AttributeError at line 5", 'no_such_key']),
    ('returns None', 'def get_config(arg=None):\n  return None\n',
     ["get_config('tiny') returned a NoneType",
      'allowed: an ml_collections.ConfigDict']),
    ('nan value', 'from configs import base\n\ndef get_config(arg=None):\n'
     '  c = base.sized_config(arg, dict(num_experts=4))\n'
     "  c.model.rope_base = float('nan')\n  return c\n",
     ['model.rope_base=nan', 'allowed values: a finite number']),
]


@pytest.mark.parametrize('name,text,expected', BROKEN_FILES,
                         ids=[b[0] for b in BROKEN_FILES])
def test_broken_config_file_is_one_line_exit_2(name, text, expected, data_dir,
                                               tmp_path, capsys,
                                               compile_events):
  path = tmp_path / 'broken.py'
  path.write_text(text)
  argv = helpers.small_args('switch', str(tmp_path / 'run'), data_dir)
  argv[0] = f'--config={path}:tiny'
  assert train.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1, err
  assert 'Traceback' not in err
  if name != 'nan value':  # the others name the file
    assert repr(str(path)) in err, err
  for text in expected:
    assert text in err, (text, err)
  assert not (tmp_path / 'run').exists()
  assert not compile_events


def test_broken_config_file_in_a_process_is_one_line(tmp_path):
  path = tmp_path / 'broken.py'
  path.write_text('def get_config(arg=None):\n  return {\n')
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.train', f'--config={path}',
       f'--workdir={tmp_path / "run"}'], cwd=helpers.REPO,
      env=dict(os.environ, PYTHONPATH=helpers.REPO), capture_output=True,
      text=True, timeout=120, check=False)
  assert proc.returncode == 2
  assert proc.stderr == (f'error: --config file {str(path)!r} has a syntax '
                         "error at line 2: '{' was never closed ('return "
                         "{').\n"), proc.stderr


def test_local_text_splits_too_small_for_the_batch(tmp_path, capsys,
                                                   compile_events):
  # 20 chunks of 17 bytes: 19 train examples, ceil(0.05 * 20) = 1 eval.
  (tmp_path / 'a.txt').write_bytes(bytes(range(256)) + bytes(83))
  argv = helpers.small_args('dense', str(tmp_path / 'run'),
                            str(tmp_path / 'tfds')) + [
                                '--config.data.name=local_text',
                                f'--config.data.pattern={tmp_path}/*.txt']
  assert train.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: data.eval_split='validation' of data.name="
                        f"'local_text' (data.pattern='{tmp_path}/*.txt') "
                        'holds 1 examples, too few for train.eval_batches=2 '
                        'x train.batch_size=4'), err
  assert not compile_events
  assert train.main(argv + ['--config.train.batch_size=20']) == 2
  assert ('holds 19 examples, fewer than train.batch_size=20; allowed '
          'values: train.batch_size <= 19') in capsys.readouterr().err
