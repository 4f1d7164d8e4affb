"""Command-line trainer.

    python -m experiments.train --config configs/switch.py:tiny \
        --workdir runs/switch_tiny [--config.train.steps=50 ...]
    python -m experiments.train --workdir runs/imported   # its config.json
    python -m experiments.train --config configs/switch.py:tiny \
        --workdir runs/b --init_from runs/a

`--config PATH[:VARIANT]` loads `get_config(VARIANT)` from PATH; every
`--config.<dotted.key>=<value>` (or `--config.<key> <value>`) overrides one
key (values are Python literals, `none`/`true`/`false`, or plain strings).
Without --config, the work dir's stored config.json is the config (keys it
lacks take their base default); e.g. a work dir made by
`experiments.convert`.

Resume: re-running the same command in the same workdir resumes from the
newest intact checkpoint and ends bitwise like an uninterrupted run.
SIGTERM or Ctrl-C (SIGINT) saves a checkpoint at the step reached and exits
with code 0; a second Ctrl-C aborts at once, without saving (exit 130).
metrics.jsonl records after the restored step are dropped (TensorBoard:
hidden), records missing before it are reported. A work dir without
config.json is checked against the config saved in its newest checkpoint.

One run per work dir: a run holds `<workdir>/run.lock` (pid, host, start
time); a second run on the same work dir is refused at once (exit 2, naming
the holder). The lock of a run that was killed is stale: the next run takes
it over and says so. With several processes, process 0 holds it.

Library warnings and tracebacks (orbax, asyncio, absl) go to
`<workdir>/errors.log`, not the terminal; an error prints one `error:`
line, last, and says when errors.log has its details.

`--init_from W` (the config key `init.from_workdir`) starts a new run at
step 0 from the params and model state of work dir W's newest intact
checkpoint, with a fresh optimizer state. W must hold a checkpoint whose
param tree and shapes are this config's model's (else exit 2, naming the
first differing param and both shapes). A work dir that already has
checkpoints resumes from them and ignores it (the log says so).

A workdir whose config.json differs from the new config is refused with the
list of differing keys (`key: stored -> new`) unless one of:
  --fresh     move the old run to `<workdir>.old-<n>` and start over;
  --override  continue the run with the new config (the stored config is
              kept as `config.<n>.json`).
Without --config, overrides of a work dir where no step has been trained
yet (no checkpoint after step 0, e.g. fresh from experiments.convert) are
taken as if --override were given: nothing trained would be mixed.

Exit codes (errors print one line, `error: <message>`, to stderr):
  0    done, or stopped by SIGTERM / Ctrl-C after saving a checkpoint;
  1    a checkpoint (or metrics file) could not be written, or checkpoints
       exist but none can be restored (nothing is started over), or
       jax.distributed could not connect to the coordinator;
  2    bad config or refused workdir, before any data is built or anything
       compiles: the message names the key, the value and what is allowed
       (a mesh that does not fit the devices or the model included); an
       init.from_workdir that cannot initialise the model; a --workdir that
       is empty, a file or not writable; a workdir in use by another run;
       checkpoints of another model (other param shapes);
  3    a non-finite loss / gradient: the message names the step and the
       first non-finite MoE layer; the last checkpoint is left intact;
  130  Ctrl-C before training started, or a second Ctrl-C before the
       checkpoint was saved (nothing saved; the last checkpoint is intact).

Devices and hosts (README "Scaling out"): `--config.mesh.data/expert/model`
lay the run out on a device mesh (one may be -1: the remaining devices);
the default (1, 1, 1) uses one device. With several processes, run the same
command on every host plus `--config.distributed.coordinator_address=
HOST:PORT --config.distributed.num_processes=N
--config.distributed.process_id=I` (or `--config.distributed.initialize=
true` where JAX detects them: TPU pod slices, SLURM, Open MPI);
`jax.distributed.initialize` then runs before anything touches a device.
The work dir must be on a file system every host sees; process 0 writes
the metrics, every process writes its shards of each checkpoint. A run may
resume on another mesh or number of hosts (mesh.* and distributed.* are
not compared with the stored config).

Most of a tiny run's wall time is XLA compilation; setting
JAX_COMPILATION_CACHE_DIR=<dir> (JAX's persistent compilation cache) makes
re-runs and resumes of the same config skip it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import jax  # importing starts no backend: jax.distributed can still start
from jax.experimental import multihost_utils
import numpy as np

from experiments import cli
from experiments import config_lib
from experiments import finetune_setup
from experiments import memory_check
from experiments import model_config
from experiments import workdir_config
from experiments.config_lib import build_data  # pylint: disable=unused-import
from experiments.config_lib import build_model  # pylint: disable=unused-import
from moejax import sharding
from moejax.train import checkpoint as checkpoint_lib
from moejax.train import lock as lock_lib
from moejax.train import state as state_lib
from moejax.train import stop as stop_lib
from moejax.train.checkpoint import InitSourceError
from moejax.train.run_spec import RunSpec

INIT_KEY = 'init.from_workdir'  # what --init_from sets


def parse_overrides(parser: argparse.ArgumentParser,
                    rest: Sequence[str]) -> dict:
  """{dotted key: value} of the `--config.<key>=<value>` (or `--config.<key>
  <value>`) arguments left by `parser.parse_known_args`; anything else is a
  `parser.error`."""
  overrides, i = {}, 0
  while i < len(rest):
    arg = rest[i]
    if not arg.startswith('--config.'):
      parser.error(f'unrecognized argument {arg!r}')
    key, eq, value = arg[len('--config.'):].partition('=')
    if not eq:
      if i + 1 >= len(rest):
        parser.error(f'{arg} needs a value')
      value, i = rest[i + 1], i + 1
    overrides[key] = config_lib.parse_value(value)
    i += 1
  return overrides


def parse_args(argv: Optional[Sequence[str]]):
  """Splits argv into (--config, --workdir) and the --config.<key> overrides.

  Args:
    argv: arguments without the program name (None: sys.argv[1:]).

  Returns:
    (argparse namespace with config, workdir, fresh, override; {dotted key:
    value}).
  """
  parser = cli.Parser(
      prog='python -m experiments.train',
      description=__doc__,  # usage, resume, the lock, exit codes
      epilog='Override any key with --config.<dotted.key>=<value>.')
  parser.add_argument('--config', default=None,
                      help='config file and variant, e.g. '
                           'configs/switch.py:tiny (default: the '
                           'config.json of --workdir)')
  parser.add_argument('--workdir', required=True,
                      help='run directory (resumed if it has checkpoints)')
  parser.add_argument('--init_from', default=None, metavar='WORKDIR',
                      help="start at step 0 from this work dir's newest "
                           'checkpoint (params and model state; sets '
                           'init.from_workdir)')
  group = parser.add_mutually_exclusive_group()
  group.add_argument('--fresh', action='store_true',
                     help='move an existing run in --workdir to '
                          '<workdir>.old-<n> and start over')
  group.add_argument('--override', action='store_true',
                     help='continue the run in --workdir even though its '
                          'stored config differs from this one')
  args, rest = parser.parse_known_args(argv)
  overrides = parse_overrides(parser, rest)
  if args.init_from is not None:
    if overrides.get(INIT_KEY, args.init_from) != args.init_from:
      parser.error(f'--init_from and --config.{INIT_KEY} disagree')
    overrides[INIT_KEY] = args.init_from
  return args, overrides


def load_and_validate(spec: Optional[str], overrides: dict,
                      workdir: Optional[str] = None):
  """Loads the config, applies overrides and validates (ValueError if bad).

  Args:
    spec: 'path[:variant]', or None: `workdir`'s stored config.json.
    overrides: {dotted key: value}.
    workdir: the run directory (needed when spec is None).

  Returns:
    The validated ConfigDict.
  """
  if spec is None:
    config = workdir_config.load_stored_config(workdir or '.')
  else:
    config = config_lib.load_config(spec)
  config = config_lib.apply_overrides(config, overrides)
  config_lib.validate_config(config)
  return config


EXIT_RUN_ERROR, EXIT_BAD_CONFIG, EXIT_NONFINITE = 1, 2, 3


def initialize_distributed(config) -> bool:
  """Calls jax.distributed.initialize if the config asks for it.

  Must run before anything touches a device. Values left None are
  auto-detected by JAX (TPU pod slices, SLURM, Open MPI; the
  JAX_COORDINATOR_ADDRESS environment variable).

  Args:
    config: the validated config (`distributed.*`).

  Returns:
    Whether jax.distributed was initialised.

  Raises:
    ValueError: initialisation was asked for, but JAX could not find the
      coordinator / process count / process id (names the keys).
    RuntimeError: the coordinator could not be reached.
  """
  if not config_lib.uses_distributed(config):
    return False
  dist = config.distributed
  try:
    jax.distributed.initialize(coordinator_address=dist.coordinator_address,
                               num_processes=dist.num_processes,
                               process_id=dist.process_id)
  except ValueError as e:
    raise ValueError(
        f'jax.distributed.initialize could not start ({e}) with '
        f'distributed.coordinator_address={dist.coordinator_address!r}, '
        f'distributed.num_processes={dist.num_processes!r}, '
        f'distributed.process_id={dist.process_id!r}; allowed: all three '
        'set, or None where the cluster lets JAX detect them (TPU pod '
        'slices, SLURM, Open MPI).') from e
  print(f'jax.distributed: process {jax.process_index()} of '
        f'{jax.process_count()}, {jax.local_device_count()} local of '
        f'{jax.device_count()} devices', flush=True)
  return True


def build_mesh(config):
  """The run's device mesh and this process's rows of each global batch.

  Args:
    config: the validated config (`mesh.*`, after initialize_distributed).

  Returns:
    (jax.sharding.Mesh, slice of the global batch rows this process loads).

  Raises:
    ValueError naming the keys: a mesh larger than the devices, a -1 that
    cannot fill them, or a resolved mesh that does not fit the batch or
    the experts.
  """
  sizes = config_lib.mesh_sizes(config)
  try:
    shape = sharding.resolve_mesh_shape(*sizes, jax.device_count())
  except ValueError as e:
    raise ValueError(f'{e} Allowed: mesh.data * mesh.expert * mesh.model <= '
                     f'{jax.device_count()} (the devices of all processes), '
                     'or -1 for one of them.') from e
  config_lib.check_mesh_fit(config, shape)
  mesh = sharding.make_mesh(*shape)
  return mesh, sharding.process_batch_rows(mesh, config.train.batch_size)


def _num_domains(config) -> int:
  """N for the eval's specialisation score: the synthetic mixture's
  domain count, a labelled corpus's (python_stdlib: 8), 0 (no score) for
  data without domain ids or a dense model."""
  if not config.model.moe.num_experts:
    return 0
  if config.data.name == 'synthetic_mixture':
    return config.data.num_domains
  return len(config_lib.CORPUS_DOMAINS.get(config.data.name, ()))


def _sync(name: str) -> None:
  """Barrier across processes (no-op with one)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _error(message: str, code: int,
           log: Optional[workdir_config.LibraryLog] = None) -> int:
  """Prints the one `error:` line (naming errors.log if it has details of
  this run) and returns `code`."""
  if log is not None and log.count:
    message += f' (details: {log.path})'
  sys.stdout.flush()
  print(f'error: {message}', file=sys.stderr, flush=True)
  return code


