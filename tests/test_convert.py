"""experiments.convert and init.from_workdir: HF checkpoints into work dirs
that the trainer fine-tunes, back out bit for bit, and runs started from
another run's params.

The flow (one module-scoped import of tests/fixtures/hf/mixtral):
  convert --hf_dir -> W0 (config.json + checkpoints/0)
  convert --to_hf of W0 -> the fixture's tensors, bit for bit
  train --workdir <copy of W0> for 2 steps -> finite losses; its step-1
    checkpoint holds the imported params exactly: the learning rate of
    step 0 is 0 (linear warmup from 0), so the first update changes nothing
    and any other start would show.
The same trick checks --init_from on a tiny switch run. Bad inputs exit 2
with one line naming the key or path.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from experiments import config_lib
from experiments import convert
from experiments import train
from experiments import workdir_config
from moejax.data import load_source
from moejax.interop import hf
from moejax.interop import hf_config
from moejax.train import Checkpointer
from moejax.train import abstract_train_state
from moejax.train import read_metrics
from moejax.train.checkpoint import InitSourceError
from moejax.train.checkpoint import restore_init_variables
from tests.train import helpers

FIXTURES = os.path.join(helpers.REPO, 'tests', 'fixtures', 'hf')
MIXTRAL = os.path.join(FIXTURES, 'mixtral')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """The small synthetic mixture of the training tests (V = 64)."""
  path = str(tmp_path_factory.mktemp('tfds'))
  for split in ('train', 'validation'):
    load_source('synthetic_mixture', split, path, **helpers.DATA)
  return path


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """Runs of one config share compiled programs (values are unchanged); the
  cache is this module's only (helpers.persistent_compilation_cache)."""
  with helpers.persistent_compilation_cache(tmp_path_factory.mktemp('xla')):
    yield


def _small(data_dir: str, **extra) -> list[str]:
  """--config.<key> arguments of a tiny run on the small data."""
  values = {
      'data.data_dir': data_dir, 'data.seq_len': 16,
      'data.example_len': helpers.DATA['example_len'],
      'data.num_train': helpers.DATA['num_train'],
      'data.num_eval': helpers.DATA['num_eval'],
      'data.vocab_size': helpers.DATA['vocab_size'],
      'train.batch_size': 4, 'train.eval_batches': 2, 'train.log_every': 1,
      'train.eval_every': 100, 'train.checkpoint_every': 1,
      'train.warmup_steps': 2, 'train.steps': 2}
  values.update({k.replace('__', '.'): v for k, v in extra.items()})
  return [f'--config.{k}={v}' for k, v in values.items()]


def _state(workdir: str, step: int):
  """The TrainState of checkpoint `step` (config from config.json)."""
  config = workdir_config.load_stored_config(workdir)
  model = config_lib.build_model(config)
  optimizer, _ = config_lib.build_optimizer(config)
  abstract = abstract_train_state(
      model, optimizer, (config.train.batch_size, config.data.seq_len))
  checkpointer = Checkpointer(workdir, log=lambda m: None)
  try:
    return checkpointer.restore(abstract, step)
  finally:
    checkpointer.close()


def _assert_bitwise(tree, ref) -> None:
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(tree)]
  assert paths == [jax.tree_util.keystr(p) for p, _ in
                   jax.tree_util.tree_leaves_with_path(ref)]
  helpers.assert_bitwise_equal(tree, ref)


