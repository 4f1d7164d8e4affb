"""Resume exactness: interrupted + resumed runs end bitwise equal to an
uninterrupted run (params, optimizer state, model state and metrics.jsonl,
with no duplicated or missing record steps).

Interruptions: an in-process SIGTERM, then a config change refused and
accepted with --override; and a series of subprocess kill trials in one
work dir: SIGKILL at a random step before the first checkpoint, SIGTERM
(exit 0 after saving), SIGKILL in the middle of a checkpoint write, SIGKILL
at a random later step; then the same command finishes the run. The trial
subprocesses run through tests/train/trial_cli.py, which only changes
timing: a delay per step (so "kill at step k" has a margin before the next
checkpoint) and, for the kill during a write, a pause inside orbax's save
just before the commit.
Set MOEJAX_KILL_SEED to replay the random kill steps of a failed run: every
failure of the kill trials starts with the seed to set.
"""

import contextlib
import functools
import json
import os
import random
import signal
import time

from experiments import config_lib
from experiments import train
from moejax.train import read_metrics
from tests.train import helpers

STEPS = helpers.STEPS


class _SigtermAt:
  """Loader that sends this process SIGTERM when batch `at` is requested."""

  def __init__(self, loader, at):
    self._loader, self._at = loader, at
    self.batch_size, self.seq_len = loader.batch_size, loader.seq_len

  def batch(self, step):
    if step == self._at:
      os.kill(os.getpid(), signal.SIGTERM)
    return self._loader.batch(step)


def _metric_steps(workdir):
  return [r['step'] for r in read_metrics(os.path.join(workdir,
                                                       'metrics.jsonl'))]


def test_sigterm_in_process_then_resume_and_override_is_exact(
    reference, data_dir, tmp_path, monkeypatch, capsys):
  workdir = str(tmp_path / 'run')
  argv = helpers.reference_argv(workdir, data_dir)
  build_data = config_lib.build_data

  def interrupted(config, rows=None):
    loader, evals = build_data(config, rows)
    return _SigtermAt(loader, 14), evals

  monkeypatch.setattr(config_lib, 'build_data', interrupted)
  assert train.main(argv) == 0
  assert 'stopped by SIGTERM: step 15/' in capsys.readouterr().out
  assert helpers.checkpoint_steps(workdir) == [10, 15]  # 15: not a multiple
  assert _metric_steps(workdir)[-1] == 15
  monkeypatch.setattr(config_lib, 'build_data', build_data)

  # A different config in the same work dir is refused, with the diff.
  keep3 = argv + ['--config.train.keep_checkpoints=3']
  assert train.main(keep3 + ['--config.train.eval_every=10']) == 2
  err = capsys.readouterr().err
  assert 'train.eval_every: 20 -> 10\n' in err, err
  assert 'train.keep_checkpoints: 2 -> 3\n' in err and '--override' in err
  assert helpers.checkpoint_steps(workdir) == [10, 15]
  assert _metric_steps(workdir)[-1] == 15
  # --override continues the run with the new config (keep 3 checkpoints:
  # it does not change any computed value).
  assert train.main(keep3 + ['--override']) == 0
  out = capsys.readouterr().out
  assert 'train.keep_checkpoints: 2 -> 3' in out
  assert 'resumed from step 15' in out
  assert helpers.checkpoint_steps(workdir) == [20, 30, 40]
  with open(os.path.join(workdir, 'config.1.json')) as f:
    assert json.load(f)['train']['keep_checkpoints'] == 2
  helpers.assert_same_run(helpers.final_state(keep3), reference.result())
  # Re-running a finished run changes nothing.
  assert train.main(keep3) == 0
  helpers.assert_same_run(helpers.final_state(keep3), reference.result())


def _last_metric_step(workdir):
  steps = _metric_steps(workdir)
  return steps[-1] if steps else 0


STEP_DELAY = 0.08  # s per step in the trial subprocesses (timing only)


def _trial(workdir, argv, name, predicate, sig, options=(), why=''):
  """Starts the CLI (through tests.train.trial_cli, STEP_DELAY per step),
  sends `sig` once `predicate()` holds; returns (exit code, output). `why`
  (how to replay) leads the failure message if the signal never went."""
  log_path = os.path.join(os.path.dirname(workdir), f'log_{name}.txt')
  proc = helpers.start_cli(
      argv, log_path, 'tests.train.trial_cli',
      ('--step_delay', str(STEP_DELAY), *options, '--'))
  try:
    running = helpers.wait_for(predicate, proc, timeout=120)
    if not running:
      with open(log_path) as f:
        raise AssertionError(f'{why + " " if why else ""}trial {name}: the '
                             'CLI ended or hung before the signal:\n'
                             f'{f.read()[-3000:]}')
    os.kill(proc.pid, sig)
    rc = proc.wait(timeout=60)
  finally:
    helpers.stop(proc)
  with open(log_path) as f:
    return rc, f.read()


