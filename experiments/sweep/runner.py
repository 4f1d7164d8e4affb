"""Executing runs: one subprocess per run, --parallel at a time, skips,
failure reports, and the run records of the results table.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from typing import Any, Optional, Sequence

from experiments import config_lib
from experiments.sweep.points import REPO
from experiments.sweep.points import Run
from experiments.sweep.points import trainer_command
from moejax.analysis import results as results_lib

STATUS_FILE = 'sweep_point.json'
STDOUT_LOG, STDERR_LOG = 'sweep_stdout.log', 'sweep_stderr.log'
STDERR_TAIL = 15  # stderr lines kept in reports
EXIT_UNFINISHED, EXIT_ANALYSIS = 3, 4  # exit codes of `point` (trainer: 0-2)


def _status(run: Run) -> dict[str, Any]:
  status = results_lib.read_json(os.path.join(run.workdir, STATUS_FILE))
  return status or {'attempts': []}


def _tail(path: str, lines: int = STDERR_TAIL) -> str:
  """The last `lines` lines of a log, without absl's INFO/WARNING noise."""
  try:
    with open(path, encoding='utf-8', errors='replace') as f:
      kept = [l for l in f if not l.startswith(('WARNING:absl:',
                                                 'INFO:absl:'))]
  except OSError:
    return ''
  return ''.join(kept[-lines:]).rstrip()


def _env(cache_dir: Optional[str]) -> dict[str, str]:
  env = dict(os.environ)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  if cache_dir and 'JAX_COMPILATION_CACHE_DIR' not in env:
    env['JAX_COMPILATION_CACHE_DIR'] = cache_dir
  return env


class Runner:
  """Runs the runs (a thread per --parallel slot, a subprocess per run)."""

  def __init__(self, cache_dir: Optional[str]):
    self.cache_dir = cache_dir
    self._procs: set[subprocess.Popen] = set()
    self._lock = threading.Lock()

  def run(self, run: Run, index: str) -> dict[str, Any]:
    """Runs (or skips) one run; returns what happened.

    Args:
      run: the run.
      index: '[i/n]' for the log lines.

    Returns:
      {'name', 'action' ('skipped' | 'trained' | 'analysed'), 'returncode',
      'wall_s', 'error'}.
    """
    finished = results_lib.run_finished(run.workdir, run.steps)
    analysed = os.path.exists(os.path.join(run.workdir,
                                           results_lib.ANALYSIS_FILE))
    if finished and analysed:
      print(f'{index} skip {run.name}: finished (step {run.steps})',
            flush=True)
      return {'name': run.name, 'action': 'skipped', 'returncode': 0,
              'wall_s': 0.0, 'error': ''}
    os.makedirs(run.workdir, exist_ok=True)
    if finished:
      action, argv = 'analysed', ['analyse', run.workdir]
    else:
      action, argv = 'trained', ['point'] + trainer_command(run)[3:]
    print(f'{index} {"train" if action == "trained" else "analyse"} '
          f'{run.name}', flush=True)
    start = time.time()
    rc = self._subprocess(argv, run.workdir)
    wall = time.time() - start
    error = ''
    if rc != 0:
      what = ({EXIT_UNFINISHED: 'run unfinished',
               EXIT_ANALYSIS: 'analysis failed'}.get(rc, 'training failed')
              if rc > 0 else f'killed by signal {-rc}')
      log = os.path.join(run.workdir, STDERR_LOG)
      error = f'exit {rc} ({what}); last lines of {log}:\n{_tail(log)}'
      print(f'{index} FAILED {run.name}: {error}', flush=True)
    else:
      print(f'{index} done {run.name} in {wall:.0f} s', flush=True)
    status = _status(run)
    status.update(name=run.name, point=run.point, seed=run.seed,
                  baseline=run.baseline,
                  command=shlex.join(['python'] + trainer_command(run)[1:]))
    status['attempts'].append({'action': action, 'returncode': rc,
                               'wall_s': round(wall, 2),
                               'started': time.strftime(
                                   '%Y-%m-%dT%H:%M:%S',
                                   time.localtime(start))})
    write_json(os.path.join(run.workdir, STATUS_FILE), status)
    return {'name': run.name, 'action': action, 'returncode': rc,
            'wall_s': wall, 'error': error}

  def _subprocess(self, argv: list[str], workdir: str) -> int:
    with open(os.path.join(workdir, STDOUT_LOG), 'w') as out, open(
        os.path.join(workdir, STDERR_LOG), 'w') as err:
      # Own session: a terminal's Ctrl-C reaches only the sweep, which then
      # stops its runs with SIGTERM (they checkpoint and exit cleanly).
      # The caller's cwd (relative paths in overrides keep their meaning);
      # PYTHONPATH finds the repository.
      proc = subprocess.Popen(
          [sys.executable, '-m', 'experiments.sweep'] + argv, stdout=out,
          stderr=err, env=_env(self.cache_dir), start_new_session=True)
      with self._lock:
        self._procs.add(proc)
      try:
        return proc.wait()
      finally:
        with self._lock:
          self._procs.discard(proc)

  def stop_all(self) -> None:
    """SIGTERM to every running trainer (it saves a checkpoint), then wait
    up to 60 s and kill what is left."""
    with self._lock:
      procs = list(self._procs)
    for proc in procs:
      proc.terminate()
    deadline = time.time() + 60
    for proc in procs:
      try:
        proc.wait(max(deadline - time.time(), 0.1))
      except subprocess.TimeoutExpired:
        proc.kill()


