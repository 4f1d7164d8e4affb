"""moejax training library: plain-argument building blocks of a run.

Public API:
  TrainState, abstract_train_state, create_train_state      (state)
  make_optimizer, lr_schedule, decay_mask                    (optim)
  compute_loss, make_train_step, make_eval_step, step_rng,   (step)
  finite_flags, nonfinite_report
  Checkpointer, CheckpointError, CheckpointCorruptError     (checkpoint)
  MetricsWriter, read_metrics, truncate_metrics, Progress    (metrics)
  plot_run                                                   (plots)
  train_and_evaluate, evaluate, RunResult, NonFiniteError    (loop)
"""

from moejax.train.checkpoint import CheckpointCorruptError
from moejax.train.checkpoint import CheckpointError
from moejax.train.checkpoint import Checkpointer
from moejax.train.loop import NonFiniteError
from moejax.train.loop import RunResult
from moejax.train.loop import evaluate
from moejax.train.loop import train_and_evaluate
from moejax.train.metrics import MetricsWriter
from moejax.train.metrics import Progress
from moejax.train.metrics import read_metrics
from moejax.train.metrics import truncate_metrics
from moejax.train.optim import decay_mask
from moejax.train.optim import lr_schedule
from moejax.train.optim import make_optimizer
from moejax.train.plots import plot_run
from moejax.train.state import TrainState
from moejax.train.state import abstract_train_state
from moejax.train.state import create_train_state
from moejax.train.step import compute_loss
from moejax.train.step import finite_flags
from moejax.train.step import make_eval_step
from moejax.train.step import make_train_step
from moejax.train.step import nonfinite_report
from moejax.train.step import step_rng

__all__ = [
    'CheckpointCorruptError', 'CheckpointError', 'Checkpointer',
    'MetricsWriter', 'NonFiniteError', 'Progress', 'RunResult', 'TrainState',
    'abstract_train_state', 'compute_loss', 'create_train_state',
    'decay_mask', 'evaluate', 'finite_flags', 'lr_schedule',
    'make_eval_step', 'make_optimizer', 'make_train_step',
    'nonfinite_report', 'plot_run', 'read_metrics', 'step_rng',
    'train_and_evaluate', 'truncate_metrics',
]
