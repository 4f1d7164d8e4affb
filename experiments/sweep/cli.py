"""The sweep command line, and the `point` / `analyse` forms run per run."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
import traceback
from typing import Any, Optional, Sequence

import jax
import ml_collections

from experiments import cli
from experiments import config_lib
from experiments import provenance
from experiments import train
from experiments.sweep import points as points_lib
from experiments.sweep import runner as runner_lib
from experiments.sweep.points import Run
from moejax import data as data_lib
from moejax.analysis import report
from moejax.analysis import results as results_lib
from moejax.analysis import stats
from moejax.models import flops
from moejax.train import state as state_lib
from moejax.train.checkpoint import Checkpointer


def _machine(runs: Sequence[Run]) -> str:
  """CPU, cores, versions and the runs' JAX device."""
  devices = set()
  for run in runs:
    analysis = results_lib.read_json(
        os.path.join(run.workdir, results_lib.ANALYSIS_FILE)) or {}
    if 'device' in analysis:
      devices.add(analysis['device'])
  return provenance.machine(', '.join(sorted(devices)) or 'unknown')


def _data_line(runs: Sequence[Run]) -> list[str]:
  """'Data: ...' with the corpus's provenance (python_stdlib: version,
  content hash, size) when the runs train on it; [] otherwise."""
  corpora = set()
  for run in runs:
    config = results_lib.read_json(os.path.join(run.workdir,
                                                'config.json')) or {}
    data = config.get('data', {})
    if data.get('name') == 'python_stdlib':
      corpora.add((data.get('data_dir') or '~/tensorflow_datasets',
                   data.get('example_len', 129)))
  return [f'Data: {data_lib.describe_corpus(info)}  ' for info in (
      data_lib.stdlib_corpus_info(os.path.expanduser(data_dir),
                                  example_len=example_len)
      for data_dir, example_len in sorted(corpora))]


