"""Speed of the MoE layer and of MoE Transformer training steps.

    python -m experiments.benchmark [--quick] [--json FILE] [--dtype bfloat16]
    python -m experiments.benchmark --dry_run   # memory estimates only

Axis letters: T tokens, D model width, F expert hidden width, E experts,
K experts per token, S tokens per group, C capacity, B batch, L sequence.

Three measurements, all in one process on `jax.devices()[0]`:
  matmul  a square [N, N] x [N, N] matmul in the benchmark dtype; its FLOP/s
          is the machine's attainable peak that every row is compared with.
  layer   jitted forward+backward of an MoeLayer for every dispatcher x E x
          K, and of the dense FFN with the same activated FLOPs per token
          (experiments/bench_layer.py).
  model   tokens/s of jitted training steps of dense / switch (top-1) /
          gshard (top-2) TransformerLMs (experiments/bench_model.py).
Decoding has its own program: experiments/benchmark_decode.py.

Timing (experiments/bench_common.py): compile first (not timed), one warm-up
call, then the median of `--repeats` calls, each blocked with
`jax.block_until_ready`; rows compared with each other are timed
round-robin.

Memory (experiments/bench_memory.py): every row's peak memory is estimated
from its shapes before anything of it is compiled, and a row over the
budget (--memory_budget_gb, else half the host's free RAM on CPU, 90% of the
device's free memory on GPU/TPU) is skipped with the reason in its status
and a `skipped ...` line on stderr; a row that fits is held once more
against XLA's own count (memory_analysis) after compiling, before it runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Callable, Optional, Sequence

import jax

from experiments import bench_memory
from experiments import cli
from experiments.bench_common import (DTYPES, MODEL_KINDS, PRESETS, QUICK,
                                      Settings, clear_compiled,
                                      default_preset_scale, machine_info,
                                      matmul_row, preset_fields)
from experiments.bench_layer import (component_fns, dense_entry, group_size,
                                     init_params, layer_group, layer_rows,
                                     row_names)
from experiments.bench_model import model_rows, model_sizes

__all__ = ('Settings', 'QUICK', 'run', 'markdown', 'parse_args', 'main',
           'component_fns', 'dense_entry', 'init_params', 'layer_group')


# ------------------------------------------------------------------ output
def _fmt(value, spec: str = '.3g') -> str:
  if value is None:
    return '-'
  return format(value, spec) if isinstance(value, float) else str(value)


_TABLES = {  # kind -> (title, [(header, key, format)])
    'matmul': ('Matmul peak', [
        ('N', 'size', ''), ('dtype', 'dtype', ''),
        ('seconds', 'seconds', '.4g'), ('GFLOP/s', 'gflops_per_s', '.4g'),
        ('est. MiB', 'estimate_mib', '.0f'), ('status', 'status', '')]),
    'layer': ('MoeLayer / dense FFN fwd+bwd', [
        ('dispatcher', 'dispatcher', ''), ('E', 'num_experts', ''),
        ('K', 'top_k', ''), ('T', 'tokens', ''), ('S', 'group_size', ''),
        ('C', 'capacity', ''), ('seconds', 'seconds', '.4g'),
        ('dense s (paired)', 'dense_seconds', '.4g'),
        ('ratio_to_dense', 'ratio_to_dense', '.3f'),
        ('speedup_vs_einsum', 'speedup_vs_einsum', '.2f'),
        ('% matmul peak', 'pct_of_matmul_peak', '.1f'),
        ('MFU % (vendor peak)', 'pct_of_vendor_peak', '.1f'),
        ('est. MiB', 'estimate_mib', '.0f'),
        ('XLA MiB', 'compiled_mib', '.0f'), ('temp MiB', 'temp_mib', '.1f'),
        ('device peak MiB so far', 'device_peak_mib', '.0f'),
        ('status', 'status', '')]),
    'profile': ('Components, fwd+bwd each (--profile)', [
        ('dispatcher', 'dispatcher', ''), ('E', 'num_experts', ''),
        ('K', 'top_k', ''), ('component', 'component', ''),
        ('seconds', 'seconds', '.4g'), ('% of layer', 'pct_of_layer', '.1f'),
        ('ratio_to_dense', 'ratio_to_dense', '.3f')]),
    'model': ('TransformerLM training step', [
        ('size', 'size', ''), ('model', 'model', ''), ('E', 'num_experts', ''),
        ('K', 'top_k', ''), ('B x L', 'shape', ''),
        ('s/step', 'seconds', '.4g'), ('tokens/s', 'tokens_per_s', '.4g'),
        ('ratio_to_dense', 'ratio_to_dense', '.3f'),
        ('MFU %', 'mfu_pct', '.1f'), ('est. MiB', 'estimate_mib', '.0f'),
        ('XLA MiB', 'compiled_mib', '.0f'), ('status', 'status', '')]),
}


def _cell(row: dict, key: str, spec: str) -> str:
  if key == 'gflops_per_s':
    return _fmt(row['flops_per_s'] and row['flops_per_s'] / 1e9, spec)
  if key == 'shape':
    return f'{row["batch_size"]} x {row["seq_len"]}'
  return _fmt(row.get(key), spec)


def markdown(machine: dict, rows: list) -> str:
  """The machine line, then one table per row kind, one line per row."""
  lines = ['machine: ' + ', '.join(f'{k}={v}' for k, v in machine.items())]
  for kinds, (title, columns) in ((('matmul',), _TABLES['matmul']),
                                  (('dense', 'layer'), _TABLES['layer']),
                                  (('profile',), _TABLES['profile']),
                                  (('model',), _TABLES['model'])):
    selected = [r for r in rows if r['kind'] in kinds]
    if not selected:
      continue
    lines += ['', f'### {title}', '',
              '| ' + ' | '.join(c[0] for c in columns) + ' |',
              '|' + '---|' * len(columns)]
    for row in selected:
      cells = (_cell(row, key, spec) for _, key, spec in columns)
      lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _log(row: dict) -> None:
  """One progress line on stderr per row: `done ...: seconds=...`,
  `planned ...` (--dry_run), or `skipped ...: estimated X > budget Y
  (why)`."""
  what = {k: row.get(k) for k in ('kind', 'dispatcher', 'model', 'size',
                                  'num_experts', 'top_k') if k in row}
  status = row.get('status', '')
  word, _, reason = status.partition(': ')
  if word in ('skipped', 'error'):
    print(f'{word} {what}: {reason}', file=sys.stderr, flush=True)
  else:
    done = 'planned' if status.startswith('fits') else 'done'
    print(f'{done} {what}: seconds={_fmt(row.get("seconds"))} '
          f'estimate={_fmt(row.get("estimate_mib"), ".0f")} MiB {status}',
          file=sys.stderr, flush=True)


def check_settings(s: Settings) -> None:
  """Raises ValueError on a bad setting, before anything is measured.

  The message names the setting as its flag (`--top_k`) and the allowed
  values. (An unknown dispatcher is not an error here: its rows are
  'skipped'; the command line refuses it.)
  """
  for name, values, allowed in (
      ('model_sizes', s.model_sizes, tuple(model_sizes())),
      ('model_kinds', s.model_kinds, MODEL_KINDS),
      ('dtype', (s.dtype,), tuple(DTYPES))):
    for value in values:
      if value not in allowed:
        raise ValueError(f'--{name} {value!r} is not allowed; allowed '
                         f'values: {", ".join(allowed)}')
  if s.preset and s.preset not in PRESETS:
    raise ValueError(f'--preset {s.preset!r} is not allowed; allowed '
                     f'values: {", ".join(PRESETS)}')
  for name in ('shared_experts', 'preset_scale'):
    if getattr(s, name) < 0:
      raise ValueError(f'--{name} {getattr(s, name)} is not allowed; '
                       'allowed values: an int >= 0')
  for name in ('tokens', 'd_model', 'd_ff', 'group_size', 'repeats',
               'model_steps'):
    if getattr(s, name) < 1:
      raise ValueError(f'--{name} {getattr(s, name)} is not allowed; '
                       'allowed values: an int >= 1')
  for k in s.top_k:
    for e in s.num_experts:
      if not 1 <= k <= e:
        raise ValueError(f'--top_k {k} is not allowed with --num_experts '
                         f'{e}; allowed values: 1 <= K <= every E')
  group_size(s)


def run(settings: Settings, log: Callable = _log) -> dict:
  """Measures everything `settings` asks for.

  Every row is held against the memory budget before it is compiled
  (module docstring); with settings.dry_run nothing is compiled or run.

  Returns:
    {'machine': machine_info() plus the matmul FLOP/s (None when its row
     did not run), the memory budget and the settings,
     'rows': [matmul row, dense and layer rows, model rows]}.
  """
  check_settings(settings)
  machine = machine_info()
  budget, source = bench_memory.memory_budget(settings.memory_budget_gb,
                                              jax.devices()[0])
  machine.update(memory_budget_mib=bench_memory.mib(budget),
                 memory_budget_source=source)
  rows = [matmul_row(settings, budget)]
  log(rows[0])
  peak = rows[0]['flops_per_s']
  machine['matmul_flops_per_s'] = peak
  if not settings.skip_layer:
    rows += layer_rows(settings, peak, budget, log)
  if not settings.skip_model:
    rows += model_rows(settings, peak, budget, log)
  clear_compiled()
  machine['settings'] = dataclasses.asdict(settings)
  return {'machine': machine, 'rows': rows}


# --------------------------------------------------------------------- CLI
EPILOG = """\
--dispatchers, --num_experts, --top_k, --model_sizes and --model_kinds take
comma lists (--num_experts 8,64). --quick sets QUICK's value (a tiny grid)
of every flag not given on the command line.

