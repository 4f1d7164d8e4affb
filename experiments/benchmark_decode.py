"""Decode latency of an MoE LM and of the dense LM of equal active params.

    python -m experiments.benchmark_decode [--batch_sizes 1,64] [--json FILE]
        [--d_model 512 --num_layers 4 --num_experts 8 --top_k 2 ...]

Axis letters: B batch (sequences decoded together), P prompt length, N new
tokens, D model width, F expert width, E experts, K experts per token.

Models (same attention, depth and vocab; random params):
  dense   one FFN of width K*F per block: the active params of the MoE.
  moe     E experts of width F per block, top-K softmax routing, no
          capacity limit (generation's inference model).
The MoE model's decode step is timed with each dispatcher: 'auto' (what
`moejax.generate` uses: 'per_token' when B*K < E, which gathers each
token's K experts' weights, else the layer's dispatcher), and 'gather'
(buffers [1, E, B, D] with one group per step: every expert runs on B
slots whatever it was chosen for) and 'ragged' (grouped matmuls; on CPU a
masked dense op). Each row reports ms per decode step (B tokens) and its
ratio to the dense model's at the same B.

Timing: per row, greedy `generate` of N tokens after a P-token prompt;
the N - 1 per-token steps are timed after a compiled warm-up step (the
prefill is not timed). Rows of one B are timed round-robin, `--repeats`
rounds, median per row, so ratios compare timings taken side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from moejax import generate
from moejax.dispatch import DISPATCHER_NAMES
from moejax.models import TransformerLM, count_params

STEP_DISPATCHERS = ('auto',) + DISPATCHER_NAMES
# The flags that describe the models and the timing (written to --json).
MODEL_FLAGS = ('d_model', 'num_layers', 'num_heads', 'd_ff', 'num_experts',
               'top_k', 'vocab_size', 'prompt_len', 'new_tokens', 'repeats')
EPILOG = """\
--batch_sizes and --dispatchers take comma lists (--batch_sizes 1,64).

exit codes:
  0  done
  2  a bad flag: one line `error: ...` on stderr naming the flag and the
     allowed values (also sizes no model accepts, e.g. --top_k larger than
     --num_experts), before anything is timed"""


def build_parser() -> cli.Parser:
  """The flags (names and defaults of the former absl flags)."""
  positive = cli.number(int, 'an int >= 1', lambda v: v >= 1)
  parser = cli.Parser(prog='python -m experiments.benchmark_decode',
                      description=__doc__, epilog=EPILOG,
                      allow_abbrev=False)  # as absl: no prefixes
  parser.add_argument('--batch_sizes', metavar='B[,B...]', default=(1, 64),
                      type=cli.comma_list(positive, 'ints >= 1'),
                      help='B values (default 1,64)')
  for name, default, metavar, text in (
      ('d_model', 512, 'D', 'D, model width'),
      ('num_layers', 4, 'N', 'blocks'),
      ('num_heads', 8, 'H', 'attention heads'),
      ('d_ff', 1024, 'F', "F, one expert's width (the dense FFN: K*F)"),
      ('num_experts', 8, 'E', 'E, experts per MoE block'),
      ('top_k', 2, 'K', 'K, experts per token, <= E'),
      ('vocab_size', 256, 'V', 'V, vocabulary size'),
      ('prompt_len', 64, 'P', 'P, prompt tokens (the untimed prefill)'),
      ('repeats', 3, 'N', 'round-robin rounds (median per row)')):
    parser.add_argument(f'--{name}', metavar=metavar, default=default,
                        type=positive,
                        help=f'{text} (default %(default)s)')
  parser.add_argument('--new_tokens', metavar='N', default=33,
                      type=cli.number(int, 'an int >= 2', lambda v: v >= 2),
                      help='N, new tokens: N - 1 timed steps '
                           '(default %(default)s)')
  parser.add_argument('--dispatchers', metavar='NAME[,NAME...]',
                      default=('auto', 'gather', 'ragged'),
                      type=cli.comma_list(cli.choice(STEP_DISPATCHERS),
                                          ', '.join(STEP_DISPATCHERS)),
                      help='decode-step dispatchers of the MoE rows '
                           '(default auto,gather,ragged)')
  parser.add_argument('--json', metavar='FILE', default=None,
                      help='write {"machine", "flags", "params", "rows"} '
                           'here')
  return parser


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  """The flags (argv without the program name; None: sys.argv[1:]).

  A bad value, sizes that either model refuses (its ValueError, e.g.
  num_heads must divide d_model), or a --json in a missing directory exit
  with code 2 and one `error:` line (cli.Parser), before anything is timed.
  """
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    for model in models(args).values():
      jax.eval_shape(model.init, jax.random.key(0),
                     jnp.zeros((1, 8), jnp.int32))
  except ValueError as e:  # e.g. 'top_k=9 must be <= num_experts=8.'
    first = (str(e).strip().splitlines() or [''])[0].rstrip('.')
    named = sorted((first.find(k), f'--{k}') for k in MODEL_FLAGS
                   if re.search(rf'\b{k}\b', first))
    parser.error(f'argument {", ".join(f for _, f in named) or "--d_model"}'
                 f': {first}; no model has these sizes')
  if args.json and not os.path.isdir(os.path.dirname(
      os.path.abspath(args.json))):
    parser.error(f'argument --json: the directory of {args.json!r} does not '
                 'exist')
  return args


def models(args: argparse.Namespace) -> dict[str, TransformerLM]:
  """The dense and MoE models of equal active params (module docstring)."""
  common = dict(num_layers=args.num_layers, d_model=args.d_model,
                num_heads=args.num_heads, vocab_size=args.vocab_size,
                activation='swiglu', tie_embeddings=False)
  return {
      'dense': TransformerLM(**common, d_ff=args.top_k * args.d_ff),
      'moe': TransformerLM(**common, d_ff=args.d_ff, moe=dict(
          num_experts=args.num_experts, top_k=args.top_k,
          capacity_factor=None, eval_capacity_factor=None)),
  }


def random_variables(model: TransformerLM, seed: int = 0) -> dict:
  """Params drawn with numpy at the init's shapes (no init to compile)."""
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, 8), jnp.int32))
  rng = np.random.default_rng(seed)
  draw = lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape), s.dtype)
  return jax.tree.map(draw, abstract)