def _lock_workdir(config, workdir: str) -> Optional[lock_lib.WorkdirLock]:
  """The work dir's lock, taken by process 0 (None on the others, which
  learn whether process 0 got it: a refusal stops every process).

  Raises:
    WorkdirLockedError: another live run holds it.
    OSError: the lock file cannot be written.
  """
  lock, error = None, None
  several = config_lib.uses_distributed(config) and jax.process_count() > 1
  if not several or jax.process_index() == 0:  # (no backend start if one)
    try:
      lock = lock_lib.WorkdirLock(workdir)
      lock.acquire()
    except (lock_lib.WorkdirLockedError, OSError) as e:
      lock, error = None, e
  if several and multihost_utils.broadcast_one_to_all(
      np.int32(error is not None)) and error is None:
    error = lock_lib.WorkdirLockedError(
        workdir, {}, f'process 0 could not lock --workdir {workdir} (see '
        'its error); every process stops.')
  if error is not None:
    raise error
  return lock


def _prepare_workdir(args, diff: list,
                     lock: Optional[lock_lib.WorkdirLock]) -> None:
  """--fresh: moves the old run aside (the lock moves to the new work dir);
  --override (or overrides of an untrained stored config): keeps its
  config. With several processes, process 0 does it and the others wait."""
  if jax.process_index() != 0:
    return
  if args.fresh:
    moved = workdir_config.move_run_aside(args.workdir)
    if moved:
      if lock is not None:
        lock.moved_to(moved)
      print(f'--fresh: moved the previous run to {moved}', flush=True)
  elif diff:
    kept = workdir_config.keep_stored_config(args.workdir)
    why = ('--override: continuing with' if args.override else
           'no step trained yet: starting with')
    where = (f'kept as {kept}' if kept else
             'it was saved in the checkpoints only')
    print(f'{why} a config that differs from the stored one ({where}):\n'
          + '\n'.join(diff), flush=True)


