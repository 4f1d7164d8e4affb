"""User errors and failures read as one line: no traceback, no library noise.

Each case runs `experiments.train` in this process with the output caught
at the file descriptors (capfd: Python, absl/orbax logging and C++ writes
alike) and checks that stderr holds the single `error:` line, last, with
the exit code of the module doc. Library details go to errors.log. Also:
`--help` documents exit codes and resume, and RunSpec names a bad field.
"""

import logging
import os
import shutil
import sys

import pytest

from experiments import train
from experiments import workdir_config
from moejax.train.run_spec import RunSpec
from tests.train import helpers

NOISE = ('Traceback', 'ERROR:', 'WARNING:', 'Task exception',
         'Event loop is closed', 'Exception ignored')


def _one_error_line(err: str, starts: str) -> str:
  """Asserts that stderr is one line starting with `starts`; returns it."""
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(starts), err[-3000:]
  return lines[0]


@pytest.mark.parametrize('case', ['empty', 'file', 'read_only'])
def test_an_unusable_workdir_is_one_line_and_exit_2(case, data_dir, tmp_path,
                                                    capfd, monkeypatch):
  workdir = {'empty': '', 'file': str(tmp_path / 'notes.txt'),
             'read_only': str(tmp_path / 'ro')}[case]
  os.makedirs(tmp_path / 'ro')
  (tmp_path / 'notes.txt').write_text('not a run')
  argv = helpers.reference_argv(workdir, data_dir)
  with helpers.read_only(str(tmp_path / 'ro'), monkeypatch) as how:
    if case == 'read_only' and how.startswith('simulated'):
      pytest.skip('cannot make a directory unwritable here (chmod, chattr)')
    assert train.main(argv) == 2
  out, err = capfd.readouterr()
  line = _one_error_line(err, f'error: --workdir {workdir!r}' if case ==
                         'empty' else f'error: --workdir {workdir} ')
  assert {'empty': 'is empty', 'file': 'is a file, not a directory',
          'read_only': 'is not writable'}[case] in line
  assert out == '' and os.listdir(tmp_path / 'ro') == []


def test_a_failed_save_is_one_line_with_details_in_errors_log(
    reference, data_dir, tmp_path, capfd, monkeypatch):
  workdir = reference.copy_to(tmp_path / 'run')
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '40'))  # resume at 30
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  with helpers.read_only(ckpt_dir, monkeypatch) as how:
    assert train.main(helpers.reference_argv(workdir, data_dir)) == 1, how
  out, err = capfd.readouterr()
  line = _one_error_line(
      err, 'error: could not save the checkpoint of step 40 in ')
  assert 'the previous checkpoint (step 30) is untouched' in line
  assert not any(noise in out + err for noise in NOISE), (out + err)[-3000:]
  log = os.path.join(workdir, 'errors.log')
  assert line.endswith(f'(details: {log})')
  with open(log) as f:
    assert 'Traceback' in f.read()  # the cause, for whoever debugs it
  assert sorted(os.listdir(ckpt_dir)) == ['30']


def test_a_checkpoint_of_another_model_is_refused_in_one_line(
    reference, data_dir, tmp_path, capfd):
  workdir = reference.copy_to(tmp_path / 'run')
  wider = helpers.reference_argv(workdir, data_dir, '--override',
                                 '--config.model.d_model=64')
  assert train.main(wider) == 2
  out, err = capfd.readouterr()
  line = _one_error_line(
      err, f'error: checkpoint 40 in {workdir}/checkpoints does not fit this '
      "run's model: params/")
  assert 'in the checkpoint but' in line and '--fresh' in line
  assert not any(noise in out + err for noise in NOISE), (out + err)[-3000:]
  assert helpers.checkpoint_steps(workdir) == [30, 40]  # nothing moved
  assert not os.path.exists(os.path.join(workdir, 'bad_checkpoints'))


class _RaisesWhenCollected:
  def __del__(self):
    raise RuntimeError('Event loop is closed')


def test_library_noise_goes_to_errors_log(tmp_path, capfd):
  root = logging.getLogger()
  console = logging.StreamHandler(sys.stderr)
  old_level = root.level
  root.addHandler(console)
  root.setLevel(logging.INFO)  # as when absl's handler is installed
  hooks = sys.unraisablehook
  try:
    with workdir_config.LibraryLog(str(tmp_path)) as log:
      logging.getLogger('jax._src.xla_bridge').info(
          "Unable to initialize backend 'tpu': not a TPU host")
      logging.getLogger('absl').error('orbax: _SignalingThread.run() raised')
      logging.getLogger('asyncio').error('Task exception was never retrieved')
      _RaisesWhenCollected()  # collected at once: an unraisable exception
    logging.getLogger('jax._src.xla_bridge').info('after the run')
  finally:
    root.removeHandler(console)
    root.setLevel(old_level)
  out, err = capfd.readouterr()
  assert out == '' and err == 'after the run\n', err
  assert log.count == 3 and sys.unraisablehook is hooks
  with open(tmp_path / 'errors.log') as f:
    text = f.read()
  assert 'ERROR absl: orbax' in text and 'ERROR asyncio: Task' in text
  assert 'RuntimeError: Event loop is closed' in text and 'tpu' not in text


def test_help_shows_exit_codes_and_resume(capsys):
  with pytest.raises(SystemExit) as exit_info:
    train.parse_args(['--help'])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  for words in ('Exit codes', '130', 'a second Ctrl-C aborts',
                'resumes from the\nnewest intact checkpoint', 'run.lock',
                'errors.log', '--fresh', '--override'):
    assert words in text, words


@pytest.mark.parametrize('field,value,allowed', [
    ('workdir', '', 'a non-empty directory path'),
    ('steps', -1, 'an int >= 0'),
    ('keep_checkpoints', 0, 'an int >= 1'),
])
def test_run_spec_names_a_bad_field(field, value, allowed):
  kwargs = dict(dict(workdir='runs/x', steps=10), **{field: value})
  with pytest.raises(ValueError, match=f'RunSpec.{field}={value!r}; '
                                       f'allowed: {allowed}'):
    RunSpec(**kwargs)
