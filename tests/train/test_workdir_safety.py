"""One run per work dir, and what a resumed run finds there.

The scenario of `killed` (run once for this module): the reference gshard
command (a record every 10 steps) runs as a subprocess that stops, by trial_cli's --pause_save hook,
inside the save of checkpoint 30: metrics.jsonl and the TensorBoard events
already hold steps 21-30, the newest checkpoint is 20, and the process
holds the work dir's lock. The same command in this process is refused
(exit 2, naming that process). The subprocess is SIGKILLed, and the same
command takes over its stale lock, resumes from 20 and ends bitwise like
the uninterrupted run; TensorBoard must then show each record of
metrics.jsonl exactly once (a purge hides the killed run's steps 21-30,
and the steps <= 20 were flushed before checkpoint 20 was saved).

Also: the lock without flock (a recorded pid that no longer runs), a
deleted config.json (the checkpoints carry the config), and a truncated
metrics.jsonl (reported at resume).
"""

import contextlib
import errno
import fcntl
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from experiments import train
from moejax.train import lock as lock_lib
from moejax.train import read_metrics
from tests.train import helpers


def _last_step(workdir):
  steps = [r['step'] for r in read_metrics(os.path.join(workdir,
                                                        'metrics.jsonl'))]
  return steps[-1] if steps else 0


def _main(argv):
  """train.main(argv) in this process: (exit code, stdout, stderr, s)."""
  out, err, start = io.StringIO(), io.StringIO(), time.time()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = train.main(argv)
  return rc, out.getvalue(), err.getvalue(), time.time() - start


@pytest.fixture(scope='module')
def killed(reference, data_dir, tmp_path_factory):
  """The scenario of the module docstring; returns what each step saw."""
  root = tmp_path_factory.mktemp('killed')
  workdir = str(root / 'run')
  # A record every 10 steps (the reference has one every step; the values
  # of a step do not depend on that): few bytes per step, as in a real run,
  # so the events of steps <= 20 are on disk only if they were flushed.
  argv = helpers.reference_argv(workdir, data_dir,
                                '--config.train.log_every=10')
  marker, log_path = str(root / 'paused_in_save_30'), str(root / 'log.txt')
  proc = helpers.start_cli(argv, log_path, 'tests.train.trial_cli',
                           ('--pause_save', '30', marker, '--'))
  try:
    if not helpers.wait_for(lambda: os.path.exists(marker), proc, 120):
      with open(log_path) as f:
        raise AssertionError(f.read()[-3000:])
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      metrics_before = f.read()
    second = _main(argv)  # while the subprocess holds the work dir
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      untouched = f.read() == metrics_before
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
  finally:
    helpers.stop(proc)
  with open(log_path) as f:
    log = f.read()
  return types.SimpleNamespace(
      workdir=workdir, argv=argv, pid=proc.pid, log=log, second=second,
      untouched=untouched, checkpoints=helpers.checkpoint_steps(workdir),
      resumed=_main(argv))


def test_a_second_run_on_the_work_dir_is_refused_at_once(killed):
  rc, out, err, seconds = killed.second
  assert rc == 2, out + err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f'error: --workdir {killed.workdir} is in use by another run: '
      f'pid {killed.pid} on host {socket.gethostname()}, started '), err
  assert 'tests/train/trial_cli' in lines[0]  # the holder's command
  assert out == ''  # refused before building or compiling anything
  assert seconds < 5, seconds
  assert killed.untouched  # no record written by the refused run
  assert killed.checkpoints == [10, 20]  # 30 was being saved at the kill
  assert 'Traceback' not in killed.log and 'WARNING' not in killed.log
  assert "Unable to initialize backend" not in killed.log


def test_the_stale_lock_of_a_killed_run_is_taken_over(killed, reference):
  rc, out, err, _ = killed.resumed
  assert rc == 0, out + err
  assert (f'lock: taking over the stale lock of pid {killed.pid} on host '
          f'{socket.gethostname()}') in out, out
  assert 'resumed from step 20' in out
  assert not os.path.exists(os.path.join(killed.workdir, 'run.lock'))
  every_10th = [r for r in reference.records if r['step'] % 10 == 0]
  helpers.assert_same_run(helpers.final_state(killed.argv),
                          (reference.state, every_10th))