@contextlib.contextmanager
def _replay_hint(why: str):
  """Puts `why` (the seed to replay with) in front of any failure in the
  block, the helpers' assertions and timeouts included: the kill steps are
  drawn from the wall clock, so a failure without its seed cannot be
  replayed."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if why in str(e):
      raise
    raise AssertionError(f'{why} {type(e).__name__}: {e}') from e


def test_kill_trials_then_resume_is_exact(reference, data_dir, tmp_path,
                                          capsys):
  seed = int(os.environ.get('MOEJAX_KILL_SEED', time.time_ns() % 2**31))
  why = f'(replay with MOEJAX_KILL_SEED={seed})'
  with _replay_hint(why):
    _kill_trials(reference, data_dir, tmp_path, capsys, random.Random(seed),
                 why)


def _kill_trials(reference, data_dir, tmp_path, capsys, rng, why):
  """test_kill_trials_then_resume_is_exact's body: every assertion message
  starts with `why`."""
  workdir = str(tmp_path / 'run')
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  argv = helpers.reference_argv(workdir, data_dir)
  trial = functools.partial(_trial, workdir, argv, why=why)

  # 1. SIGKILL at a random step before the first checkpoint.
  kill_at = rng.randint(2, 7)
  rc, log = trial('kill_early', lambda: _last_metric_step(workdir) >= kill_at,
                  signal.SIGKILL)
  assert rc == -signal.SIGKILL, f'{why}\n{log[-3000:]}'
  assert helpers.checkpoint_steps(workdir) == [], why
  stale = len(_metric_steps(workdir))
  assert stale >= kill_at, why

  # 2. SIGTERM once checkpoint 10 exists: a checkpoint at the step reached.
  rc, log = trial('sigterm', lambda: 10 in helpers.checkpoint_steps(workdir),
                  signal.SIGTERM)
  assert rc == 0, f'{why}\n{log[-3000:]}'
  assert (f'starting at step 0 (dropped {stale} stale metric records)'
          in log), f'{why}\n{log[-3000:]}'
  stopped = helpers.checkpoint_steps(workdir)[-1]
  assert 10 <= stopped < 20, why
  assert f'SIGTERM: saved a checkpoint at step {stopped}' in log, (
      f'{why}\n{log[-3000:]}')
  assert _metric_steps(workdir) == list(range(1, stopped + 1)), why

  # 3. SIGKILL in the middle of writing checkpoint 20 (paused before its
  #    commit by trial_cli's --pause_save hook).
  marker = os.path.join(os.path.dirname(workdir), 'paused_in_save_20')
  rc, log = trial('kill_in_save', lambda: os.path.exists(marker),
                  signal.SIGKILL, options=('--pause_save', '20', marker))
  assert rc == -signal.SIGKILL, f'{why}\n{log[-3000:]}'
  assert f'resumed from step {stopped}' in log, f'{why}\n{log[-3000:]}'
  assert '20.orbax-checkpoint-tmp' in os.listdir(ckpt_dir), why
  assert 20 not in helpers.checkpoint_steps(workdir), why
  assert _last_metric_step(workdir) == 20, why  # records past the checkpoint

  # 4. SIGKILL at a random later step (maybe inside checkpoint 30's write).
  kill_at = rng.randint(21, 36)
  rc, log = trial('kill_late', lambda: _last_metric_step(workdir) >= kill_at,
                  signal.SIGKILL)
  assert rc == -signal.SIGKILL, f'{why}\n{log[-3000:]}'
  assert ('checkpoint: removing 20.orbax-checkpoint-tmp, an unfinished save'
          in log), f'{why}\n{log[-3000:]}'
  assert (f'resumed from step {stopped} ({stopped} metric records kept)'
          in log), f'{why}\n{log[-3000:]}'
  assert 20 in helpers.checkpoint_steps(workdir), why

  # 5. The same command finishes the run, exactly like the reference.
  last = helpers.checkpoint_steps(workdir)[-1]
  assert train.main(argv) == 0, why
  out = capsys.readouterr().out
  assert f'resumed from step {last}' in out, f'{why}\n{out[-3000:]}'
  helpers.assert_same_run(helpers.final_state(argv), reference.result())


def test_ctrl_c_saves_like_sigterm_and_resumes_exactly(reference, data_dir,
                                                       tmp_path, capsys):
  """Ctrl-C (SIGINT) at a step: a checkpoint at the step reached, one line,
  exit 0; the same command then ends exactly like the reference run."""
  workdir = str(tmp_path / 'run')
  argv = helpers.reference_argv(workdir, data_dir)
  rc, log = _trial(workdir, argv, 'sigint',
                   lambda: _last_metric_step(workdir) >= 5, signal.SIGINT)
  assert rc == 0, log[-3000:]
  stopped = helpers.checkpoint_steps(workdir)[-1]
  assert stopped >= 5
  assert f'SIGINT: saved a checkpoint at step {stopped}' in log
  assert 'Traceback' not in log and 'KeyboardInterrupt' not in log
  assert train.main(argv) == 0
  assert f'resumed from step {stopped}' in capsys.readouterr().out
  helpers.assert_same_run(helpers.final_state(argv), reference.result())


def test_a_second_ctrl_c_aborts_at_once(data_dir, tmp_path):
  """The first Ctrl-C asks for a save at the next step; a second one before
  it aborts without saving: one line, exit 130, no traceback. (Steps take
  1 s here, so the second signal lands before the next step.)"""
  workdir = str(tmp_path / 'run')
  argv = helpers.reference_argv(workdir, data_dir)
  log_path = str(tmp_path / 'log.txt')
  proc = helpers.start_cli(argv, log_path, 'tests.train.trial_cli',
                           ('--step_delay', '1.0', '--'))
  first = 'SIGINT: saving a checkpoint at the next step'
  try:
    assert helpers.wait_for(lambda: _last_metric_step(workdir) >= 1, proc,
                            timeout=120), open(log_path).read()[-3000:]
    os.kill(proc.pid, signal.SIGINT)
    assert helpers.wait_for(lambda: first in open(log_path).read(), proc,
                            timeout=30), open(log_path).read()[-3000:]
    os.kill(proc.pid, signal.SIGINT)
    rc = proc.wait(timeout=60)
  finally:
    helpers.stop(proc)
  log = open(log_path).read()
  assert rc == 130, log[-3000:]
  assert 'aborted: Ctrl-C again' in log and 'Traceback' not in log, log
  assert helpers.checkpoint_steps(workdir) == []  # nothing saved
