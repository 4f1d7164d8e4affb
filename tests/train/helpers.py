"""Helpers of the training tests: small-run argv and subprocess control.

Every run uses `small_args(...)`: the config's tiny variant shrunk to
L=16, D=32, 2 layers, B=4, V=64 so a run compiles and trains in seconds.
"""

import contextlib
import errno
import glob
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import jax
from jax.experimental.compilation_cache import compilation_cache
import numpy as np
import orbax.checkpoint as ocp

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
DATA = dict(num_train=256, num_eval=32, example_len=17, vocab_size=64)
STEPS = 40
CACHE_DIR = [None]  # set by tests/train/conftest.py's compilation_cache


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


@contextlib.contextmanager
def persistent_compilation_cache(path):
  """JAX's persistent compilation cache in `path` for the duration, every
  program cached (no minimum compile time or size); then the previous
  settings.

  JAX opens the cache at the first compile after a path is set and keeps
  using that one, whatever the path says later. So the cache is reset on
  the way in (a cache opened before would win) and on the way out (this one
  would stay in use by every later test of the process: an xdist worker runs
  many modules). Caching never changes a computed value, only compile time.

  Yields:
    `path` as a string.
  """
  names = {'jax_compilation_cache_dir': str(path),
           'jax_persistent_cache_min_compile_time_secs': 0.0,
           'jax_persistent_cache_min_entry_size_bytes': 0}
  old = {name: getattr(jax.config, name) for name in names}
  compilation_cache.reset_cache()
  for name, value in names.items():
    jax.config.update(name, value)
  try:
    yield str(path)
  finally:
    for name, value in old.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