Memory: a row whose estimated peak memory is over the budget is skipped
before it is compiled (status 'skipped: estimated X > budget Y (why)');
--dry_run prints every row's estimate and status and runs nothing.

exit codes:
  0  done; a row that failed (e.g. out of memory) is a row with status
     'error: ...', a row over the memory budget one with status
     'skipped: ...', and the run goes on
  2  a bad flag: one line `error: ...` on stderr naming the flag and the
     allowed values, before anything is measured"""


def _default_text(name: str) -> str:
  """'default 8,64,256; --quick: 4,8' for the help of --<name>."""

  def text(value):
    return ','.join(map(str, value)) if isinstance(value, tuple) else value

  out = f'default {text(getattr(Settings, name))}'
  return out + (f'; --quick: {text(QUICK[name])}' if name in QUICK else '')


def _settings_flags() -> tuple:
  """(flag, argparse type, metavar, help) of every non-boolean Settings
  field: the flags are the fields, and Settings holds their defaults."""
  positive = cli.number(int, 'an int >= 1', lambda v: v >= 1)
  ints = cli.comma_list(positive, 'ints >= 1')
  sizes, kinds = tuple(model_sizes()), MODEL_KINDS
  return (
      ('dispatchers', cli.comma_list(cli.choice(row_names()),
                                     ', '.join(row_names())),
       'NAME[,NAME...]', "dispatchers to time ('ragged' and 'blocked' run "
       "dropless; 'gather:dropless' is gather with C = S)"),
      ('num_experts', ints, 'E[,E...]', 'E values'),
      ('top_k', ints, 'K[,K...]', 'K values, each <= every E'),
      ('tokens', positive, 'T', 'T, tokens per layer call'),
      ('d_model', positive, 'D', 'D, model width'),
      ('d_ff', positive, 'F', 'F, hidden width of one expert'),
      ('group_size', positive, 'S', 'S, tokens per routing group, capped '
       'at --tokens, which it must divide'),
      ('capacity_factor', cli.number(float, 'a number > 0', lambda v: v > 0),
       'CF', "training capacity factor ('ragged', 'blocked' and "
       "'...:dropless' rows are dropless)"),
      ('repeats', positive, 'N', 'timed calls per row'),
      ('dtype', cli.choice(tuple(DTYPES)), '{' + ','.join(DTYPES) + '}',
       'compute dtype (params stay float32)'),
      ('matmul_size', cli.number(int, 'an int >= 0', lambda v: v >= 0), 'N',
       'N of the peak matmul; 0: 2048 on CPU, 8192 on accelerators'),
      ('model_sizes', cli.comma_list(cli.choice(sizes), ', '.join(sizes)),
       'SIZE[,SIZE...]', 'model sizes (configs/base.py)'),
      ('model_kinds', cli.comma_list(cli.choice(kinds), ', '.join(kinds)),
       'KIND[,KIND...]', 'models to train'),
      ('model_steps', positive, 'N', 'train steps per timed call'),
      ('shared_experts', cli.number(int, 'an int >= 0', lambda v: v >= 0),
       'N', 'shared experts (each of width F) in every layer row; the '
       'dense FFN is then (K + N) * F wide'),
      ('preset', cli.choice(tuple(PRESETS)), '{' + ','.join(PRESETS) + '}',
       "a published model's layer shape: sets --d_model, --d_ff, "
       '--num_experts, --top_k and --shared_experts (the flags given '
       'still win): mixtral D=4096 F=14336 E=8 K=2; deepseek D=2048 '
       'F=1408 E=64 K=6 + 2 shared; switch D=768 F=3072 E=128 K=1'),
      ('preset_scale', cli.number(int, 'an int >= 0', lambda v: v >= 0),
       'N', "divide the preset's D and F by N; 0: 8 on CPU, 1 on GPU/TPU"),
      ('memory_budget_gb', cli.number(float, 'a number >= 0',
                                      lambda v: v >= 0), 'GB',
       'skip rows estimated to need more (GiB); 0: half the free host RAM '
       "on CPU, 90%% of the device's free memory on GPU/TPU"),
  )


def build_parser() -> cli.Parser:
  """The benchmark's flags: one per Settings field, --quick and --json.

  Each Settings flag defaults to None (not given), so that parse_args can
  tell a flag given on the command line from a default.
  """
  parser = cli.Parser(prog='python -m experiments.benchmark',
                      description=__doc__, epilog=EPILOG)
  for name, kind, metavar, text in _settings_flags():
    parser.add_argument(f'--{name}', type=kind, metavar=metavar,
                        help=f'{text}; {_default_text(name)}')
  for name, text in (
      ('profile', 'also time the router, dispatch, experts and combine of '
                  'every layer row on their own (fwd+bwd each): `profile` '
                  'rows'),
      ('skip_layer', 'no layer rows'), ('skip_model', 'no model rows'),
      ('dry_run', 'estimate every row\'s memory and print the plan; '
                  'nothing is compiled or run')):
    parser.add_argument(f'--{name}', action='store_true', default=None,
                        help=text)
  parser.add_argument('--quick', action='store_true',
                      help='tiny grid for a smoke test (QUICK); flags given '
                           'explicitly still apply')
  parser.add_argument('--json', metavar='FILE',
                      help='write {"machine", "rows"} here')
  return parser


def parse_args(argv: Optional[Sequence[str]]) -> tuple:
  """(Settings, --json path or None) from argv (None: sys.argv[1:]).

  A flag not given keeps the Settings default, or with --quick QUICK's. A
  bad value, or settings that check_settings refuses, exit with code 2 and
  one `error:` line (cli.Parser).
  """
  parser = build_parser()
  args = parser.parse_args(argv)
  settings = Settings(**(QUICK if args.quick else {}))
  if args.preset:  # under the flags given, over --quick
    scale = args.preset_scale or default_preset_scale()
    for key, value in preset_fields(args.preset, scale).items():
      setattr(settings, key, value)
  for field in dataclasses.fields(Settings):
    if getattr(args, field.name) is not None:  # given on the command line
      setattr(settings, field.name, getattr(args, field.name))
  try:
    check_settings(settings)
  except ValueError as e:
    quick = ' (--quick sets the flags not given)' if args.quick else ''
    parser.error(f'{e}{quick}')
  if args.json and not os.path.isdir(os.path.dirname(
      os.path.abspath(args.json))):
    parser.error(f'argument --json: the directory of {args.json!r} does not '
                 'exist')
  return settings, args.json


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the benchmark; returns 0 (a bad flag exits with code 2 first).

  Args:
    argv: arguments without the program name (None: sys.argv[1:]).
  """
  settings, json_path = parse_args(argv)
  report = run(settings)
  machine = {k: v for k, v in report['machine'].items() if k != 'settings'}
  print(markdown(machine, report['rows']))
  if json_path:
    with open(json_path, 'w') as f:
      json.dump(report, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
