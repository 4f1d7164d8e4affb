"""Helpers of the training tests: small-run argv and subprocess control.

Every run uses `small_args(...)`: the config's tiny variant shrunk to
L=16, D=32, 2 layers, B=4, V=64 so a run compiles and trains in seconds.
"""

import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
DATA = dict(num_train=256, num_eval=32, example_len=17, vocab_size=64)
STEPS = 40
CACHE_DIR = [None]  # set by the compilation_cache fixture


def small_args(config: str, workdir: str, data_dir: str,
               **overrides) -> list[str]:
  """argv of experiments.train for a very small run of `config`:tiny.

  All tests use the same settings per config (STEPS steps, a record every
  step, evals at 20 and 40, checkpoints every 10, the last 2 kept), so the
  compiled programs are shared through the session's compilation cache.

  Args:
    config: 'dense' | 'switch' | 'gshard'.
    workdir: run directory.
    data_dir: the fixture's data_dir.
    **overrides: extra dotted keys with '__' for '.', e.g.
      train__log_every=1.

  Returns:
    argv list.
  """
  values = {
      'data.data_dir': data_dir, 'data.seq_len': 16,
      'data.num_train': DATA['num_train'], 'data.num_eval': DATA['num_eval'],
      'data.example_len': DATA['example_len'],
      'data.vocab_size': DATA['vocab_size'], 'model.d_model': 32,
      'model.d_ff': 64, 'model.num_heads': 2, 'train.batch_size': 4,
      'train.steps': STEPS, 'train.log_every': 1, 'train.eval_every': 20,
      'train.checkpoint_every': 10, 'train.keep_checkpoints': 2,
      'train.eval_batches': 2, 'train.warmup_steps': 5,
  }
  values.update({k.replace('__', '.'): v for k, v in overrides.items()})
  return ([f'--config={os.path.join(REPO, "configs", config + ".py")}:tiny',
           f'--workdir={workdir}'] +
          [f'--config.{k}={v}' for k, v in values.items()])


def start_cli(argv: list[str], log_path: str) -> subprocess.Popen:
  """Starts `python -m experiments.train argv` (stdout+stderr to a file)."""
  log = open(log_path, 'w')  # pylint: disable=consider-using-with
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep +
             os.environ.get('PYTHONPATH', ''))
  if CACHE_DIR[0]:  # share the test session's compilation cache
    env.update(JAX_COMPILATION_CACHE_DIR=CACHE_DIR[0],
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return subprocess.Popen([sys.executable, '-m', 'experiments.train'] + argv,
                          cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          env=env)


def wait_for(predicate, proc: subprocess.Popen, timeout: float) -> bool:
  """Polls `predicate()` every 20 ms until true, the process ends or timeout.

  Returns:
    Whether the predicate became true while the process was running.
  """
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.02)
  return False


def stop(proc: subprocess.Popen) -> None:
  """Kills the process (by PID) if it is still running, and reaps it."""
  if proc.poll() is None:
    proc.kill()
  proc.wait(timeout=30)
