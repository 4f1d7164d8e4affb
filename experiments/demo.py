"""Routes one random batch through an MoeLayer and prints what happened.

    python -m experiments.demo [--num_experts 8] [--top_k 2] \\
        [--capacity_factor 1.0] [--priority choice]

Prints the effective capacity, the per-expert load, the drop fractions and
both dispatchers' agreement. A smoke test of an installation, not training.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
import moejax

EPILOG = """\
exit codes:
  0  done
  2  a bad flag: one line `error: ...` on stderr naming the flag and the
     allowed values (e.g. --top_k larger than --num_experts)"""
AUX_METRICS = ('aux_loss', 'z_loss', 'max_violation', 'drop_fraction',
               'fully_dropped_fraction', 'router_entropy', 'top1_prob')


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  """The flags (argv without the program name; None: sys.argv[1:]).

  A bad value exits with code 2 and one `error:` line (cli.Parser).
  """
  parser = cli.Parser(prog='python -m experiments.demo', description=__doc__,
                      epilog=EPILOG)
  parser.add_argument('--num_experts', metavar='E', default=8,
                      type=cli.number(int, 'an int >= 1', lambda v: v >= 1),
                      help='E, number of experts (default %(default)s)')
  parser.add_argument('--top_k', metavar='K', default=2,
                      type=cli.number(int, 'an int >= 1', lambda v: v >= 1),
                      help='K, experts chosen per token, 1 <= K <= E '
                           '(default %(default)s)')
  parser.add_argument('--capacity_factor', metavar='CF', default=1.0,
                      type=cli.number(float, 'a number > 0',
                                      lambda v: v > 0),
                      help='training capacity factor (default %(default)s)')
  parser.add_argument('--priority', default='choice',
                      choices=moejax.PRIORITIES,
                      help='overflow priority (default %(default)s)')
  args = parser.parse_args(argv)
  if args.top_k > args.num_experts:
    parser.error(f'argument --top_k: {args.top_k} is not allowed with '
                 f'--num_experts {args.num_experts}; allowed values: an int '
                 f'in [1, {args.num_experts}]')
  return args


def run(num_experts: int, top_k: int, capacity_factor: float,
        priority: str) -> None:
  """Applies a fresh MoeLayer to x [B=4, L=64, D=32] and prints its aux."""
  b, l, d = 4, 64, 32
  layer = moejax.MoeLayer(num_experts=num_experts, d_ff=64, top_k=top_k,
                          capacity_factor=capacity_factor, priority=priority)
  x = jax.random.normal(jax.random.key(0), (b, l, d))
  variables = jax.jit(layer.init)(jax.random.key(1), x)  # eager: ~5x slower
  y, aux = jax.jit(layer.apply, static_argnames='deterministic')(
      variables, x, deterministic=False)
  y_ref, _ = layer.clone(dispatcher='einsum').apply(variables, x,
                                                    deterministic=False)
  print(f'MoeLayer E={num_experts} K={top_k} cf={capacity_factor} '
        f'priority={priority}: x {x.shape} -> y {y.shape}')
  print(f'  capacity C = {int(aux["capacity"])} slots per expert per group '
        f'(S = {l})')
  print('  expert load:', np.round(np.asarray(aux['expert_load']), 3))
  for name in AUX_METRICS:
    print(f'  {name:24s} {float(aux[name]):.4f}')
  print(f'  gather vs einsum max |diff| = '
        f'{float(jnp.abs(y - y_ref).max()):.2e}')


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the demo; returns 0 (a bad flag exits with code 2 first)."""
  args = parse_args(argv)
  run(args.num_experts, args.top_k, args.capacity_factor, args.priority)
  return 0


if __name__ == '__main__':
  sys.exit(main())