def cache_env() -> dict[str, str]:
  """Environment of a subprocess sharing the session's compilation cache."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep +
             os.environ.get('PYTHONPATH', ''))
  if CACHE_DIR[0]:
    env.update(JAX_COMPILATION_CACHE_DIR=CACHE_DIR[0],
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


def reference_argv(workdir, data_dir, *extra: str) -> list[str]:
  """The resume / reliability tests' run: gshard, whose 'random' second-
  expert policy makes every step use the RNG."""
  return small_args('gshard', str(workdir), data_dir) + list(extra)


def start_cli(argv: list[str], log_path: str,
              module: str = 'experiments.train',
              module_args: tuple[str, ...] = ()) -> subprocess.Popen:
  """Starts `python -m <module> <module_args> argv` (stdout+stderr to a
  file); the default module is the trainer's CLI.

  The child gets Ctrl-C like a command in a terminal: a background job of a
  non-interactive shell (pytest started with `&`, some CI runners) has
  SIGINT ignored, which a child inherits (and the trainer keeps ignored),
  while a caught signal is reset to its default at exec. So SIGINT is
  caught here while the child starts (no preexec_fn: it would fork a
  process that runs JAX's threads).
  """
  main = threading.current_thread() is threading.main_thread()
  old = (signal.signal(signal.SIGINT, signal.default_int_handler) if main
         else None)
  try:
    with open(log_path, 'w') as log:  # the child keeps its own descriptor
      return subprocess.Popen(
          [sys.executable, '-m', module, *module_args] + argv, cwd=REPO,
          stdout=log, stderr=subprocess.STDOUT, env=cache_env())
  finally:
    if main:
      signal.signal(signal.SIGINT, old)


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


def checkpoint_steps(workdir) -> list[int]:
  """Steps of the finished checkpoints in `<workdir>/checkpoints`."""
  path = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(path):
    return []
  return sorted(int(n) for n in os.listdir(path) if n.isdigit())


def final_state(argv: list[str]):
  """(latest checkpointed TrainState, metrics.jsonl records) of the run
  that `argv` (an experiments.train command line) describes."""
  # pylint: disable=g-import-not-at-top
  from experiments import config_lib
  from experiments import train
  from moejax.train import Checkpointer
  from moejax.train import abstract_train_state
  from moejax.train import read_metrics
  args, overrides = train.parse_args(argv)
  config = train.load_and_validate(args.config, overrides)
  model = config_lib.build_model(config)
  optimizer, _ = config_lib.build_optimizer(config)
  abstract = abstract_train_state(
      model, optimizer, (config.train.batch_size, config.data.seq_len))
  checkpointer = Checkpointer(args.workdir, log=lambda m: None)
  try:
    state = checkpointer.restore(abstract)
  finally:
    checkpointer.close()
  return state, read_metrics(os.path.join(args.workdir, 'metrics.jsonl'))


def assert_bitwise_equal(tree, ref_tree) -> None:
  """Same leaves, dtypes and bytes."""
  leaves, ref_leaves = jax.tree.leaves(tree), jax.tree.leaves(ref_tree)
  assert len(leaves) == len(ref_leaves)
  for a, b in zip(leaves, ref_leaves):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def assert_same_run(got, want, steps: int = STEPS) -> None:
  """Two final_state results are bitwise equal: state and metrics (up to
  the wall-clock keys), with the same record steps in the same order."""
  # pylint: disable=g-import-not-at-top
  from moejax.train.metrics import strip_wall_clock
  state, records = got
  ref_state, ref_records = want
  assert int(state.step) == int(ref_state.step) == steps
  assert_bitwise_equal((state.params, state.opt_state, state.model_state),
                       (ref_state.params, ref_state.opt_state,
                        ref_state.model_state))
  assert [r['step'] for r in records] == [r['step'] for r in ref_records]
  assert strip_wall_clock(records) == strip_wall_clock(ref_records)


# A run's progress when stderr is not a terminal (README: "shows a progress
# bar (plain log lines when not on a terminal)"), one line per record:
#   step 3/40 train loss 5.1325 tok/s 10330 eta 0:00:04
#   step 20/40 eval loss 5.0895 aux_loss 1.1215 ... excess_loss 3.5849 eta 0:00:12
_ETA = r' eta \d+:\d\d:\d\d'
_PROGRESS = {
    'train': re.compile(r'step (\d+)/(\d+) train loss \d+\.\d{4} tok/s \d+'
                        + _ETA),
    'eval': re.compile(r'step (\d+)/(\d+) eval loss \d+\.\d{4}'
                       r'( [a-z_/0-9]+ -?\d+\.\d{4})*' + _ETA),
}


def assert_plain_progress(text: str, want: list[tuple[str, int]],
                          total: int = STEPS) -> None:
  """`text` (a run's stdout and stderr) shows its progress as plain lines.

  Args:
    text: the output; no carriage return (a tqdm bar redraws with them) and
      no ANSI escape may appear anywhere in it.
    want: the progress lines expected in order, as (kind, step) with kind
      'train' | 'eval'.
    total: the run's last step (the N of every 'step k/N').
  """
  assert '\r' not in text and '\x1b' not in text, repr(text[-1000:])
  got = []
  for line in text.splitlines():
    kind = re.match(r'step \d+/\d+ (train|eval) ', line)
    if kind:
      match = _PROGRESS[kind[1]].fullmatch(line)
      assert match and int(match[2]) == total, line
      got.append((kind[1], int(match[1])))
  assert got == want, (got, text[-2000:])


def _event_records(path: str) -> list[bytes]:
  """The records of a TFRecord file (length, crc, data, crc), ignoring a
  last record cut short (a writer killed mid-write)."""
  with open(path, 'rb') as f:
    data = f.read()
  pos, out = 0, []
  while pos + 12 <= len(data):
    (length,) = struct.unpack('<Q', data[pos:pos + 8])
    if pos + 12 + length + 4 > len(data):
      break
    out.append(data[pos + 12:pos + 12 + length])
    pos += 12 + length + 4
  return out


def tensorboard_scalars(logdir: str) -> dict[str, dict[int, list[float]]]:
  """{tag: {step: [values]}} as TensorBoard shows them: event files in
  name order, and a SessionLog START at step p hides the events read
  before it whose step is >= p (TensorBoard's purge of a restarted run)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  shown = {}
  for path in sorted(glob.glob(os.path.join(logdir,
                                            'events.out.tfevents.*'))):
    for record in _event_records(path):
      event = event_pb2.Event.FromString(record)
      if event.HasField('session_log') and (
          event.session_log.status == event_pb2.SessionLog.START):
        shown = {tag: {s: v for s, v in steps.items() if s < event.step}
                 for tag, steps in shown.items()}
      for value in event.summary.value:
        shown.setdefault(value.tag, {}).setdefault(event.step, []).append(
            value.simple_value)
  return shown


def writable(path) -> bool:
  """Whether a file can be created in directory `path`."""
  probe = os.path.join(path, '.probe')
  try:
    with open(probe, 'w'):
      pass
  except OSError:
    return False
  os.remove(probe)
  return True


@contextlib.contextmanager
def read_only(path, monkeypatch):
  """Makes directory `path` unwritable for the duration.

  chmod 555 suffices for a normal user. root ignores permissions, so then
  the directory is made immutable (chattr +i, ext4 and most Linux file
  systems). Where neither works, orbax's save raises ENOSPC instead (a full
  disk), which exercises the same error path. Yields the method used.
  """
  os.chmod(path, 0o555)
  immutable = False
  try:
    if writable(path) and shutil.which('chattr'):
      immutable = subprocess.run(['chattr', '+i', path], check=False,
                                 capture_output=True).returncode == 0
    if not writable(path):
      yield 'chattr +i' if immutable else 'chmod 555'
    else:
      def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device (simulated)')
      monkeypatch.setattr(ocp.CheckpointManager, 'save', full_disk)
      yield 'simulated ENOSPC'
      monkeypatch.undo()
  finally:
    if immutable:
      subprocess.run(['chattr', '-i', path], check=True)
    os.chmod(path, 0o755)