def test_tensorboard_shows_every_record_once_after_sigkill(killed):
  assert killed.resumed[0] == 0
  records = read_metrics(os.path.join(killed.workdir, 'metrics.jsonl'))
  want = {}
  for record in records:
    for key, value in record.items():
      values = (value if isinstance(value, list) else [value])
      for i, v in enumerate(values):
        tag = f'{key}/{i}' if isinstance(value, list) else key
        if key != 'step' and np.isfinite(v):
          want.setdefault(tag, {})[record['step']] = [float(np.float32(v))]
  shown = helpers.tensorboard_scalars(os.path.join(killed.workdir,
                                                   'tensorboard'))
  assert set(shown) == set(want)
  assert want['eval/loss'].keys() == {20, 40}
  for tag, steps in want.items():
    assert shown[tag] == steps, tag  # each step once, the run's values


@pytest.fixture
def no_flock(monkeypatch):
  """A file system without flock: the recorded pid decides."""
  def flock(fd, op):
    raise OSError(errno.ENOLCK, 'No locks available')
  monkeypatch.setattr(fcntl, 'flock', flock)


def _write_lock(workdir, **holder):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, lock_lib.LOCK_FILE), 'w') as f:
    json.dump(dict(dict(host=socket.gethostname(), started='then'),
                   **holder), f)


def test_without_flock_the_recorded_pid_decides(tmp_path, no_flock):
  gone = subprocess.Popen([sys.executable, '-c', 'pass'])
  gone.wait()  # a pid that no longer runs
  logs = []
  _write_lock(str(tmp_path / 'a'), pid=gone.pid)
  lock = lock_lib.WorkdirLock(str(tmp_path / 'a'), log=logs.append)
  assert lock.acquire()['pid'] == gone.pid
  assert logs == [f'lock: taking over the stale lock of pid {gone.pid} on '
                  f'host {socket.gethostname()}, started then: that process '
                  'no longer holds it (it ended or was killed)']
  with open(lock.path) as f:
    assert json.load(f)['pid'] == os.getpid()
  lock.release()
  assert not os.path.exists(lock.path)
  # A live pid (this one's parent), or a run on another host: held.
  for holder in (dict(pid=os.getppid()), dict(pid=1, host='elsewhere')):
    _write_lock(str(tmp_path / 'b'), **holder)
    with pytest.raises(lock_lib.WorkdirLockedError,
                       match=f'pid {holder["pid"]} on host '
                             f'{holder.get("host", socket.gethostname())}'):
      lock_lib.WorkdirLock(str(tmp_path / 'b')).acquire()


def test_deleted_config_json_is_checked_against_the_checkpoint(
    reference, data_dir, tmp_path, capsys):
  workdir = reference.copy_to(tmp_path / 'run')
  os.remove(os.path.join(workdir, 'config.json'))
  longer = helpers.reference_argv(workdir, data_dir,
                                  '--config.train.steps=80')
  assert train.main(longer) == 2
  err = capsys.readouterr().err
  assert (f'--workdir {workdir} holds a run with a different config (the '
          'config saved in checkpoint 40') in err, err
  assert '\n  train.steps: 40 -> 80\n' in err
  assert helpers.checkpoint_steps(workdir) == [30, 40]  # nothing trained
  # The checkpoint's config is also the config of a run without --config.
  assert train.main(['--workdir', workdir]) == 0
  assert 'resumed from step 40' in capsys.readouterr().out
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['train']['steps'] == 40


def test_truncated_metrics_are_reported_at_resume(reference, data_dir,
                                                  tmp_path, capsys):
  workdir = reference.copy_to(tmp_path / 'run')
  path = os.path.join(workdir, 'metrics.jsonl')
  kept = [r for r in reference.records if not (
      r['step'] in (5, 6, 7, 25) or (r['step'] == 20 and 'eval/loss' in r))]
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in kept)
    f.write('{"step": 41, "train/lo')  # a line cut by a kill
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '40'))
  assert train.main(helpers.reference_argv(workdir, data_dir)) == 0
  out = capsys.readouterr().out
  assert (f'warning: {path} lacks 4 train record(s), of steps 5-7, 25 (up '
          'to the restored step 30)') in out, out
  assert f'warning: {path} lacks 1 eval record(s), of steps 20 (up' in out
  steps = [r['step'] for r in read_metrics(path)]
  assert steps == [r['step'] for r in kept]  # 31-40 rewritten, gap kept
