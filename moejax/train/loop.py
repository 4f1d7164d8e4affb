"""The training loop: resume, train, log, evaluate, checkpoint, plot.

Step convention: `state.step` counts updates done. The update that uses
`train_loader.batch(t)` turns step t into step t + 1, and everything logged,
evaluated or checkpointed "at step s" refers to the state after s updates.
At a step s the loop writes, in this order, the train record (if s is a log
step), the eval record (if an eval step), then the checkpoint (if a
checkpoint step), after flushing the TensorBoard events. A run restored
from the checkpoint at step s therefore finds every record of steps <= s on
disk, in metrics.jsonl and in TensorBoard; records of later steps (written
before a kill) are dropped (TensorBoard: marked stale), and the resumed run
rewrites them identically. A metrics.jsonl that lacks records of steps
<= s (truncated or edited) is reported at resume, step by step.

Reliability:
  * Resume: the newest checkpoint that reads back intact is used (see
    `Checkpointer.restore_latest_good`); a corrupt newer one is reported and
    moved aside; if checkpoints exist but none is readable the run stops
    with CheckpointError instead of starting over.
  * NaN/Inf guard: before any record, eval or checkpoint at step s, the
    finiteness flags of every step since the previous check are read; the
    first non-finite step stops the run with NonFiniteError (naming the
    step, the first non-finite MoE layer and gradients). Nothing computed
    after it is written, so the last checkpoint stays the last good state.
  * A failed checkpoint write stops the run with CheckpointError; older
    checkpoints are untouched.
  * A checkpoint of another model (other param shapes) is refused with
    CheckpointMismatchError before any array is read; nothing is moved.
  * Every checkpoint carries the run's resolved config (`RunSpec.config`).
  * Init from another run (`init_from`): only a run without checkpoints
    starts from the source's params and model state (step 0, a fresh
    optimizer state); a run that has checkpoints resumes and says that it
    ignores the source.

Devices and processes: the run lives on a device mesh (`mesh=`; default
one device). The state is created or restored with the NamedShardings of
`moejax.sharding.tree_shardings` (a checkpoint restores onto any mesh),
each process loads only its rows of every global batch
(`sharding.process_batch_rows`) and `sharding.shard_batch` assembles them.
With several processes, process 0 alone writes config.json, metrics,
TensorBoard events and plots; every process runs every step, eval and
checkpoint save (they are collective), and SIGTERM (or Ctrl-C, see
`moejax.train.stop`) is agreed on through JAX's preemption sync point so
all processes save the same step.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax

from moejax import sharding
from moejax.analysis import capture as capture_lib
from moejax.models import flops
from moejax.train import metrics as metrics_lib
from moejax.train import placement
from moejax.train import plots
from moejax.train import state as state_lib
from moejax.train import step as step_lib
from moejax.train import stop as stop_lib
from moejax.train.checkpoint import Checkpointer
from moejax.train.resume import start_state
from moejax.train.resume import write_config  # pylint: disable=unused-import
from moejax.train.run_spec import RunSpec

# Train-step metrics copied into train records as 'train/<name>'.
TRAIN_KEYS = ('loss', 'lm_loss', 'aux_loss', 'z_loss', 'drop_fraction',
              'max_violation', 'grad_norm', 'param_norm', 'learning_rate',
              'reg_loss', 'active_experts',  # these: when reported
              'mod_loss', 'mod_bce', 'mod_accuracy', 'mod_fraction')
# Eval-step metrics averaged over batches into 'eval/<name>'.
EVAL_MEAN_KEYS = ('aux_loss', 'z_loss', 'drop_fraction', 'max_violation')
# ... and those only some routers report (step.OPTIONAL_METRIC_KEYS).
EVAL_OPTIONAL_KEYS = ('reg_loss', 'active_experts', 'mod_loss', 'mod_bce',
                      'mod_accuracy', 'mod_fraction')  # + MoD blocks'


@dataclasses.dataclass
class RunResult:
  """What `train_and_evaluate` returns.

  Attributes:
    state: the final TrainState.
    step: its step.
    preempted: True if SIGTERM or SIGINT stopped the run early.
    last_eval: the last eval record written by this call (or None).
    stop_signal: 'SIGTERM' | 'SIGINT' when preempted (None otherwise).
  """
  state: state_lib.TrainState
  step: int
  preempted: bool
  last_eval: Optional[dict]
  stop_signal: Optional[str] = None


class NonFiniteError(RuntimeError):
  """A training step produced a non-finite loss, gradient or state.

  Attributes:
    step: the step the bad update led to.
  """

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def evaluate(eval_step, params: Any,
             batches: Sequence[Mapping[str, np.ndarray]],
             step: int, model_state: Optional[dict] = None
             ) -> dict[str, Any]:
  """Evaluates `params` on fixed batches.

  Args:
    eval_step: from `step.make_eval_step`.
    params: model params.
    batches: eval batches {'tokens': [B, L + 1], 'optimal_nll': [B], ...}.
    step: the step to record.
    model_state: the TrainState's model_state (read only), if any.

  Returns:
    {'step', 'eval/loss' (token-mean cross-entropy; example-mean for a
    classifier), 'eval/aux_loss', 'eval/z_loss', 'eval/drop_fraction',
    'eval/max_violation' (batch means), and 'eval/excess_loss' = eval/loss -
    mean optimal_nll when every example has a finite optimal_nll (synthetic
    data, LM only), or 'eval/accuracy' for a classifier; with the eval
    step's expert x domain counts, the specialisation entries of
    `specialisation_record`}.
  """
  outs, counts, token_counts = [], [], []
  prefixes = (step_lib.SPEC_PREFIX, step_lib.TOKEN_SPEC_PREFIX)
  for b in batches:
    metrics = eval_step(params, b['tokens'], model_state, b.get('domain'))
    outs.append(metrics_lib.to_python(
        {k: v for k, v in metrics.items()
         if not k.startswith(('moe/',) + prefixes)}))
    for prefix, into in zip(prefixes, (counts, token_counts)):
      into.append(jax.device_get(
          {k[len(prefix):]: v for k, v in metrics.items()
           if k.startswith(prefix)}))
  count = max(sum(o['tokens'] for o in outs), 1.0)
  record = {'step': int(step),
            'eval/loss': sum(o['nll_sum'] for o in outs) / count}
  for key in EVAL_MEAN_KEYS:
    record[f'eval/{key}'] = float(np.mean([o[key] for o in outs]))
  for key in EVAL_OPTIONAL_KEYS:
    if key in outs[0]:
      record[f'eval/{key}'] = float(np.mean([o[key] for o in outs]))
  record.update(specialisation_record(counts))
  record.update(specialisation_record(token_counts, 'token_specialisation'))
  if 'correct' in outs[0]:  # a classifier: no next-token floor applies
    record['eval/accuracy'] = sum(o['correct'] for o in outs) / count
    return record
  optimal = np.concatenate([np.asarray(b['optimal_nll'], np.float64)
                            for b in batches])
  if optimal.size and np.all(np.isfinite(optimal)):
    record['eval/excess_loss'] = record['eval/loss'] - float(optimal.mean())
  return record


def specialisation_record(counts: Sequence[Mapping[str, np.ndarray]],
                          name: str = 'specialisation') -> dict[str, float]:
  """'eval/<name>[/<layer>]' and 'eval/<name>_chance' (means over MoE
  layers) from per-batch {layer: [2, E, N]} expert x label counts
  (`analysis.capture.scores_from_counts`); {} without counts. name
  'specialisation': labels are domains; 'token_specialisation': input
  token ids."""
  scores = capture_lib.scores_from_counts(counts)
  if not scores:
    return {}
  record = {f'eval/{name}/{k}': v['nmi'] for k, v in scores.items()}
  record[f'eval/{name}'] = float(np.mean(
      [v['nmi'] for v in scores.values()]))
  record[f'eval/{name}_chance'] = float(np.mean(
      [v['chance'] for v in scores.values()]))
  return record


def train_record(step: int, metrics: Mapping[str, Any],
                 tokens_per_sec: float) -> dict[str, Any]:
  """The metrics.jsonl train record of one step.

  Args:
    step: the step (after the update).
    metrics: the train step's metrics (device arrays).
    tokens_per_sec: measured throughput since the previous record.

  Returns:
    {'step', 'train/<TRAIN_KEYS>', 'train/tokens_per_sec', 'moe/...'}.
  """
  host = metrics_lib.to_python(
      {k: v for k, v in metrics.items()
       if k in TRAIN_KEYS or k.startswith('moe/')})
  record = {'step': int(step)}
  record.update({f'train/{k}': host[k] for k in TRAIN_KEYS if k in host})
  record['train/tokens_per_sec'] = float(tokens_per_sec)
  record.update({k: v for k, v in host.items() if k.startswith('moe/')})
  return record


def _is_every(step: int, every: int, last: int) -> bool:
  return step == last or (every > 0 and step % every == 0)


class _FiniteGuard:
  """Collects each step's finiteness flags; `check` raises on the first bad.

  Reading the flags needs the step's result, so they are read in one go at
  the steps that write something (records, evals, checkpoints), not after
  every step: the device keeps running ahead in between.
  """

  def __init__(self, checkpointer: Checkpointer):
    self._pending = []
    self._checkpointer = checkpointer

  def add(self, step: int, metrics: Mapping[str, Any]) -> None:
    if 'all_finite' in metrics:
      self._pending.append((step, metrics))

  def check(self) -> None:
    """Raises NonFiniteError for the first non-finite pending step."""
    pending, self._pending = self._pending, []
    oks = jax.device_get([m['all_finite'] for _, m in pending])
    for (step, metrics), ok in zip(pending, oks):
      if bool(ok):
        continue
      host = jax.device_get({k: v for k, v in metrics.items()
                             if k.startswith('finite/') or k == 'loss'})
      message = step_lib.nonfinite_report(step, host, float(host['loss']))
      last = self._checkpointer.latest_step()
      kept = (f'The last checkpoint (step {last}) is intact: fix the cause '
              '(e.g. a lower train.learning_rate, bad data) and re-run the '
              'same command to resume from it.' if last is not None else
              'There is no checkpoint yet.')
      raise NonFiniteError(
          f'{message}\nTraining stopped; nothing after step {step - 1} was '
          f'recorded or saved. {kept}', step)


def train_and_evaluate(
    model: nn.Module, spec: RunSpec, *, train_loader: Any,
    eval_data: Sequence[Mapping[str, np.ndarray]],
    optimizer: optax.GradientTransformation,
    learning_rate_fn: Optional[optax.Schedule] = None,
    mesh: Optional[jax.sharding.Mesh] = None) -> RunResult:
  """Trains `model` to `spec.steps`, resuming from `<workdir>/checkpoints`.

  Writes `<workdir>/config.json` (if `spec.config`), `metrics.jsonl`,
  `tensorboard/`, `checkpoints/<step>` and, at the end, `plots/loss.png` and
  `plots/expert_load.png`. SIGTERM or Ctrl-C (SIGINT) saves a checkpoint at
  the current step and returns early (`preempted=True`; a second Ctrl-C
  raises KeyboardInterrupt at once, see `moejax.train.stop`). This function
  does not lock the work dir: `experiments.train` takes
  `moejax.train.lock.WorkdirLock` around it.

  Args:
    model: TransformerLM-like module: apply(vars, tokens [B, L],
      padding_mask=, deterministic=, rngs=) -> (logits [B, L, V], aux).
    spec: the run's settings (work dir, steps, seed, loss weights, cadence;
      see `RunSpec`).
    train_loader: object with `.batch(t)` -> {'tokens': [b, L + 1] int32},
      `.seq_len` (L) and `.batch_size` (B, global); b = B, or with several
      processes this process's `sharding.process_batch_rows` (a
      data.BatchLoader's `process_index` / `process_count` must match).
    eval_data: fixed eval batches like the train ones plus 'optimal_nll'
      (this process's rows too).
    optimizer: optax transformation (see `optim.make_optimizer`).
    learning_rate_fn: schedule, only to log 'train/learning_rate'.
    mesh: the device mesh (`sharding.make_mesh`); default the first device.
      With several processes it must span all their devices.

  Returns:
    RunResult.

  Raises:
    NonFiniteError: a step's loss, gradients, params or model state were
      not finite (nothing after the previous step is written).
    CheckpointError: a checkpoint save failed, or checkpoints exist but
      none can be restored (CheckpointMismatchError: they hold another
      model's params).
    InitSourceError: `spec.init_from` has no checkpoint that fits the model.
  """
  os.makedirs(spec.workdir, exist_ok=True)
  if flops.supports(model):
    print(f'model: {flops.summary(model, train_loader.seq_len)}', flush=True)
  mesh = mesh if mesh is not None else sharding.make_mesh(
      devices=jax.devices()[:1])
  primary = jax.process_index() == 0
  checkpointer = Checkpointer(spec.workdir, spec.keep_checkpoints,
                              config=spec.config)
  input_shape = (train_loader.batch_size, train_loader.seq_len)
  stop_flag = (stop_lib.SyncedStop() if jax.process_count() > 1 else
               stop_lib.StopFlag())
  with stop_flag as stop:  # from here on SIGTERM / SIGINT: save and return
    try:
      state, shardings = start_state(model, optimizer, input_shape, spec,
                                     checkpointer, mesh)
    except BaseException:
      checkpointer.close()
      raise
    # Only now: a run refused at restore keeps the config its checkpoints
    # were made with.
    if primary:
      write_config(spec.workdir, spec.config)
    loop = _make_loop(model, spec, optimizer, learning_rate_fn, mesh,
                      shardings, checkpointer, eval_data, train_loader,
                      int(state.step))
    progress = metrics_lib.Progress(spec.steps, int(state.step),
                                    spec.progress_bar if primary else False)
    try:
      result = loop.run(state, train_loader, progress, stop)
    except BaseException:
      _close_all(progress, loop.writer, checkpointer, quiet=True)
      raise
    _close_all(progress, loop.writer, checkpointer)
  if primary:
    plots.plot_run(spec.workdir, metrics_lib.read_metrics(
        os.path.join(spec.workdir, metrics_lib.METRICS_FILE)))
  if result.preempted:
    result.stop_signal = stop.stop_signal or 'SIGTERM'
    print(f'{result.stop_signal}: saved a checkpoint at step {result.step}',
          flush=True)
  return result


def _close_all(*closables, quiet: bool = False) -> None:
  """Closes each (None: skipped). With `quiet` (a run that already failed)
  errors are dropped, so they cannot hide the first one; else the first
  error is raised once all are closed."""
  errors = []
  for closable in closables:
    try:
      if closable is not None:
        closable.close()
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
  if errors and not quiet:
    raise errors[0]


def _make_loop(model, spec: RunSpec, optimizer, learning_rate_fn, mesh,
               shardings, checkpointer, eval_data, train_loader,
               start: int) -> '_Loop':
  """The _Loop of a run: compiled steps on the mesh, eval batches placed,
  a metrics writer on process 0 (TensorBoard purged after `start`)."""
  on_mesh = dict(mesh=mesh, state_shardings=shardings)
  losses = dict(aux_loss_weight=spec.aux_loss_weight,
                z_loss_weight=spec.z_loss_weight, pad_id=spec.pad_id)
  place = placement.Placement(mesh, train_loader)
  return _Loop(
      train_step=step_lib.make_train_step(
          model, optimizer, seed=spec.seed,
          learning_rate_fn=learning_rate_fn,
          grad_accum_steps=spec.grad_accum_steps, **losses, **on_mesh),
      eval_step=step_lib.make_eval_step(
          model, num_domains=spec.num_domains,
          token_vocab=spec.token_vocab, **losses, **on_mesh),
      eval_data=place.eval_batches(eval_data), checkpointer=checkpointer,
      guard=_FiniteGuard(checkpointer),
      writer=(metrics_lib.MetricsWriter(spec.workdir, start_step=start)
              if jax.process_index() == 0 else None),
      steps=spec.steps, every=spec.every,
      tokens_per_step=train_loader.batch_size * train_loader.seq_len,
      place=place)


@dataclasses.dataclass
class _Loop:
  """The per-step work of train_and_evaluate (see there)."""
  train_step: Any
  eval_step: Any
  eval_data: Sequence[Mapping[str, np.ndarray]]
  checkpointer: Checkpointer
  guard: _FiniteGuard
  writer: Optional[metrics_lib.MetricsWriter]  # None: not process 0
  steps: int
  every: tuple[int, int, int]  # log, eval, checkpoint
  tokens_per_step: int
  place: placement.Placement

  def run(self, state, train_loader, progress, stop) -> RunResult:
    """Runs steps int(state.step) .. self.steps - 1."""
    start = int(state.step)
    batches = train_loader.iterate(start) if hasattr(
        train_loader, 'iterate') else map(train_loader.batch,
                                          itertools.count(start))
    try:
      return self._steps(state, batches, progress, stop)
    finally:
      if hasattr(batches, 'close'):
        batches.close()  # stops the prefetch thread

  def _steps(self, state, batches, progress, stop) -> RunResult:
    """The loop proper; `batches` yields batch(t) for t = state.step, ..."""
    start = int(state.step)
    last_eval = None
    log_every, eval_every, ckpt_every = self.every
    tick, tick_step = time.time(), start
    for t in range(start, self.steps):
      batch = self.place.batch(next(batches))
      state, metrics = self.train_step(state, batch['tokens'],
                                       batch.get('domain'))
      s = t + 1
      # Read the flag once: SIGTERM may set it at any moment, and a stop
      # must always come with its checkpoint.
      stopping = stop.stopping(s)
      self.guard.add(s, metrics)
      progress.advance(s)
      do_log = _is_every(s, log_every, self.steps)
      do_eval = _is_every(s, eval_every, self.steps)
      do_save = _is_every(s, ckpt_every, self.steps) or stopping
      if do_log or do_eval or do_save:
        self.guard.check()  # NonFiniteError before anything is written
      if do_log:
        jax.block_until_ready(metrics)
        now = time.time()
        rate = (s - tick_step) * self.tokens_per_step / max(now - tick, 1e-9)
        tick, tick_step = now, s
        self._write(train_record(s, metrics, rate), progress)
      if do_eval:
        eval_start = time.time()
        last_eval = evaluate(self.eval_step, state.params, self.eval_data, s,
                             state.model_state)
        self._write(last_eval, progress)
        tick += time.time() - eval_start  # keep eval out of tokens_per_sec
      if do_save:
        if self.writer is not None:
          self.writer.flush()  # every event <= s on disk before checkpoint s
        self.checkpointer.save(state)
      if stopping and s < self.steps:
        return RunResult(state, s, True, last_eval)
    return RunResult(state, int(state.step), False, last_eval)

  def _write(self, record, progress) -> None:
    if self.writer is not None:
      self.writer.write(record)
      progress.log(record)