def init_source(config, args, model, mesh) -> tuple[Optional[str], bool]:
  """init.from_workdir and the finetune block, checked against the model.

  Args:
    config: the validated config.
    args: the parsed arguments (workdir, fresh).
    model: the config's model.
    mesh: the run's mesh (after initialize_distributed).

  Returns:
    (the work dir the loop initialises from, or None; whether a fresh
    start needs `finetune_setup.prepare_start`: upcycling, adapters added
    to a source, ESFT).

  Raises:
    ValueError naming init.from_workdir or the finetune / init key: a fresh
    run whose source does not fit this model, freeze patterns matching
    nothing, LoRA settings that add no adapter.
  """
  source = config.init.from_workdir
  fresh = args.fresh or not checkpoint_lib.checkpoint_steps(args.workdir)
  tuning = finetune_setup.plan(config, {}) is not None
  if not tuning and not (source and fresh):
    return source or None, False  # a resume: the loop logs that it ignores it
  optimizer, _ = config_lib.build_optimizer(config)
  abstract = state_lib.abstract_train_state(
      model, optimizer, (config.train.batch_size, config.data.seq_len), mesh)
  finetune_setup.check_start(config, abstract, fresh)
  prepared = fresh and finetune_setup.needs_prepared_start(config)
  if prepared or not (source and fresh):
    return (None if prepared else source or None), prepared
  try:
    checkpoint_lib.check_init_source(
        source, {'params': abstract.params,
                 'model_state': abstract.model_state})
  except InitSourceError as e:
    raise ValueError(init_error(e)) from e
  return source, False


