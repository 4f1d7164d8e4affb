"""Baselines of upcycling and MoE fine-tuning: runs, evaluates, tabulates.

    python -m experiments.finetune_baselines --part upcycle --size small \
        --workdir runs/baselines
    python -m experiments.finetune_baselines --part finetune --size small \
        --workdir runs/baselines

upcycle: a dense run (configs/dense.py, the size's steps), then at equal
  extra steps (half the size's steps) each of: the dense run continued
  (init from it), its sparse upcycling into configs/upcycle.py's MoE
  (router fresh; router zero; Drop-Upcycling ratio 0.5), and the same MoE
  trained from scratch (for the extra steps only, and for the dense run's
  steps plus them). Every continuation restarts its warmup-cosine
  schedule.
finetune: configs/finetune.py: a Switch model pretrained on domains 0-5,
  then each fine-tuning method on domains 6-7 (full, frozen router, expert
  LoRA, ESFT); each final checkpoint evaluated on the new domains and on
  the old ones (the same eval batches as the pretrained model's), with its
  trainable params and optimizer-state bytes.

Writes `<workdir>/<part>_<size>/` (the runs) and `results/<part>_<size>.md`
(the table, the command, the machine and commit) plus a `.json` of the
numbers, so a re-run can be diffed. Runs that already finished are reused
(the trainer resumes them: nothing to do). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np

from configs import finetune as finetune_configs
from experiments import cli
from experiments import config_lib
from experiments import finetune_setup
from experiments import provenance
from experiments import workdir_config
from moejax.train import finetune
from moejax.train import init_source
from moejax.train import loop
from moejax.train import state as state_lib
from moejax.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ('upcycle', 'finetune')
SIZES = ('tiny', 'small')


EPILOG = """\
exit codes:
  0  done
  1  a training run or an evaluation failed: a traceback with its command
     and the tail of its log (the runs that finished are kept and reused
     by a re-run)
  2  a bad flag: one line `error: ...` on stderr naming the flag and the
     allowed values, before anything runs"""


def _train(workdir: str, config: str, *extra: str) -> float:
  """Runs experiments.train (a finished run only resumes); returns its
  wall seconds. Raises RuntimeError with the log's tail on failure."""
  cmd = [sys.executable, '-m', 'experiments.train', '--config', config,
         '--workdir', workdir, *extra]
  print('$ ' + shlex.join(cmd[1:]), flush=True)
  start = time.time()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                        check=False)
  if proc.returncode:
    raise RuntimeError(f'{shlex.join(cmd)} exited {proc.returncode}:\n'
                       f'{(proc.stdout + proc.stderr)[-3000:]}')
  return time.time() - start


def evaluate_on(workdir: str, domains: Optional[list] = None) -> dict:
  """`evaluate_here` in a fresh process (this one may have imported older
  code than the runs it evaluates: a long sweep outlives edits)."""
  cmd = [sys.executable, '-m', 'experiments.finetune_baselines',
         '--evaluate', workdir]
  if domains is not None:
    cmd += ['--domains', ','.join(map(str, domains))]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                        check=False)
  if proc.returncode:
    raise RuntimeError(f'{shlex.join(cmd)} exited {proc.returncode}:\n'
                       f'{(proc.stdout + proc.stderr)[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def evaluate_here(workdir: str, domains: Optional[list] = None) -> dict:
  """The eval record of `workdir`'s newest checkpoint on its config's eval
  batches, restricted to `domains` if given (the synthetic mixture)."""
  config = workdir_config.load_stored_config(workdir)
  if domains is not None:
    config = config_lib.apply_overrides(config, {'data.domains': domains})
  config_lib.validate_config(config)
  model = config_lib.build_model(config)
  _, eval_data = config_lib.build_data(config)
  step, variables = init_source.restore_init_variables(
      workdir, init_source.saved_abstract(workdir))
  eval_step = step_lib.make_eval_step(model, pad_id=config.data.pad_id)
  return loop.evaluate(eval_step, variables['params'], eval_data, step,
                       variables['model_state'] or None)


def trainable(workdir: str) -> tuple[int, int, float]:
  """`trainable_here` in a fresh process (see `evaluate_on`)."""
  cmd = [sys.executable, '-m', 'experiments.finetune_baselines',
         '--trainable', workdir]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                        check=False)
  if proc.returncode:
    raise RuntimeError(f'{shlex.join(cmd)} exited {proc.returncode}:\n'
                       f'{(proc.stdout + proc.stderr)[-3000:]}')
  return tuple(json.loads(proc.stdout.strip().splitlines()[-1]))


def trainable_here(workdir: str) -> tuple[int, int, float]:
  """(params that train, all params, optimizer-state MiB) of a run."""
  config = workdir_config.load_stored_config(workdir)
  rows = finetune_setup.load_expert_rows(workdir)
  model = config_lib.build_model(config)
  optimizer, _ = config_lib.build_optimizer(config, rows)
  abstract = state_lib.abstract_train_state(
      model, optimizer, (config.train.batch_size, config.data.seq_len))
  plan = finetune_setup.plan(config, rows)
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  return (finetune.trainable_count(abstract.params, plan), total,
          state_lib.tree_bytes(abstract.opt_state) / 2**20)


