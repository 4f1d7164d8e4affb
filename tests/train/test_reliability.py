"""Failures that must lose nothing: non-finite steps, failed checkpoint
writes, corrupt checkpoints, a changed config; and run-to-run determinism.

Every run is the reference gshard run of conftest (same compiled programs,
through the session's compilation cache); each scenario ends, where it can,
by finishing the run and comparing it bitwise with the uninterrupted one.
"""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import config_lib
from experiments import train
from moejax.train import create_train_state
from moejax.train import make_train_step
from moejax.train import nonfinite_report
from moejax.train import read_metrics
from tests.train import helpers


def _metric_steps(workdir):
  return [r['step'] for r in read_metrics(os.path.join(workdir,
                                                       'metrics.jsonl'))]


class _PoisonAt:
  """Loader whose batch `at` holds an out-of-vocabulary token id (V): the
  embedding lookup of an id outside [0, V) gives NaN (jnp.take's 'fill'),
  as corrupt data would."""

  def __init__(self, loader, at, vocab):
    self._loader, self._at, self._vocab = loader, at, vocab
    self.batch_size, self.seq_len = loader.batch_size, loader.seq_len

  def batch(self, step):
    batch = dict(self._loader.batch(step))
    if step == self._at:
      tokens = np.array(batch['tokens'])
      tokens[0, 5] = self._vocab
      batch['tokens'] = tokens
    return batch


def test_nan_stops_then_failed_save_then_resume_is_exact(
    reference, data_dir, tmp_path, monkeypatch, capsys):
  workdir = str(tmp_path / 'run')
  argv = helpers.reference_argv(workdir, data_dir)
  build_data = config_lib.build_data

  # 1. A NaN from batch 13 (the update to step 14) stops the run.
  def poisoned(config, rows=None):
    loader, evals = build_data(config, rows)
    return _PoisonAt(loader, 13, helpers.DATA['vocab_size']), evals

  monkeypatch.setattr(config_lib, 'build_data', poisoned)
  assert train.main(argv) == 3
  err = capsys.readouterr().err
  assert 'non-finite values in the update to step 14 (train batch 13)' in err
  assert ('First non-finite MoE layer (forward order): block_0: '
          'aux_loss' in err), err
  assert 'z_loss (router logits)' in err
  assert 'Non-finite gradients in' in err
  assert 'The last checkpoint (step 10) is intact' in err
  assert helpers.checkpoint_steps(workdir) == [10]
  assert _metric_steps(workdir) == list(range(1, 14))  # nothing from 14 on
  monkeypatch.setattr(config_lib, 'build_data', build_data)

  # 2. The checkpoint directory cannot be written: the save of step 20
  #    fails, the run stops with exit code 1, checkpoint 10 stays.
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  with helpers.read_only(ckpt_dir, monkeypatch) as how:
    assert train.main(argv) == 1, how
  captured = capsys.readouterr()
  assert 'resumed from step 10' in captured.out
  assert 'could not save the checkpoint of step 20' in captured.err, how
  assert 'the previous checkpoint (step 10) is untouched' in captured.err
  assert sorted(os.listdir(ckpt_dir)) == ['10']  # no partial write left

  # 3. Writable again: the same command resumes from 10 and ends exactly
  #    like the uninterrupted run.
  assert train.main(argv) == 0
  assert 'resumed from step 10' in capsys.readouterr().out
  helpers.assert_same_run(helpers.final_state(argv), reference.result())


def test_nan_report_names_the_first_nonfinite_layer(data_dir):
  # block_1's router kernel is NaN: block_0's routing is finite, block_1's
  # router logits (hence z_loss, aux_loss, entropy...) are not.
  args, overrides = train.parse_args(helpers.reference_argv('/unused',
                                                            data_dir))
  config = train.load_and_validate(args.config, overrides)
  model = config_lib.build_model(config)
  optimizer, schedule = config_lib.build_optimizer(config)
  loader, _ = config_lib.build_data(config)
  state = create_train_state(model, optimizer, (4, 16), seed=0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p * jnp.nan if 'block_1' in jax.tree_util.keystr(path)
      and 'router' in jax.tree_util.keystr(path) else p, state.params)
  state = state.replace(params=params)
  # The CLI's train step (same arguments: its compiled program is reused).
  step = make_train_step(model, optimizer, seed=0, aux_loss_weight=0.01,
                         learning_rate_fn=schedule)
  _, metrics = step(state, loader.batch(0)['tokens'])
  flags = jax.device_get({k: v for k, v in metrics.items()
                          if k.startswith('finite/') or k == 'all_finite'})
  assert not flags['all_finite']
  assert all(v for k, v in flags.items() if k.startswith('finite/moe/block_0'))
  assert not flags['finite/moe/block_1/z_loss']
  report = nonfinite_report(1, flags)
  assert 'First non-finite MoE layer (forward order): block_1: ' in report
  assert 'block_0' not in report.split('\n')[1]