def init_error(error) -> str:
  """The one-line message of an InitSourceError, naming the config key."""
  return (f'{INIT_KEY}={error.workdir!r} {error.reason}; allowed values: '
          "'' (a fresh init from seed), or a moejax work dir with a "
          "checkpoint of this config's model.")


def run_spec(config, workdir: str, init_from: Optional[str]) -> RunSpec:
  """The RunSpec of a validated config (see `train_and_evaluate`)."""
  t, moe = config.train, config.model.moe
  return RunSpec(
      workdir=workdir, steps=t.steps, seed=config.seed,
      aux_loss_weight=moe.aux_loss_weight, z_loss_weight=moe.z_loss_weight,
      pad_id=config.data.pad_id, log_every=t.log_every,
      eval_every=t.eval_every, checkpoint_every=t.checkpoint_every,
      keep_checkpoints=t.keep_checkpoints,
      grad_accum_steps=t.grad_accum_steps,
      config=config_lib.resolved_config(config), init_from=init_from,
      num_domains=_num_domains(config),
      token_vocab=(model_config.model_vocab_size(config)
                   if config.model.moe.num_experts else 0))


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the trainer; returns the process exit code (see the module doc).

  Args:
    argv: arguments without the program name (None: sys.argv[1:]).

  Returns:
    Exit code: 0 ok, 1 checkpoint / write error, 2 bad config / refused
    workdir, 3 non-finite values. (Ctrl-C outside the training steps
    raises KeyboardInterrupt: `run_cli` makes it 130.)
  """
  args, overrides = parse_args(argv)
  start = time.time()
  try:
    workdir_config.check_workdir_path(args.workdir)
    config = load_and_validate(args.config, overrides, args.workdir)
  except ValueError as e:
    return _error(str(e), EXIT_BAD_CONFIG)
  try:  # before anything touches a device
    initialize_distributed(config)
  except ValueError as e:
    return _error(str(e), EXIT_BAD_CONFIG)
  except RuntimeError as e:
    return _error(f'jax.distributed: {e}', EXIT_RUN_ERROR)
  with workdir_config.LibraryLog(args.workdir) as log:
    try:
      lock = _lock_workdir(config, args.workdir)
    except (lock_lib.WorkdirLockedError, OSError) as e:
      return _error(str(e), EXIT_BAD_CONFIG)
    try:
      return _locked_main(args, config, start, log, lock)
    finally:
      if lock is not None:
        lock.release()


def _locked_main(args, config, start: float, log: workdir_config.LibraryLog,
                 lock: Optional[lock_lib.WorkdirLock]) -> int:
  """main, once this run owns the work dir: checks the stored config,
  builds the mesh and data (nothing compiled yet), then trains."""
  try:
    override = args.override or (args.config is None and
                                 workdir_config.untrained(args.workdir))
    diff = [] if args.fresh else workdir_config.check_workdir_config(
        config, args.workdir, override=override)
    model = config_lib.build_model(config)
    mesh, rows = build_mesh(config)
    train_loader, eval_data = config_lib.build_data(config, rows)
    init_from, prepared = init_source(config, args, model, mesh)
    # After the data (its errors come first, and it traces nothing),
    # before anything compiles.
    memory_check.check_memory(config, model, mesh=mesh)
  except ValueError as e:
    return _error(str(e), EXIT_BAD_CONFIG, log)
  try:
    _prepare_workdir(args, diff, lock)
  except lock_lib.WorkdirLockedError as e:
    return _error(str(e), EXIT_BAD_CONFIG)
  except OSError as e:
    return _error(f'could not prepare --workdir {args.workdir}: {e}',
                  EXIT_RUN_ERROR)
  _sync('moejax_workdir_ready')
  from moejax import train as train_lib  # pylint: disable=g-import-not-at-top
  try:
    optimizer, schedule = finetune_setup.start_optimizer(
        config, args.workdir, prepared, model, mesh, train_loader, eval_data)
  except InitSourceError as e:
    return _error(init_error(e), EXIT_BAD_CONFIG)
  except ValueError as e:
    return _error(str(e), EXIT_BAD_CONFIG, log)
  try:
    result = train_lib.train_and_evaluate(
        model, run_spec(config, args.workdir, init_from),
        train_loader=train_loader, eval_data=eval_data, optimizer=optimizer,
        learning_rate_fn=schedule, mesh=mesh)
  except train_lib.NonFiniteError as e:
    return _error(str(e), EXIT_NONFINITE)
  except InitSourceError as e:
    return _error(init_error(e), EXIT_BAD_CONFIG)
  except checkpoint_lib.CheckpointMismatchError as e:
    return _error(str(e), EXIT_BAD_CONFIG)
  except (train_lib.CheckpointError, OSError) as e:
    log.exception(e)
    if isinstance(e, OSError):
      e = (f'could not write in --workdir {args.workdir} ({e}); free disk '
           'space or fix the permissions, then re-run the same command to '
           'resume from the last checkpoint.')
    return _error(str(e), EXIT_RUN_ERROR, log)
  _print_summary(result, config.train.steps, start)
  return 0


def _print_summary(result, steps: int, start: float) -> None:
  """The last line of a run: status, step, final eval loss, wall time."""
  final = result.last_eval or {}
  summary = ', '.join(f'{k} {v:.4f}' for k, v in final.items()
                      if k in ('eval/loss', 'eval/excess_loss'))
  status = (f'stopped by {result.stop_signal or "SIGTERM"}'
            if result.preempted else 'done')
  print(f'{status}: step {result.step}/{steps}'
        f'{", " + summary if summary else ""}, wall {time.time() - start:.1f}s',
        flush=True)


def run_cli(argv: Optional[Sequence[str]] = None) -> int:
  """main(argv), with Ctrl-C outside the training steps, or a second Ctrl-C
  (the first saves and stops), as one line and exit code 130 instead of a
  traceback."""
  try:
    return main(argv)
  except stop_lib.SecondInterrupt:
    message = ('Ctrl-C again before the checkpoint was saved; the last saved '
               'checkpoint is intact')
  except KeyboardInterrupt:
    message = ('Ctrl-C outside the training steps: nothing was saved; the '
               'last saved checkpoint (if any) is intact')
  sys.stdout.flush()
  print(f'aborted: {message}', file=sys.stderr, flush=True)
  return 130


if __name__ == '__main__':
  _code = run_cli()
  if _code:  # after an error: no wait for library threads, no exit noise
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_code)  # pylint: disable=protected-access
  sys.exit(_code)
