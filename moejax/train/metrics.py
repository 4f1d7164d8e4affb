"""Run metrics: metrics.jsonl, TensorBoard events and console progress.

`metrics.jsonl` holds one JSON object per line: train lines (`step`,
`train/...`, `moe/<block>/<metric>`, lists for `expert_load`) and eval lines
(`step`, `eval/...`). TensorBoard events are written with tensorboardX's
protos and record format (no TensorFlow), synchronously (see `_EventFile`);
if tensorboardX is not installed, events are skipped with a warning.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Iterable, Mapping, Optional

import jax
import numpy as np

METRICS_FILE = 'metrics.jsonl'
# Keys that depend on wall-clock time (differ between identical runs).
WALL_CLOCK_KEYS = ('train/tokens_per_sec',)


def to_python(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Device arrays -> floats (scalars) and lists (vectors), for JSON.

  Args:
    metrics: {name: scalar or 1-D array}.

  Returns:
    {name: float | list[float]}.
  """
  host = jax.device_get(dict(metrics))
  out = {}
  for key, value in host.items():
    value = np.asarray(value)
    out[key] = float(value) if value.ndim == 0 else value.astype(
        np.float64).tolist()
  return out


def read_metrics(path: str) -> list[dict[str, Any]]:
  """Parses metrics.jsonl, skipping blank or partially written lines.

  Args:
    path: the file (missing -> []).

  Returns:
    The records in file order.
  """
  if not os.path.exists(path):
    return []
  records = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # e.g. a line cut by a kill
  return records


def truncate_metrics(path: str, max_step: int) -> int:
  """Keeps only the records with step <= max_step (for resuming).

  Args:
    path: metrics.jsonl (missing -> nothing to do).
    max_step: the restored step.

  Returns:
    Number of records kept.
  """
  kept = [r for r in read_metrics(path) if r.get('step', 0) <= max_step]
  if os.path.exists(path):
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(r) + '\n' for r in kept)
    os.replace(tmp, path)
  return len(kept)


class _EventFile:
  """A TensorBoard event file written synchronously.

  tensorboardX's SummaryWriter hands events to a writer thread and flushes
  every `flush_secs`: a SIGKILL loses what it still holds, e.g. the records
  of the checkpoint step that the resumed run does not write again (they
  precede the restored step). Here each event is written in the caller's
  thread (tensorboardX's protos and record format), so `flush` puts every
  event written so far on disk; the loop flushes before each checkpoint.

  Args (constructor):
    logdir: the TensorBoard directory (created).
    purge_step: if given, a SessionLog START at this step: TensorBoard then
      hides the events of earlier files in `logdir` whose step is >= it (a
      resumed run's stale tail).
  """
  FLUSH_SECS = 10.0  # also flush this often, for a live TensorBoard

  def __init__(self, logdir: str, purge_step: Optional[int] = None):
    # pylint: disable=g-import-not-at-top
    from tensorboardX import event_file_writer
    from tensorboardX import summary
    from tensorboardX.proto import event_pb2
    self._pb, self._scalar = event_pb2, summary.scalar
    os.makedirs(logdir, exist_ok=True)
    # Files are events.out.tfevents.<seconds>.<host><suffix>, read in name
    # order: the nanosecond suffix keeps two writers started in one second
    # (a quick resume) from sharing, and so truncating, a file.
    self._writer = event_file_writer.EventsWriter(
        os.path.join(logdir, 'events'), f'.{time.time_ns():020d}')
    self.path = getattr(self._writer, '_file_name', logdir)
    if purge_step is not None:
      self._writer.write_event(event_pb2.Event(
          wall_time=time.time(), step=purge_step,
          session_log=event_pb2.SessionLog(
              status=event_pb2.SessionLog.START)))
    self._flushed = time.time()

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    self._writer.write_event(self._pb.Event(
        wall_time=time.time(), step=step, summary=self._scalar(tag, value)))

  def flush(self, force: bool = True) -> None:
    """Writes the events to disk (if `force` or FLUSH_SECS have passed)."""
    if force or time.time() - self._flushed > self.FLUSH_SECS:
      self._writer.flush()
      self._flushed = time.time()

  def close(self) -> None:
    self._writer.close()


def _tensorboard_writer(logdir: str, purge_step: Optional[int] = None
                        ) -> Optional[_EventFile]:
  """An _EventFile, or None (with a warning) if tensorboardX is missing."""
  try:
    return _EventFile(logdir, purge_step)
  except ImportError:
    print('warning: tensorboardX is not installed; no TensorBoard events '
          '(pip install tensorboardX)', file=sys.stderr)
    return None


@contextlib.contextmanager
def _naming(path: str):
  """Re-raises an OSError without a file name (a failed write to an open
  file, e.g. a full disk) with `path`."""
  try:
    yield
  except OSError as e:
    if e.filename or not e.errno:
      raise
    raise OSError(e.errno, e.strerror, path) from e