def write_json(path: str, value: Any) -> None:
  """Writes `value` as JSON atomically (temporary file, then rename)."""
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=2, sort_keys=True, default=str)
    f.write('\n')
  os.replace(tmp, path)


def prepare_data(runs: Sequence[Run]) -> None:
  """Builds each distinct dataset once, before runs read it concurrently.

  Raises:
    ValueError naming the run: its data cannot be built or loaded, or a
    split is smaller than its batches (the sweep stops before any run
    trains; that run would fail on it).
  """
  seen = set()
  for run in runs:
    config = config_lib.apply_overrides(
        config_lib.load_config(run.config), run.overrides)
    t = config.train
    key = json.dumps([config.data.to_dict(), t.batch_size, t.eval_batches],
                     sort_keys=True, default=str)
    if key in seen:
      continue
    seen.add(key)
    try:
      config_lib.build_data(config)
    except ValueError as e:
      raise ValueError(f'the data of run {run.name}: {e}') from e


def execute(runs: Sequence[Run], parallel: int,
            cache_dir: Optional[str]) -> dict[str, dict[str, Any]]:
  """Runs all runs, `parallel` at a time; {run name: attempt record}."""
  runner = Runner(cache_dir)
  out = {}
  with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
    futures = {pool.submit(runner.run, r, f'[{i + 1}/{len(runs)}]'): r
               for i, r in enumerate(runs)}
    try:
      for future in concurrent.futures.as_completed(futures):
        record = future.result()
        out[record['name']] = record
    except KeyboardInterrupt:
      print('interrupted: stopping the running trainers (they checkpoint)',
            flush=True)
      for future in futures:
        future.cancel()
      runner.stop_all()
      raise
  return out


def collect(runs: Sequence[Run],
            attempts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
  """Run records (moejax.analysis.results) with status, error and wall.

  Args:
    runs: all runs of the sweep.
    attempts: this invocation's attempt records by run name.

  Returns:
    One record per run: read_run's metrics plus 'name', 'group', 'seed',
    'overrides' (the point's), 'baseline', 'status' ('ok' | 'failed' |
    'not run'), 'error', 'wall_s' (sum over the run's attempts).
  """
  records = []
  for run in runs:
    record = results_lib.read_run(run.workdir, run.steps)
    status = _status(run)
    last = status['attempts'][-1] if status['attempts'] else None
    error = attempts.get(run.name, {}).get('error', '')
    if not error and last and last['returncode'] != 0:
      log = os.path.join(run.workdir, STDERR_LOG)
      error = f'exit {last["returncode"]}; last lines of {log}:\n{_tail(log)}'
    if record['finished']:
      state = 'ok'
    else:
      state = 'failed' if last else 'not run'
    record.update(name=run.name, group=run.group, seed=run.seed,
                  overrides=run.point, baseline=run.baseline, status=state,
                  error=error, wall_s=sum(a['wall_s']
                                          for a in status['attempts']))
    records.append(record)
  results_lib.add_baseline_delta(records)
  return records