def run_upcycle(root: str, size: str) -> tuple[list, list]:
  """The upcycle part's runs; returns (header lines, rows)."""
  steps = config_lib.load_config(f'configs/dense.py:{size}').train.steps
  extra = steps // 2
  short = [f'--config.train.steps={extra}',
           f'--config.train.warmup_steps={extra // 10}']
  dense = os.path.join(root, 'dense')
  walls = {'dense': _train(dense, f'configs/dense.py:{size}')}
  up, init = f'configs/upcycle.py:{size}', ['--init_from', dense]
  scratch = ['--config.init.upcycle=False']
  runs = {
      'dense continued': (f'configs/dense.py:{size}', init + short),
      'upcycled (router fresh)': (up, init + short),
      'upcycled (router zero)': (up, init + short + [
          "--config.init.upcycle_router='zero'"]),
      'drop-upcycled (ratio 0.5)': (up, init + short + [
          '--config.init.drop_upcycle_ratio=0.5']),
      'MoE from scratch, extra steps': (up, scratch + short),
      f'MoE from scratch, {steps + extra} steps': (up, scratch + [
          f'--config.train.steps={steps + extra}']),
  }
  base = evaluate_on(dense)['eval/loss']
  rows = [('dense (the source)', steps, base, walls['dense'])]
  for i, (name, (config, args)) in enumerate(runs.items()):
    workdir = os.path.join(root, f'run_{i}')
    wall = _train(workdir, config, *args)
    record = evaluate_on(workdir)
    rows.append((name, int(record['step']), record['eval/loss'], wall))
  header = ['| start | steps of this run | eval loss | vs the source '
            '| wall |', '|---|---|---|---|---|']
  lines = [f'| {name} | {n} | {loss:.4f} | {loss - base:+.4f} | '
           f'{wall:.0f} s |' for name, n, loss, wall in rows]
  return header + lines, [dict(zip(('start', 'steps', 'eval_loss',
                                    'wall_s'), r)) for r in rows]


def run_finetune(root: str, size: str) -> tuple[list, list]:
  """The finetune part's runs; returns (table lines, rows)."""
  old, new = finetune_configs.OLD_DOMAINS, finetune_configs.NEW_DOMAINS
  pre = os.path.join(root, 'pretrain')
  _train(pre, f'configs/finetune.py:{size},pretrain')
  rows = [('pretrained, not tuned', evaluate_on(pre, new)['eval/loss'],
           evaluate_on(pre, old)['eval/loss'], 0, *trainable(pre)[1:], 0.0)]
  for method in ('full', 'frozen_router', 'lora', 'esft'):
    workdir = os.path.join(root, method)
    wall = _train(workdir, f'configs/finetune.py:{size},{method}',
                  '--init_from', pre)
    trains, total, opt_mib = trainable(workdir)
    rows.append((method, evaluate_on(workdir, new)['eval/loss'],
                 evaluate_on(workdir, old)['eval/loss'], trains, total,
                 opt_mib, wall))
  lines = ['| method | loss, new domains 6-7 | loss, old domains 0-5 | '
           'params trained | optimizer state | wall |',
           '|---|---|---|---|---|---|']
  for name, new_loss, old_loss, trains, total, opt_mib, wall in rows:
    share = f'{trains:,} ({100 * trains / total:.1f}%)' if trains else '-'
    lines.append(f'| {name} | {new_loss:.4f} | {old_loss:.4f} | {share} | '
                 f'{opt_mib:.3f} MiB | {wall:.0f} s |')
  return lines, [dict(zip(('method', 'new_loss', 'old_loss', 'trained',
                           'params', 'optimizer_mib', 'wall_s'), r))
                 for r in rows]


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs one part and writes results/<part>_<size>.md and .json."""
  parser = cli.Parser(prog='python -m experiments.finetune_baselines',
                      description=__doc__, epilog=EPILOG)
  parser.add_argument('--part', choices=PARTS,
                      help='which baselines to run (required)')
  parser.add_argument('--evaluate', metavar='WORKDIR', help=argparse.SUPPRESS)
  parser.add_argument('--trainable', metavar='WORKDIR',
                      help=argparse.SUPPRESS)
  parser.add_argument('--domains', default=None, help=argparse.SUPPRESS,
                      type=cli.comma_list(
                          cli.number(int, 'an int >= 0', lambda v: v >= 0),
                          'ints >= 0'))
  parser.add_argument('--size', choices=SIZES, default='small',
                      help='config variant of every run (default '
                           '%(default)s)')
  parser.add_argument('--workdir', default='runs/baselines',
                      help='the runs go to <workdir>/<part>_<size>/ '
                           '(default %(default)s)')
  parser.add_argument('--results', default=os.path.join(REPO, 'results'),
                      metavar='DIR',
                      help='<part>_<size>.md and .json are written here '
                           '(default: results/ of the repository)')
  args = parser.parse_args(argv)
  if args.evaluate:  # internal: one JSON line (see evaluate_on)
    domains = None if args.domains is None else list(args.domains)
    record = evaluate_here(args.evaluate, domains)
    print(json.dumps({k: v for k, v in record.items()
                      if isinstance(v, (int, float))}))
    return 0
  if args.trainable:
    print(json.dumps(list(trainable_here(args.trainable))))
    return 0
  if args.part is None:
    parser.error(f'argument --part is required; allowed values: '
                 f'{", ".join(PARTS)}')
  root = os.path.abspath(os.path.join(args.workdir,
                                      f'{args.part}_{args.size}'))
  start = time.time()
  run = run_upcycle if args.part == 'upcycle' else run_finetune
  lines, rows = run(root, args.size)
  command = ('python -m experiments.finetune_baselines ' +
             shlex.join(argv if argv is not None else sys.argv[1:]))
  text = '\n'.join([
      f'Command: `{command}`  ',
      f'Machine: {provenance.machine()}, commit {provenance.commit()}; '
      f'{time.time() - start:.0f} s in all', '', *lines, ''])
  os.makedirs(args.results, exist_ok=True)
  name = os.path.join(args.results, f'{args.part}_{args.size}')
  with open(name + '.md', 'w', encoding='utf-8') as f:
    f.write(text)
  with open(name + '.json', 'w', encoding='utf-8') as f:
    json.dump(rows, f, indent=1)
  print(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
