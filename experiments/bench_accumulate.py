"""What gradient accumulation costs: train-step time of M micro-batches.

    python -m experiments.bench_accumulate [--config configs/switch.py:small]
        [--micro 1,2,4] [--scopes group,batch] [--steps 5] [--repeats 3]
        [--json FILE]

For each balance-loss scope and M in --micro, the trainer's own jitted
train step (`moejax.train.make_train_step`, train.grad_accum_steps = M) on
the config's model and batch, params drawn as at init. Every variant is
compiled and run once first; then --repeats rounds run --steps steps of
each variant in turn (round-robin, so a slow spell of a shared machine
hits them all), blocking on every step. Printed and written: the median
seconds per step and its ratio to M = 1 of the same scope, measured in the
same run. Under the 'batch' scope M > 1 adds the counting pass (one
forward pass over the batch); under 'group' only the smaller matmuls and
the loop cost anything. A config's group of the whole batch (`group_sequences=-1`,
the Switch configs' default) becomes one group per sequence: a
micro-batch cannot hold it (`bench_common.per_sequence_groups`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Optional, Sequence

import jax

from experiments import bench_common
from experiments import cli
from experiments import config_lib
from experiments import model_config
from experiments import train as train_cli
from moejax.train import create_train_state
from moejax.train import make_train_step


EPILOG = """exit codes: 0 ok, 2 bad flag or config (one line on stderr, e.g.
  error: argument --micro: '0' is not allowed; allowed values: a
  comma-separated list of ints >= 1 (see --help))."""


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  """The flags (see the module doc); a bad one exits 2 with one line."""
  parser = cli.Parser(prog='python -m experiments.bench_accumulate',
                      description=__doc__, epilog=EPILOG)
  positive = cli.number(int, 'an int >= 1', lambda v: v >= 1)
  parser.add_argument('--config', default='configs/switch.py:small',
                      metavar='FILE[:VARIANT]', help='the run config')
  parser.add_argument('--micro', type=cli.comma_list(positive, 'ints >= 1'),
                      default=(1, 2, 4), metavar='M[,M...]',
                      help='train.grad_accum_steps values')
  parser.add_argument('--scopes', type=cli.comma_list(
      cli.choice(('group', 'batch')), "'group', 'batch'"),
                      default=('group', 'batch'), metavar='SCOPE[,...]',
                      help='model.moe.aux_loss_scope values')
  bench_common.add_step_timing_flags(parser, positive, steps=5)
  args = parser.parse_args(argv)
  bench_common.check_json_flag(parser, args)
  return args


def _config(base, scope: str, micro: int):
  """The variant's run config; ValueError for one the trainer would refuse
  (M not dividing the batch, ...), naming the key."""
  config = base.copy_and_resolve_references()
  bench_common.per_sequence_groups(config)
  config.model.moe.aux_loss_scope = scope
  config.train.grad_accum_steps = micro
  config_lib.validate_config(config)
  return config


def _variant(config):
  """(step fn, state, tokens) of one variant's config."""
  model = config_lib.build_model(config)
  optimizer, _ = config_lib.build_optimizer(config)
  b, l = config.train.batch_size, config.data.seq_len
  state = create_train_state(model, optimizer, (b, l), seed=0)
  moe = config.model.moe
  step = make_train_step(model, optimizer, seed=0,
                         aux_loss_weight=moe.aux_loss_weight,
                         z_loss_weight=moe.z_loss_weight,
                         grad_accum_steps=config.train.grad_accum_steps)
  tokens = jax.random.randint(jax.random.key(1), (b, l + 1), 0,
                              model_config.model_vocab_size(config))
  return step, state, tokens


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  try:
    base = train_cli.load_and_validate(args.config, {})
    configs = {(s, m): _config(base, s, m) for s in args.scopes
               for m in args.micro}
  except ValueError as e:  # before anything compiles
    print(f'error: {e}', file=sys.stderr)
    return cli.EXIT_USER_ERROR
  variants = {key: _variant(config) for key, config in configs.items()}
  times, _ = bench_common.time_train_steps(variants, args.steps, args.repeats)
  rows = []
  for (scope, micro), per_step in times.items():
    seconds = statistics.median(per_step)
    ref = times.get((scope, 1))
    rows.append({'scope': scope, 'grad_accum_steps': micro,
                 'seconds_per_step': seconds,
                 'ratio_to_m1': (seconds / statistics.median(ref)
                                 if ref else None)})
  print(f'{"scope":<6} {"M":>3} {"s/step":>8} {"vs M=1":>7}')
  for r in rows:
    ratio = '' if r['ratio_to_m1'] is None else f'{r["ratio_to_m1"]:.2f}'
    print(f'{r["scope"]:<6} {r["grad_accum_steps"]:>3} '
          f'{r["seconds_per_step"]:>8.3f} {ratio:>7}')
  if args.json:
    bench_common.write_rows_json(args.json, {
        'config': args.config, 'steps': args.steps,
        'repeats': args.repeats}, rows)
  return 0


if __name__ == '__main__':
  sys.exit(main())