def rows_of_batch(b: int, nets: dict, variables: dict,
                  args: argparse.Namespace) -> list[dict]:
  """Times every row of one B round-robin; returns the rows."""
  plan = [('dense', 'auto')] + [('moe', d) for d in args.dispatchers]
  times = {key: [] for key in plan}
  for _ in range(args.repeats):
    for name, dispatcher in plan:
      stats = generate.decode_latency(
          nets[name], variables[name], b, args.prompt_len, args.new_tokens,
          step_dispatcher=dispatcher)
      times[(name, dispatcher)].append(stats['ms_per_token'])
  dense_ms = statistics.median(times[('dense', 'auto')])
  out = []
  for (name, dispatcher), ms in times.items():
    step = dispatcher
    if name == 'moe' and dispatcher == 'auto':
      step = generate.step_model(generate.inference_model(nets['moe']),
                                 b).moe.get('dispatcher', 'gather')
    median = statistics.median(ms)
    out.append(dict(model=name, batch=b, step_dispatcher=step,
                    requested=dispatcher, ms_per_step=median,
                    tokens_per_s=1e3 * b / median,
                    ratio_to_dense=median / dense_ms))
  return out


def print_table(rows: Sequence[dict], params: dict) -> None:
  print(f'params: dense total {params["dense"]["total"]:,}, active '
        f'{params["dense"]["active"]:,}; moe total '
        f'{params["moe"]["total"]:,}, active {params["moe"]["active"]:,}')
  print('| model | B | decode-step dispatcher | ms / step | tokens/s | '
        'vs dense |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    step = r['step_dispatcher']
    if r['requested'] == 'auto' and r['model'] == 'moe':
      step = f'auto ({step})'
    print(f'| {r["model"]} | {r["batch"]} | {step} | '
          f'{r["ms_per_step"]:.2f} | {r["tokens_per_s"]:.0f} | '
          f'{r["ratio_to_dense"]:.2f} |')


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Times the rows and prints the table; returns 0 (a bad flag exits with
  code 2 first).

  Args:
    argv: arguments without the program name (None: sys.argv[1:]).
  """
  args = parse_args(argv)
  nets = models(args)
  variables = {name: random_variables(m) for name, m in nets.items()}
  params = {name: count_params(m) for name, m in nets.items()}
  rows = []
  for b in args.batch_sizes:
    rows += rows_of_batch(b, nets, variables, args)
  print_table(rows, params)
  if args.json:
    machine = dict(platform=platform.platform(), device=str(jax.devices()[0]),
                   jax=jax.__version__, python=sys.version.split()[0])
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump({'machine': machine,
                 'flags': {k: getattr(args, k) for k in MODEL_FLAGS},
                 'params': params, 'rows': rows}, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