def _fmt_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600}h {seconds // 60 % 60:02d}m {seconds % 60:02d}s'


def write_outputs(args, argv: Sequence[str], runs: Sequence[Run],
                  records: list[dict[str, Any]], points: Sequence[dict],
                  elapsed: float, ran: int) -> str:
  """results.csv, runs.csv, results.md and plots/ in --workdir.

  `ran` runs were trained or analysed by this invocation, in `elapsed` s.

  Returns:
    The path of results.md.
  """
  walls = sum(r['wall_s'] for r in records)
  header = [
      f'Command: `python -m experiments.sweep {shlex.join(argv)}`  ',
      f'Machine: {_machine(runs)}  ',
      f'Commit: {provenance.commit()} (exact losses depend on the '
      "machine's float order: a re-run elsewhere may differ in the last "
      'digits)  ',
      *_data_line(runs),
      f'Wall time: {_fmt_seconds(walls)} for the {len(records)} runs one '
      f'after another (sum of their training + analysis times)' +
      (f'; this invocation ran {ran} of them in {_fmt_seconds(elapsed)} '
       f'with --parallel {args.parallel}.' if ran else '.')]
  curves = [(r.name, results_lib.read_jsonl(os.path.join(
      r.workdir, results_lib.METRICS_FILE)), r.baseline) for r in runs]
  return report.write_sweep_outputs(
      os.path.abspath(args.workdir), records, points_lib.table_keys(points),
      curves, header, f'Sweep `{args.sweep}` of `{args.config}`')


# ------------------------------------------------------- point and analyse
def _final_variables(workdir: str, config, model) -> tuple[int, dict]:
  """(step, model variables) of the run's checkpoint of step train.steps."""
  optimizer, _ = config_lib.build_optimizer(config)
  abstract = state_lib.abstract_train_state(
      model, optimizer, (config.train.batch_size, config.data.seq_len))
  checkpointer = Checkpointer(workdir, config.train.keep_checkpoints)
  try:
    state = checkpointer.restore(abstract, config.train.steps)
  finally:
    checkpointer.close()
  # Non-parameter collections (e.g. a loss-free balancing bias) route too.
  return int(state.step), {'params': state.params,
                           **(getattr(state, 'model_state', None) or {})}


def analyse(workdir: str, num_shuffles: int = 8) -> dict[str, Any]:
  """Writes `<workdir>/analysis.json` from the run's final checkpoint.

  Params total / active and training FLOPs per token; for MoE models the
  per-layer routing statistics (moejax.analysis.routing_statistics) of the
  checkpoint of the last step (train.steps), on the whole eval split for
  synthetic data (data.num_eval // train.batch_size batches), else on the
  trainer's train.eval_batches. A model whose routers make no per-token
  choice (no expert_index) gets no routing statistics, and a 'note'.

  Args:
    workdir: a run directory with config.json and checkpoints.
    num_shuffles: permutations for the chance-level NMI.

  Returns:
    The analysis dict.
  """
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    config = ml_collections.ConfigDict(json.load(f))
  model = config_lib.build_model(config)
  seq_len, batch = config.data.seq_len, config.train.batch_size
  counts = flops.count_params(model, seq_len)
  device = jax.devices()[0]
  out = {'params_total': counts['total'], 'params_active': counts['active'],
         'flops_per_token': flops.flops_per_token(model, seq_len),
         'device': f'{device.platform} ({device.device_kind})',
         'moe_layers': len(getattr(model, 'moe_layers', ())), 'layers': {}}
  if out['moe_layers']:
    eval_config = ml_collections.ConfigDict(config.to_dict())
    if config.data.name == 'synthetic_mixture':
      eval_config.train.eval_batches = config.data.num_eval // batch
    _, batches = config_lib.build_data(eval_config)
    step, variables = _final_variables(workdir, config, model)
    out['step'] = step
    out['eval_sequences'] = sum(len(b['tokens']) for b in batches)
    try:
      out['layers'] = stats.routing_statistics(
          model, variables, batches, pad_id=config.data.pad_id,
          num_shuffles=num_shuffles)
    except ValueError as e:  # e.g. a router without per-token choices
      out['note'] = f'no routing statistics: {e}'
      print(f'warning: {out["note"]}', file=sys.stderr)
  runner_lib.write_json(os.path.join(workdir, results_lib.ANALYSIS_FILE), out)
  return out


def point_main(argv: Sequence[str]) -> int:
  """`point <experiments.train args>`: train, then analyse the finished run.

  Returns:
    The trainer's exit code if not 0, EXIT_UNFINISHED if it stopped early
    (SIGTERM), EXIT_ANALYSIS if the analysis raised, else 0.
  """
  rc = train.main(list(argv))
  if rc:
    return rc
  args, _ = train.parse_args(list(argv))
  config = results_lib.read_json(os.path.join(args.workdir, 'config.json'))
  if not results_lib.run_finished(args.workdir, config['train']['steps']):
    print('error: the run stopped before its last step', file=sys.stderr)
    return runner_lib.EXIT_UNFINISHED
  return analyse_main([args.workdir])


def analyse_main(argv: Sequence[str]) -> int:
  """`analyse RUN_DIR`: writes RUN_DIR/analysis.json; 4 if it fails."""
  if len(argv) != 1 or not os.path.isfile(os.path.join(argv[0],
                                                       'config.json')):
    print(f'error: analyse needs one run directory holding config.json, got '
          f'{list(argv)}', file=sys.stderr)
    return 2
  try:
    result = analyse(argv[0])
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
    return runner_lib.EXIT_ANALYSIS
  spec = {k: round(v['nmi'], 4) for k, v in result['layers'].items()
          if 'nmi' in v}
  print(f'analysis: params {result["params_total"]} total, '
        f'{result["params_active"]} active; specialisation NMI {spec}',
        flush=True)
  return 0


# --------------------------------------------------------------------- CLI
EPILOG = """\
Overrides for every run: --config.<dotted.key>=<value>.

exit codes:
  0    every run finished and was analysed (--dry_run: the plan printed)
  1    some run is not ok (failed, or not finished with --report_only):
       listed in results.md and on stdout; the other runs went on
  2    a bad flag, sweep or config value (one line `error: ...` on stderr
       naming it), before any run starts
  130  interrupted (Ctrl-C or SIGTERM); the same command resumes"""


def parse_args(argv: Sequence[str]):
  """(namespace, {dotted key: value} of the --config.k=v overrides).

  A bad flag exits with code 2 and one `error:` line (cli.Parser).
  """
  from experiments import sweep  # pylint: disable=import-outside-toplevel
  positive = cli.number(int, 'an int >= 1', lambda v: v >= 1)
  parser = cli.Parser(
      prog='python -m experiments.sweep',
      description=sweep.__doc__,  # what a sweep runs and writes
      epilog=EPILOG)
  parser.add_argument('--config', required=True, help='path[:variant]')
  parser.add_argument('--sweep', required=True,
                      help='a sweep of get_sweeps(), or KEY=v1,v2,...')
  parser.add_argument('--workdir', required=True, help='sweep directory')
  parser.add_argument('--seeds', type=positive, default=1, metavar='N',
                      help='seeds per point: config seed + 0 .. N-1')
  parser.add_argument('--parallel', type=positive, default=1, metavar='N',
                      help='runs at once (each JAX process uses all cores)')
  parser.add_argument('--no_baseline', action='store_true',
                      help='no dense baseline runs (no Δ dense column)')
  parser.add_argument('--baseline_config', default=None,
                      help='baseline path[:variant] (default: dense.py next '
                           'to --config, same variant)')
  parser.add_argument('--baseline_root', default=None,
                      help='where baseline runs live (default --workdir)')
  parser.add_argument('--compilation_cache', default='',
                      help="JAX compilation cache dir of the runs (default "
                           "<workdir>/.jax_cache; 'none': off)")
  parser.add_argument('--dry_run', action='store_true',
                      help='print the runs and their commands, run nothing')
  parser.add_argument('--report_only', action='store_true',
                      help='only rebuild tables and plots from the run dirs')
  args, rest = parser.parse_known_args(list(argv))
  overrides = {}
  for arg in rest:
    key, eq, value = arg[len('--config.'):].partition('=')
    if not arg.startswith('--config.') or not eq:
      parser.error(f'unrecognized argument {arg!r} (overrides are '
                   '--config.<key>=<value>)')
    overrides[key] = config_lib.parse_value(value)
  return args, overrides


def _interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point; returns 0 (all ok), 1 (some run failed), 2 (bad args)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ['point']:
    return point_main(argv[1:])
  if argv[:1] == ['analyse']:
    return analyse_main(argv[1:])
  args, overrides = parse_args(argv)
  try:
    points = points_lib.select_sweep(points_lib.abs_spec(args.config),
                                     args.sweep)
    runs = points_lib.make_runs(args, points, overrides)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.dry_run:
    for run in runs:
      command = ['python'] + points_lib.trainer_command(run)[1:]
      print(f'{run.name}: {shlex.join(command)}')
    return 0
  start = time.time()
  os.makedirs(args.workdir, exist_ok=True)
  cache = args.compilation_cache or os.path.join(
      os.path.abspath(args.workdir), '.jax_cache')
  attempts = {}
  if not args.report_only:
    try:
      runner_lib.prepare_data(runs)
    except ValueError as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    old = signal.signal(signal.SIGTERM, _interrupt)  # stop runs cleanly too
    try:
      attempts = runner_lib.execute(runs, args.parallel,
                                    None if cache == 'none' else cache)
    except KeyboardInterrupt:
      print('interrupted; re-run the same command to resume', flush=True)
      return 130
    finally:
      signal.signal(signal.SIGTERM, old)
  records = runner_lib.collect(runs, attempts)
  ran = sum(a['action'] != 'skipped' for a in attempts.values())
  path = write_outputs(args, argv, runs, records, points, time.time() - start,
                       ran)
  failed = [r['name'] for r in records if r['status'] != 'ok']
  print(f'wrote {path}' + (f'; {len(failed)} run(s) not ok: '
                           f'{", ".join(failed)}' if failed else ''),
        flush=True)
  return 1 if failed else 0

