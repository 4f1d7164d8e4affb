"""Resume exactness: interrupted + resumed runs end bitwise equal to an
uninterrupted run (params, optimizer state and metrics.jsonl).

Interruptions: an in-process SIGTERM, a SIGKILL'd subprocess (which leaves
metric records past its last checkpoint) and a SIGTERM'd subprocess (which
must exit 0 after saving a checkpoint at the step it reached).
"""

import os
import signal

import jax
import numpy as np
import pytest

from experiments import config_lib
from experiments import train
from moejax.train import Checkpointer
from moejax.train import abstract_train_state
from moejax.train import read_metrics
from moejax.train.metrics import strip_wall_clock
from tests.train import helpers

STEPS = helpers.STEPS


def _argv(workdir, data_dir):
  # gshard: its 'random' second-expert policy makes every step use the RNG.
  return helpers.small_args('gshard', str(workdir), data_dir)


def _final(workdir, data_dir):
  """(latest checkpointed TrainState, metrics.jsonl records) of a run."""
  args, overrides = train.parse_args(_argv(workdir, data_dir))
  config = train.load_and_validate(args.config, overrides)
  model = config_lib.build_model(config)
  optimizer, _ = config_lib.build_optimizer(config)
  abstract = abstract_train_state(
      model, optimizer, (config.train.batch_size, config.data.seq_len))
  checkpointer = Checkpointer(str(workdir))
  state = checkpointer.restore(abstract)
  checkpointer.close()
  return state, read_metrics(os.path.join(workdir, 'metrics.jsonl'))


def _assert_same_run(got, want):
  state, records = got
  ref_state, ref_records = want
  assert int(state.step) == int(ref_state.step) == STEPS
  leaves = jax.tree.leaves((state.params, state.opt_state))
  ref_leaves = jax.tree.leaves((ref_state.params, ref_state.opt_state))
  assert len(leaves) == len(ref_leaves)
  for a, b in zip(leaves, ref_leaves):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes()  # bitwise
  assert [r['step'] for r in records] == [r['step'] for r in ref_records]
  assert strip_wall_clock(records) == strip_wall_clock(ref_records)


def _checkpoint_steps(workdir):
  path = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(path):
    return []
  return sorted(int(n) for n in os.listdir(path) if n.isdigit())


@pytest.fixture(scope='module')
def reference(tmp_path_factory, data_dir):
  """An uninterrupted run of STEPS steps."""
  workdir = tmp_path_factory.mktemp('reference')
  assert train.main(_argv(workdir, data_dir)) == 0
  return _final(workdir, data_dir)


class _SigtermAt:
  """Loader that sends this process SIGTERM when batch `at` is requested."""

  def __init__(self, loader, at):
    self._loader, self._at = loader, at
    self.batch_size, self.seq_len = loader.batch_size, loader.seq_len

  def batch(self, step):
    if step == self._at:
      os.kill(os.getpid(), signal.SIGTERM)
    return self._loader.batch(step)


def test_sigterm_in_process_then_resume_is_exact(reference, data_dir,
                                                 tmp_path, monkeypatch,
                                                 capsys):
  build_data = config_lib.build_data

  def interrupted(config):
    loader, evals = build_data(config)
    return _SigtermAt(loader, 14), evals

  monkeypatch.setattr(config_lib, 'build_data', interrupted)
  assert train.main(_argv(tmp_path, data_dir)) == 0
  assert 'stopped by SIGTERM: step 15/' in capsys.readouterr().out
  assert _checkpoint_steps(tmp_path)[-1] == 15  # not a multiple of 10
  assert read_metrics(str(tmp_path / 'metrics.jsonl'))[-1]['step'] == 15
  monkeypatch.setattr(config_lib, 'build_data', build_data)
  assert train.main(_argv(tmp_path, data_dir)) == 0
  assert 'resumed from step 15' in capsys.readouterr().out
  _assert_same_run(_final(tmp_path, data_dir), reference)
  # Re-running a finished run changes nothing.
  assert train.main(_argv(tmp_path, data_dir)) == 0
  _assert_same_run(_final(tmp_path, data_dir), reference)


def _interrupt_subprocess(workdir, data_dir, sig, at_checkpoint):
  """Starts the CLI and sends it `sig` once checkpoint `at_checkpoint`
  exists; returns (exit code, combined output)."""
  log_path = os.path.join(workdir, f'log_{at_checkpoint}.txt')
  os.makedirs(workdir, exist_ok=True)
  proc = helpers.start_cli(_argv(workdir, data_dir), log_path)
  try:
    running = helpers.wait_for(
        lambda: at_checkpoint in _checkpoint_steps(workdir), proc,
        timeout=120)
    assert running, open(log_path).read()[-3000:]
    os.kill(proc.pid, sig)
    rc = proc.wait(timeout=60)
  finally:
    helpers.stop(proc)
  with open(log_path) as f:
    return rc, f.read()


def test_sigterm_then_sigkill_subprocess_then_resume_is_exact(
    reference, data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  # SIGTERM: a checkpoint at the step reached, exit code 0.
  rc, log = _interrupt_subprocess(workdir, data_dir, signal.SIGTERM, 10)
  assert rc == 0, log[-3000:]
  stopped = _checkpoint_steps(workdir)[-1]
  assert 10 <= stopped < 20
  assert f'SIGTERM: saved a checkpoint at step {stopped}' in log
  records = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  assert records[-1]['step'] == stopped
  # The same command resumes; SIGKILL it mid-run (no chance to clean up:
  # metric records past its last checkpoint stay on disk).
  rc, log = _interrupt_subprocess(workdir, data_dir, signal.SIGKILL, 20)
  assert rc == -signal.SIGKILL
  assert f'resumed from step {stopped}' in log
  assert 20 <= _checkpoint_steps(workdir)[-1] < STEPS
  assert train.main(_argv(workdir, data_dir)) == 0
  _assert_same_run(_final(workdir, data_dir), reference)