class MetricsWriter:
  """Appends records to `<workdir>/metrics.jsonl` and TensorBoard events.

  Every record is on disk in metrics.jsonl when `write` returns; the
  TensorBoard events when `flush` (or `close`) returns.

  Args (constructor):
    workdir: run directory.
    tensorboard: also write events under `<workdir>/tensorboard`.
    start_step: the step the run (re)starts from. metrics.jsonl already
      holds no record after it (the loop drops them at resume); the
      TensorBoard events of steps > start_step written before an
      interruption are marked stale (a purge at start_step + 1), so
      TensorBoard shows each step once. The events of steps <= start_step
      are on disk: the loop flushed them before saving that checkpoint.
  """

  def __init__(self, workdir: str, tensorboard: bool = True,
               start_step: int = 0):
    self.path = os.path.join(workdir, METRICS_FILE)
    self._file = open(self.path, 'a', encoding='utf-8')
    self._tb = (_tensorboard_writer(os.path.join(workdir, 'tensorboard'),
                                    purge_step=start_step + 1)
                if tensorboard else None)

  def write(self, record: Mapping[str, Any]) -> None:
    """Writes one record (must hold an int 'step'); flushed immediately.

    Args:
      record: {'step': int, name: float | list[float]}.
    """
    with _naming(self.path):
      self._file.write(json.dumps(dict(record)) + '\n')
      self._file.flush()
    if self._tb is None:
      return
    step = int(record['step'])
    with _naming(self._tb.path):
      for key, value in record.items():
        if key == 'step':
          continue
        if isinstance(value, list):
          for i, v in enumerate(value):
            self._tb.add_scalar(f'{key}/{i}', v, step)
        elif math.isfinite(value):
          self._tb.add_scalar(key, value, step)
      self._tb.flush(force=False)

  def flush(self) -> None:
    """Puts every TensorBoard event written so far on disk."""
    if self._tb is not None:
      with _naming(self._tb.path):
        self._tb.flush()

  def close(self) -> None:
    """Flushes and closes the files (both, even if the first fails)."""
    try:
      with _naming(self.path):
        self._file.close()
    finally:
      if self._tb is not None:
        with _naming(self._tb.path):
          self._tb.close()


def missing_steps(records: Iterable[Mapping[str, Any]], last: int,
                  every: tuple[int, int], steps: int
                  ) -> dict[str, list[int]]:
  """Record steps <= `last` that the log / eval cadence implies but
  `records` lack (e.g. a truncated or hand-edited metrics.jsonl).

  Args:
    records: metrics.jsonl records.
    last: the restored checkpoint's step.
    every: (log_every, eval_every); the run's last step always has both.
    steps: the run's last step.

  Returns:
    {'train': [steps], 'eval': [steps]} (empty lists if none is missing).
  """
  have = {'train': set(), 'eval': set()}
  for r in records:
    for kind in have:
      if f'{kind}/loss' in r:
        have[kind].add(int(r['step']))
  out = {}
  for kind, each in zip(('train', 'eval'), every):
    want = [s for s in range(1, last + 1)
            if s == steps or (each > 0 and s % each == 0)]
    out[kind] = [s for s in want if s not in have[kind]]
  return out


def format_steps(steps: list[int], limit: int = 8) -> str:
  """Ascending steps as ranges: '5-7, 25, 30-40' (the first `limit`
  ranges, then ', ...')."""
  runs = []
  for s in steps:
    if runs and s == runs[-1][1] + 1:
      runs[-1][1] = s
    else:
      runs.append([s, s])
  text = ', '.join(f'{a}' if a == b else f'{a}-{b}' for a, b in runs[:limit])
  return text + (', ...' if len(runs) > limit else '')


def _fmt_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class Progress:
  """A tqdm bar on a terminal, plain log lines otherwise.

  Args (constructor):
    total: last step of the run.
    start: step the run starts (or resumes) from.
    use_bar: show a tqdm bar; default: whether stderr is a tty.
  """

  def __init__(self, total: int, start: int, use_bar: Optional[bool] = None):
    self.total = total
    self._start_step, self._start_time = start, time.time()
    self._bar = None
    if use_bar if use_bar is not None else sys.stderr.isatty():
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total, initial=start, unit='step',
                            dynamic_ncols=True, file=sys.stderr)

  def advance(self, step: int) -> None:
    """Moves the bar to `step` (no-op without a bar)."""
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def log(self, record: Mapping[str, Any]) -> None:
    """Shows a train or eval record (bar postfix, or one printed line).

    Args:
      record: a metrics record with 'step'.
    """
    step = record['step']
    if 'train/loss' in record:
      fields = {'loss': f'{record["train/loss"]:.4f}',
                'tok/s': f'{record.get("train/tokens_per_sec", 0):.0f}'}
    else:
      # Means only: per-layer values ('eval/x/block_i') stay in the files.
      fields = {k.split('/', 1)[1]: f'{v:.4f}' for k, v in record.items()
                if k.startswith('eval/') and k.count('/') == 1 and
                not isinstance(v, list)}
    text = ' '.join(f'{k} {v}' for k, v in fields.items())
    if self._bar is not None:
      if 'train/loss' in record:
        self._bar.set_postfix(fields, refresh=True)
      else:  # evals stay visible above the bar
        self._bar.write(f'step {step}/{self.total} eval {text}')
      return
    done = step - self._start_step
    rate = done / max(time.time() - self._start_time, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else 0.0
    kind = 'train' if 'train/loss' in record else 'eval'
    print(f'step {step}/{self.total} {kind} {text} eta {_fmt_eta(eta)}',
          flush=True)

  def close(self) -> None:
    """Closes the bar."""
    if self._bar is not None:
      self._bar.close()


def strip_wall_clock(records: Iterable[Mapping[str, Any]]) -> list[dict]:
  """Records without the WALL_CLOCK_KEYS (to compare runs exactly)."""
  return [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS}
          for r in records]