def _state_file(workdir, step):
  """The largest data file of checkpoint `step` (holds the big leaves)."""
  files = glob.glob(os.path.join(workdir, 'checkpoints', str(step), 'state',
                                 '**', 'd', '*'), recursive=True)
  return max(files, key=os.path.getsize)


def _flip_bit(path):
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x01]))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(
    reference, data_dir, tmp_path, capsys):
  workdir = reference.copy_to(tmp_path / 'run')
  argv = helpers.reference_argv(workdir, data_dir)
  _flip_bit(_state_file(workdir, 40))  # orbax alone would load this
  assert train.main(argv) == 0
  out = capsys.readouterr().out
  assert 'warning: checkpoint 40 in' in out
  assert 'is unreadable or corrupt (CheckpointCorruptError' in out, out
  assert 'moved the bad checkpoint 40 to' in out
  assert 'resumed from step 30 (31 metric records kept)' in out  # 30 + eval
  assert os.path.isdir(os.path.join(workdir, 'bad_checkpoints', '40'))
  helpers.assert_same_run(helpers.final_state(argv), reference.result())


def test_no_readable_checkpoint_refuses_to_start_over(reference, data_dir,
                                                      tmp_path, capsys):
  workdir = reference.copy_to(tmp_path / 'run')
  argv = helpers.reference_argv(workdir, data_dir)
  _flip_bit(_state_file(workdir, 40))
  victim = _state_file(workdir, 30)
  os.truncate(victim, os.path.getsize(victim) // 2)
  assert train.main(argv) == 1
  err = capsys.readouterr().err
  assert 'none of the checkpoints in' in err and 'step 40: ' in err
  assert 'step 30: ' in err and 'Refusing to start over from step 0' in err
  assert helpers.checkpoint_steps(workdir) == [30, 40]  # nothing moved
  assert not os.path.exists(os.path.join(workdir, 'bad_checkpoints'))
  assert _metric_steps(workdir) == [r['step'] for r in reference.records]


def test_changed_config_refused_then_fresh_with_another_seed(
    reference, data_dir, tmp_path, capsys):
  workdir = reference.copy_to(tmp_path / 'run')
  seed1 = helpers.reference_argv(workdir, data_dir, '--config.seed=1')
  assert train.main(seed1) == 2
  err = capsys.readouterr().err
  assert f'--workdir {workdir} holds a run with a different config' in err
  assert '\n  seed: 0 -> 1\n' in err and '--fresh' in err
  assert _metric_steps(workdir) == [r['step'] for r in reference.records]

  # --fresh moves the old run aside (intact) and starts over with seed 1.
  assert train.main(seed1 + ['--fresh']) == 0
  out = capsys.readouterr().out
  assert f'--fresh: moved the previous run to {workdir}.old-1' in out
  assert read_metrics(os.path.join(workdir + '.old-1', 'metrics.jsonl')
                      ) == reference.records
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['seed'] == 1
  # Different seeds differ (init, data order and router RNG all depend on
  # it). (The same seed twice gives bitwise the same run: see
  # test_end_to_end's gshard run, compared with the reference.)
  state, records = helpers.final_state(seed1)
  assert records[0]['train/loss'] != reference.records[0]['train/loss']
  assert any(np.asarray(a).tobytes() != np.asarray(b).tobytes()
             for a, b in zip(jax.tree.leaves(state.params),
                             jax.tree.leaves(reference.state.params)))


def test_fresh_and_override_are_exclusive(data_dir, tmp_path):
  argv = helpers.reference_argv(tmp_path / 'run', data_dir)
  with pytest.raises(SystemExit) as exit_info:
    train.main(argv + ['--fresh', '--override'])
  assert exit_info.value.code == 2