def _one_line_error(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and '\n' not in err, err
  return err


@pytest.fixture(scope='module')
def imported(tmp_path_factory, data_dir):
  """W0: the mixtral fixture converted with the small run settings."""
  workdir = str(tmp_path_factory.mktemp('convert') / 'mixtral')
  argv = ['--hf_dir', MIXTRAL, '--workdir', workdir] + _small(data_dir)
  assert convert.main(argv) == 0
  return workdir


def test_import_writes_the_model_config_and_a_step0_checkpoint(imported):
  stored = json.load(open(os.path.join(imported, 'config.json')))
  kwargs = hf_config.model_kwargs(
      json.load(open(os.path.join(MIXTRAL, 'config.json'))))
  flat = config_lib.flatten(stored)
  for key, value in config_lib.model_overrides(kwargs).items():
    assert flat[key] == value, key
  assert flat['model.num_kv_heads'] == 2 and flat['model.norm_eps'] == 1e-5
  assert flat['model.moe.capacity_factor'] is None  # dropless, as in HF
  assert flat['model.moe.eval_capacity_factor'] is None
  assert flat['train.learning_rate'] == 1e-4  # convert's default
  assert sorted(os.listdir(os.path.join(imported, 'checkpoints'))) == ['0']
  state = _state(imported, 0)
  _, variables = hf.load_pretrained(MIXTRAL)
  assert int(state.step) == 0 and state.model_state == {}
  _assert_bitwise(state.params, variables['params'])
  adam = state.opt_state[1][0]  # clip, then adamw's scale_by_adam
  assert int(adam.count) == 0
  assert all(not np.asarray(x).any() for x in jax.tree.leaves(adam.mu))


@pytest.mark.parametrize('family', ['mixtral', 'qwen2_moe', 'deepseek_v3'])
def test_config_json_describes_the_imported_model(family, tmp_path):
  """config.json -> build_model computes the imported model's logits."""
  path = os.path.join(FIXTURES, family)
  config, _ = convert.import_config(path, None, {})
  (tmp_path / 'config.json').write_text(
      json.dumps(config_lib.resolved_config(config)))
  stored = workdir_config.load_stored_config(str(tmp_path))
  config_lib.validate_config(stored)
  assert workdir_config.config_diff(
      json.loads((tmp_path / 'config.json').read_text()),
      config_lib.resolved_config(stored)) == []
  model, variables = hf.load_pretrained(path)
  tokens = (jnp.arange(16, dtype=jnp.int32).reshape(2, 8) * 7) % 64
  want, _ = model.apply(variables, tokens)
  got, _ = config_lib.build_model(stored).apply(variables, tokens)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # The synthetic data's vocabulary is cut to the model's (V <= 256 here).
  assert stored.data.vocab_size == min(256, model.vocab_size)


def test_export_of_the_import_gives_the_fixture_bit_for_bit(imported,
                                                            tmp_path,
                                                            capsys):
  out = str(tmp_path / 'hf')
  assert convert.main(['--to_hf', out, '--workdir', imported]) == 0
  printed = capsys.readouterr().out
  assert 'conversion time' in printed and 'peak host memory' in printed
  want = load_file(os.path.join(MIXTRAL, 'model.safetensors'))
  got = load_file(os.path.join(out, 'model.safetensors'))
  assert sorted(got) == sorted(want)
  for name, tensor in want.items():
    assert got[name].dtype == tensor.dtype, name
    assert got[name].tobytes() == tensor.tobytes(), name
  exported = json.load(open(os.path.join(out, 'config.json')))
  assert exported['model_type'] == 'mixtral'


def test_train_after_convert_starts_from_the_imported_params(imported,
                                                             tmp_path,
                                                             capsys):
  workdir = str(tmp_path / 'finetune')
  shutil.copytree(imported, workdir)
  assert train.main(['--workdir', workdir, '--config.train.steps=2']) == 0
  out = capsys.readouterr().out
  assert 'resumed from step 0' in out
  records = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  losses = [r['train/loss'] for r in records if 'train/loss' in r]
  assert len(losses) == 2 and np.all(np.isfinite(losses))
  _, variables = hf.load_pretrained(MIXTRAL)
  # Step 0's learning rate is 0: after step 1 the params are the start.
  _assert_bitwise(_state(workdir, 1).params, variables['params'])
  moved = jax.tree.leaves(_state(workdir, 2).params)
  assert any(not np.array_equal(a, b) for a, b in
             zip(moved, jax.tree.leaves(variables['params'])))


@pytest.fixture(scope='module')
def switch_run(tmp_path_factory, data_dir):
  """A tiny switch run of 2 steps (checkpoints 1 and 2)."""
  workdir = str(tmp_path_factory.mktemp('switch') / 'run')
  argv = helpers.small_args('switch', workdir, data_dir, train__steps=2,
                            train__warmup_steps=1, train__checkpoint_every=1,
                            train__eval_every=100)
  assert train.main(argv) == 0
  return workdir, argv


def test_init_from_starts_at_step0_with_the_source_params(switch_run,
                                                          tmp_path, capsys):
  source, argv = switch_run
  workdir = str(tmp_path / 'init')
  new_argv = ([a.replace(source, workdir) for a in argv] +
              ['--config.train.steps=1', '--init_from', source])
  assert train.main(new_argv) == 0
  out = capsys.readouterr().out
  assert 'no checkpoint in' in out and f'init: params and model state of '\
      f'{source} (its checkpoint 2)' in out
  records = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  assert records[0]['step'] == 1
  # Step 0's learning rate is 0, so step 1 holds the start params.
  _assert_bitwise(_state(workdir, 1).params, _state(source, 2).params)
  stored = json.load(open(os.path.join(workdir, 'config.json')))
  assert stored['init']['from_workdir'] == os.path.abspath(source)
  # Re-running resumes (nothing left to train) and ignores the source.
  assert train.main(new_argv) == 0
  assert 'init from' in capsys.readouterr().out.split('resumed from step 1'
                                                     )[1].split('\n')[0]


def test_init_from_refuses_other_shapes(imported, data_dir, tmp_path,
                                        capsys):
  workdir = tmp_path / 'init'
  argv = helpers.small_args('switch', str(workdir), data_dir) + [
      '--init_from', imported]
  assert train.main(argv) == 2
  err = _one_line_error(capsys)
  assert f"init.from_workdir='{imported}'" in err, err
  # The first param in path order: attn/key [D, KV, Dh], D=64 with 2 KV
  # heads of 16 in the mixtral import; D=32 (2 heads of 16) here.
  assert ('params/block_0/attn/key has shape (64, 2, 16) in the checkpoint '
          "but (32, 2, 16) in this run's model") in err, err
  assert not workdir.exists()


@pytest.mark.parametrize('source,needle', [
    ('empty', 'holds no checkpoint'), ('missing', 'is not a directory')])
def test_init_from_refuses_a_dir_without_checkpoints(source, needle,
                                                     data_dir, tmp_path,
                                                     capsys):
  path = tmp_path / source
  if source == 'empty':
    path.mkdir()
  argv = helpers.small_args('switch', str(tmp_path / 'run'), data_dir) + [
      '--init_from', str(path)]
  assert train.main(argv) == 2
  err = _one_line_error(capsys)
  assert f"error: init.from_workdir='{path}' {needle}" in err, err
  assert not (tmp_path / 'run').exists()


def _unsupported_hf_dir(tmp_path) -> str:
  path = tmp_path / 'gpt2'
  path.mkdir()
  (path / 'config.json').write_text(json.dumps({'model_type': 'gpt2'}))
  return str(path)


def _switch_workdir(tmp_path, data_dir) -> str:
  """A work dir holding only a switch run's config.json."""
  path = tmp_path / 'switch'
  path.mkdir()
  args, overrides = train.parse_args(
      helpers.small_args('switch', str(path), data_dir))
  config = train.load_and_validate(args.config, overrides)
  (path / 'config.json').write_text(
      json.dumps(config_lib.resolved_config(config)))
  return str(path)


@pytest.mark.parametrize('case', ['no_direction', 'missing_hf_dir',
                                  'unsupported', 'changed_shape',
                                  'unknown_key', 'export_switch'])
def test_bad_conversions_exit_2_with_one_line(case, data_dir, tmp_path,
                                              capsys):
  workdir = str(tmp_path / 'w')
  argv, needles = {
      'no_direction': (['--workdir', workdir], ['--hf_dir', '--to_hf']),
      'missing_hf_dir': (['--hf_dir', str(tmp_path / 'nope'), '--workdir',
                          workdir], [f"--hf_dir {tmp_path / 'nope'}",
                                     'is not a directory']),
      'unsupported': (['--hf_dir', _unsupported_hf_dir(tmp_path),
                       '--workdir', workdir],
                      ['--hf_dir', "model_type='gpt2' is not supported",
                       "'mixtral'"]),
      'changed_shape': (['--hf_dir', MIXTRAL, '--workdir', workdir,
                         '--config.model.d_ff=32'],
                        ['the config overrides change the imported model',
                         'params/block_0/ffn/experts/wi_0 has shape '
                         '(4, 64, 48) in the checkpoint but (4, 64, 32)']),
      'unknown_key': (['--hf_dir', MIXTRAL, '--workdir', workdir,
                       '--config.model.num_kv_head=2'],
                      ["unknown config key 'model.num_kv_head'",
                       'model.num_kv_heads']),
      'export_switch': (['--to_hf', str(tmp_path / 'out'), '--workdir',
                         _switch_workdir(tmp_path, data_dir)],
                        ['maps onto no supported HF family',
                         'capacity_factor=1.25']),
  }[case]
  try:
    code = convert.main(argv)
  except SystemExit as e:  # argparse
    code = e.code
  assert code == 2
  err = _one_line_error(capsys)
  for needle in needles:
    assert needle in err, (needle, err)
  assert not os.path.exists(workdir) and not (tmp_path / 'out').exists()


@pytest.mark.parametrize('argv, needles', [
    (['--to_hf', 'o', '--workdir', 'w', '--max_shard_bytes', '0'],
     ['argument --max_shard_bytes', "'0'", 'an int >= 1']),
    (['--to_hf', 'o', '--hf_dir', 'h', '--workdir', 'w'],
     ['--hf_dir', 'not allowed with argument --to_hf']),
    (['--to_hf', 'o', '--workdir', 'w', '--config', 'configs/switch.py'],
     ['--config and --config.<key> apply to an import']),
    (['--hf_dir', 'h', '--workdir', 'w', '--shard_bytes=1'],
     ["unrecognized argument '--shard_bytes=1'"]),
])
def test_bad_flags_exit_2_with_one_line_before_reading(argv, needles,
                                                       capsys):
  with pytest.raises(SystemExit) as exit_info:  # cli.Parser
    convert.main(argv)
  assert exit_info.value.code == 2
  err = _one_line_error(capsys)
  assert err.endswith('(see --help)'), err
  for needle in needles:
    assert needle in err, (needle, err)


# The new model keys: (config, key, value, texts the one-line error holds).
BAD_MODEL_KEYS = [
    ('switch', 'model.num_kv_heads', '3',
     ['model.num_kv_heads=3 must divide model.num_heads=2']),
    ('switch', 'model.qk_norm', 'rms',
     ["model.qk_norm='rms' is not supported", "'none', 'head', 'full'"]),
    ('switch', 'model.attention', 'mla',
     ['model.mla.kv_lora_rank must be an int >= 1, got 0']),
    ('switch', 'model.mla.kv_lora_rank', '8',
     ["model.mla.kv_lora_rank=8 sizes multi-head latent attention, but "
      "model.attention='mha'", "model.attention='mla'"]),
    ('switch', 'model.vocab_size', '32',
     ['model.vocab_size=32 is smaller than', 'data.vocab_size=64',
      'model.vocab_size >= 64 or None']),
    ('switch', 'model.sliding_window', '8',
     ['model.sliding_window=8 is shorter than data.seq_len=16',
      'None or an int >= 16']),
    ('switch', 'model.moe.dense_layers', '[5]',
     ['model.moe.dense_layers holds 5', 'block indices in [0, 2)']),
    ('switch', 'model.moe.dense_layers', '1',
     ['model.moe.dense_layers=1', 'expected a list of ints']),
    ('switch', 'model.moe.group_score', 'sum',
     ["model.moe.group_score='sum'", "'top2_sum', 'max'"]),
    ('switch', 'model.norm_eps', '0', ['model.norm_eps must be > 0']),
    ('switch', 'model.head_dim', '3', ['model.head_dim=3 must be even']),
    ('dense', 'model.moe.selection_bias', 'true',
     ['model.moe.selection_bias=True is an MoE-only setting']),
    ('expert_choice', 'model.num_kv_heads', '2',
     ["model.num_kv_heads=2 applies to model.task='lm' only"]),
    ('switch', 'init.from_workdir', '5',
     ['init.from_workdir=5', 'expected a string']),
]


@pytest.mark.parametrize('config,key,value,expected', BAD_MODEL_KEYS,
                         ids=[f'{b[1]}={b[2]}' for b in BAD_MODEL_KEYS])
def test_bad_new_keys_exit_2_naming_the_key(config, key, value, expected,
                                            data_dir, tmp_path, capsys):
  argv = helpers.small_args(config, str(tmp_path / 'run'), data_dir) + [
      f'--config.{key}={value}']
  assert train.main(argv) == 2
  err = _one_line_error(capsys)
  for text in expected:
    assert text in err, (text, err)
  assert not (tmp_path / 'run').exists()


def test_a_config_json_from_before_the_new_keys_still_resumes(data_dir,
                                                               tmp_path):
  """Keys a stored config lacks count as their defaults: no difference,
  and the stored config builds today's model."""
  args, overrides = train.parse_args(
      helpers.small_args('deepseek', str(tmp_path), data_dir))
  config = train.load_and_validate(args.config, overrides)
  old = config_lib.resolved_config(config)
  del old['init'], old['model']['mla']
  for key in ('vocab_size', 'num_kv_heads', 'head_dim', 'qk_norm',
              'attn_bias', 'norm_eps', 'rope_interleave', 'attention',
              'dense_d_ff', 'sliding_window'):
    del old['model'][key]
  for key in ('dense_layers', 'group_score', 'selection_bias'):
    del old['model']['moe'][key]
  (tmp_path / 'config.json').write_text(json.dumps(old))
  assert workdir_config.check_workdir_config(config, str(tmp_path)) == []
  stored = workdir_config.load_stored_config(str(tmp_path))
  assert config_lib.build_model(stored) == config_lib.build_model(config)
  changed = config_lib.apply_overrides(config, {'model.norm_eps': 1e-5})
  with pytest.raises(ValueError, match=r'model.norm_eps: <absent> -> 1e-05'):
    workdir_config.check_workdir_config(changed, str(tmp_path))


def _spoil_crc_record(workdir: str, step: int) -> None:
  """Changes the recorded CRC of the first param of checkpoint `step`, as
  if that param's bytes had changed on disk."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'integrity',
                      'metadata')
  record = json.load(open(path))
  entry = next(e for e in record['crc32'] if e[0].startswith('.params'))
  entry[1] ^= 1
  with open(path, 'w') as f:
    json.dump(record, f)


def test_init_source_skips_a_corrupt_checkpoint_and_leaves_it(imported,
                                                              tmp_path):
  source = str(tmp_path / 'source')
  shutil.copytree(imported, source)
  state = _state(source, 0)
  later = state.replace(step=state.step + 1,
                        params=jax.tree.map(lambda x: x + 1, state.params))
  checkpointer = Checkpointer(source, log=lambda m: None)
  checkpointer.save(later)
  checkpointer.close()
  _spoil_crc_record(source, 1)
  abstract = {'params': state.params, 'model_state': state.model_state}
  logs = []
  step, variables = restore_init_variables(source, abstract, log=logs.append)
  assert step == 0 and len(logs) == 1, logs
  assert 'checkpoint 1 of' in logs[0] and 'CheckpointCorruptError' in logs[0]
  _assert_bitwise(variables['params'], state.params)
  assert sorted(os.listdir(os.path.join(source, 'checkpoints'))) == ['0', '1']
  _spoil_crc_record(source, 0)
  with pytest.raises(InitSourceError,
                     match='has no checkpoint that reads back intact'):
    restore_init_variables(source, abstract, log=logs.append)


def test_tokenizer_files_travel_with_the_model(data_dir, tmp_path):
  """tokenizer.json goes into the work dir (for generate --prompt TEXT) and
  back out on export."""
  src = os.path.join(FIXTURES, 'qwen3_moe')
  workdir, out = str(tmp_path / 'w'), str(tmp_path / 'hf')
  argv = ['--hf_dir', src, '--workdir', workdir] + _small(data_dir)
  assert convert.main(argv) == 0
  want = open(os.path.join(src, 'tokenizer.json'), 'rb').read()
  assert open(os.path.join(workdir, 'tokenizer.json'), 'rb').read() == want
  assert convert.main(['--to_hf', out, '--workdir', workdir]) == 0
  assert open(os.path.join(out, 'tokenizer.json'), 'rb').read() == want
