"""Prints the configs a sweep command would train, with the routing-group
layout normalised, to check that two commands train the same runs.

    PYTHONPATH=. python tools/sweep_configs.py \
        --config configs/switch.py:small --sweep capacity --seeds 2 \
        --workdir W --baseline_root B [--config.k=v ...] > a.json

takes the arguments of `python -m experiments.sweep` (nothing is trained
or written; PYTHONPATH picks the checkout whose code resolves them). Each
run's resolved config is printed as JSON, in run order, without its work
dir; model.moe's group_size / group_sequences /
group_order become `groups`: the sequences per routing group of the
trainer's batch (1 = one group per sequence, where the order does not
matter) and the order, or the group's token count when it is not whole
sequences. Two commands (or one command on two checkouts, e.g. before and
after a default changed) train the same runs iff their outputs are equal.
"""

import json
import sys

from experiments.sweep import cli
from experiments.sweep import points as points_lib


def groups(config) -> list:
  """[k sequences per group, order] (or [S tokens, order]) of the config."""
  moe, b, l = config['model']['moe'], config['train']['batch_size'], (
      config['data']['seq_len'])
  k, s = moe.pop('group_sequences', None), moe.pop('group_size', None)
  order = moe.pop('group_order')
  if k == -1:
    k = b
  if k is None:
    k = 1 if s is None else (s // l if s % l == 0 else f'{s} tokens')
  return [k, 'any' if k == 1 else order]


def main(argv) -> int:
  args, overrides = cli.parse_args(argv)
  points = points_lib.select_sweep(points_lib.abs_spec(args.config),
                                   args.sweep)
  out = []
  for run in points_lib.make_runs(args, points, overrides):
    config = points_lib._checked_config(  # pylint: disable=protected-access
        run.config, run.overrides).to_dict()
    if config['model']['moe'].get('num_experts'):
      config['model']['moe']['groups'] = groups(config)
    out.append(config)
  json.dump(out, sys.stdout, indent=1, sort_keys=True)
  print()
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
