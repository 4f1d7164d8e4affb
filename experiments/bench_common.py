"""What every part of `python -m experiments.benchmark` shares.

Settings (one field per flag), the machine description, and the timing
harness: compile first (not timed), one warm-up call, then the median of
`--repeats` calls, each blocked with `jax.block_until_ready`, entries timed
round-robin. Before an entry runs, the compiled program's own memory
(`compiled.memory_analysis()`: arguments + outputs + temporaries) is held
against the memory budget (experiments/bench_memory.py): an entry over it
is skipped, not run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from experiments import bench_memory

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
MODEL_KINDS = ('dense', 'switch', 'gshard')


@dataclasses.dataclass
class Settings:
  """Everything a run measures: one field per flag of the same name (see
  `python -m experiments.benchmark --help` for the meaning of each)."""
  dispatchers: Sequence[str] = ('einsum', 'gather', 'ragged')
  num_experts: Sequence[int] = (8, 64, 256)
  top_k: Sequence[int] = (1, 2)
  tokens: int = 8192
  d_model: int = 512
  d_ff: int = 2048
  group_size: int = 4096
  capacity_factor: float = 1.25
  repeats: int = 5
  dtype: str = 'float32'
  matmul_size: int = 0  # 0: 2048 on CPU, 8192 on accelerators
  model_sizes: Sequence[str] = ('tiny', 'small')
  model_kinds: Sequence[str] = MODEL_KINDS
  model_steps: int = 5
  memory_budget_gb: float = 0.0  # 0: a fraction of the device's free memory
  profile: bool = False
  skip_layer: bool = False
  skip_model: bool = False
  dry_run: bool = False
  shared_experts: int = 0  # n shared FFNs of width F on every token
  preset: str = ''  # a PRESETS name: its D, F, E, K, shared experts
  preset_scale: int = 0  # D and F divided by it; 0: 8 on CPU, 1 elsewhere


# Realistic MoE layer shapes (issue 18): D, F (one expert), E, K and the
# shared experts (each of width F) of published models' layers.
PRESETS = {
    'mixtral': dict(d_model=4096, d_ff=14336, num_experts=(8,), top_k=(2,),
                    shared_experts=0),  # Mixtral 8x7B
    'deepseek': dict(d_model=2048, d_ff=1408, num_experts=(64,),
                     top_k=(6,), shared_experts=2),  # DeepSeek-V2-Lite
    'switch': dict(d_model=768, d_ff=3072, num_experts=(128,), top_k=(1,),
                   shared_experts=0),  # Switch-Base 128
}
# Dense (no sparsity) bfloat16 peak FLOP/s of vendor data sheets, by a
# substring of jax's device_kind; the first match wins.
VENDOR_BF16_PEAK = (('H100', 989e12), ('H200', 989e12), ('A100', 312e12),
                    ('TPU v5p', 459e12), ('TPU v5 lite', 197e12),
                    ('TPU v5e', 197e12), ('TPU v4', 275e12),
                    ('TPU v6', 918e12))


def preset_fields(name: str, scale: int) -> dict:
  """PRESETS[name] with D and F divided by `scale` (each at least 8)."""
  fields = dict(PRESETS[name])
  for key in ('d_model', 'd_ff'):
    fields[key] = max(8, fields[key] // scale)
  return fields


def default_preset_scale() -> int:
  """8 on CPU (Mixtral's layer would take minutes per step), else 1."""
  return 8 if jax.default_backend() == 'cpu' else 1


def vendor_peak(device_kind: str, dtype: str) -> Optional[float]:
  """The vendor's dense bfloat16 FLOP/s of this device, or None (unknown
  device, or a dtype other than bfloat16)."""
  if dtype != 'bfloat16':
    return None
  return next((peak for key, peak in VENDOR_BF16_PEAK if key in device_kind),
              None)


QUICK = dict(num_experts=(4, 8), top_k=(1, 2), tokens=512, d_model=64,
             d_ff=128, group_size=256, repeats=2, matmul_size=1024,
             model_sizes=('tiny',), model_steps=2)


def machine_info() -> dict:
  """Backend, device kind and count, versions, host CPU count."""
  device = jax.devices()[0]
  return {'backend': jax.default_backend(), 'device_kind': device.device_kind,
          'device_count': jax.device_count(), 'jax_version': jax.__version__,
          'python': platform.python_version(), 'cpu_count': os.cpu_count()}


def _block(tree):
  return jax.block_until_ready(tree)


def error_status(error: Exception) -> str:
  return f'error: {type(error).__name__}: {str(error)[:200]}'


_COMPILED = {}  # id(fn) -> (fn, executable): the dense FFN recurs per group


def _compile(fn: Callable, args: tuple):
  """jax.jit(fn) compiled for args; reused when the same fn object recurs
  (callers pass the same args with it)."""
  if id(fn) not in _COMPILED:
    _COMPILED[id(fn)] = (fn, jax.jit(fn).lower(*args).compile())
  return _COMPILED[id(fn)][1]


def clear_compiled() -> None:
  """Frees the executables kept for recurring functions."""
  _COMPILED.clear()


def _compile_and_warm(fn: Callable, args: tuple,
                      budget: Optional[int]) -> tuple:
  """(executable or None, result or None): compiled, held against the
  budget (memory_analysis), then called once (allocations, autotuning)."""
  try:
    executable = _compile(fn, args)
  except Exception as error:  # pylint: disable=broad-except
    return None, {'seconds': None, 'status': error_status(error)}
  fields = memory_fields(executable)
  status = bench_memory.compiled_gate(fields['compiled_mib'], budget)
  if status:
    return None, dict(seconds=None, status=status, **fields)
  try:
    _block(executable(*args))
  except Exception as error:  # pylint: disable=broad-except
    return None, dict(seconds=None, status=error_status(error), **fields)
  return executable, None


def time_interleaved(entries: dict, repeats: int,
                     budget: Optional[int] = None) -> dict:
  """Times jitted functions round-robin: a slow spell of a shared machine
  hits all of them alike, so their ratios stay meaningful.

  Each is compiled first (not timed), skipped if its compiled memory is
  over `budget`, and called once to warm up; then `repeats` rounds call
  each once, blocked with jax.block_until_ready. On accelerators each timed
  call follows an untimed call of the same function, so that the previous
  function's after-effects (allocator, clocks, caches) are not charged to
  it: without it an H100 timed the dense FFN up to 40% slower right after
  an E=256 layer. On CPU the effect is under ~10% of calls that take
  seconds, and drift dominates. Outputs are freed after the clock stops.

  Args:
    entries: {name: (fn, args)}.
    repeats: timed calls per entry.
    budget: bytes an entry's compiled program may hold; None: no limit.

  Returns:
    {name: {'seconds' (median), 'repeat_seconds', 'status', 'temp_mib',
    'compiled_mib', 'device_peak_mib'}}; an entry that failed (e.g. out of
    memory) or was skipped has seconds None and status 'error: ...' or
    'skipped: ...'.
  """
  compiled, out = {}, {}
  for name, (fn, args) in entries.items():
    executable, failed = _compile_and_warm(fn, args, budget)
    if executable is None:
      out[name] = failed
    else:
      compiled[name] = executable
  times = {name: [] for name in compiled}
  settle = jax.default_backend() != 'cpu'
  for _ in range(repeats):
    for name, executable in compiled.items():
      args = entries[name][1]
      if settle:
        _block(executable(*args))  # untimed; freed before the clock starts
      start = time.perf_counter()
      result = _block(executable(*args))
      times[name].append(time.perf_counter() - start)
      del result
  for name, executable in compiled.items():
    out[name] = dict(seconds=statistics.median(times[name]),
                     repeat_seconds=times[name], status='ok',
                     **memory_fields(executable))
  return out


def memory_fields(compiled) -> dict:
  """temp_mib: the executable's scratch memory and compiled_mib: its
  arguments + outputs + scratch (memory_analysis); device_peak_mib: the
  device's peak so far (memory_stats; GPU/TPU only)."""
  out = {'temp_mib': None, 'compiled_mib': None, 'device_peak_mib': None}
  total = bench_memory.compiled_bytes(compiled)
  if total is not None:
    out['temp_mib'] = round(
        compiled.memory_analysis().temp_size_in_bytes / 2**20, 2)
    out['compiled_mib'] = round(total / 2**20, 2)
  stats = getattr(jax.devices()[0], 'memory_stats', lambda: None)()
  if stats and 'peak_bytes_in_use' in stats:
    out['device_peak_mib'] = round(stats['peak_bytes_in_use'] / 2**20, 2)
  return out


def matmul_size(settings: Settings) -> int:
  """N of the peak matmul: --matmul_size, else 2048 on CPU, 8192 else."""
  return settings.matmul_size or (
      2048 if jax.default_backend() == 'cpu' else 8192)


def matmul_row(settings: Settings, budget: Optional[int]) -> dict:
  """Times a [N, N] x [N, N] matmul; its FLOP/s is the reference peak
  (None when the row is skipped: over budget, or --dry_run)."""
  n, dtype = matmul_size(settings), DTYPES[settings.dtype]
  estimate = bench_memory.matmul_bytes(n, jnp.dtype(dtype).itemsize)
  row = {'kind': 'matmul', 'size': n, 'dtype': settings.dtype,
         'seconds': None, 'flops': 2 * n ** 3, 'flops_per_s': None,
         'estimate_mib': bench_memory.mib(estimate['total']),
         'status': bench_memory.gate(estimate, budget, settings.dry_run)}
  if row['status'] != 'ok':
    return row
  a, b = (jax.random.normal(jax.random.key(i), (n, n), dtype)
          for i in (0, 1))
  result = time_interleaved({'matmul': (jnp.matmul, (a, b))},
                            max(settings.repeats, 3), budget)['matmul']
  row.update(result)
  if row['seconds']:
    row['flops_per_s'] = row['flops'] / row['seconds']
  return row


def add_step_timing_flags(parser, positive, steps: int) -> None:
  """--steps, --repeats and --json of the train-step benchmarks
  (bench_accumulate, bench_mesh); `check_json_flag` after parsing."""
  parser.add_argument('--steps', type=positive, default=steps,
                      help='steps per timed round')
  parser.add_argument('--repeats', type=positive, default=3,
                      help='timed rounds (the median is reported)')
  parser.add_argument('--json', metavar='FILE', help='also write the rows')


def check_json_flag(parser, args) -> None:
  """A one-line parser error unless --json's folder exists."""
  if args.json and not os.path.isdir(os.path.dirname(args.json) or '.'):
    parser.error(f'argument --json: the folder of {args.json!r} does not '
                 'exist')


def time_train_steps(variants: dict, steps: int, repeats: int):
  """Train steps timed round-robin: every variant compiled and run once,
  then `repeats` rounds of `steps` blocked steps of each in turn.

  Args:
    variants: {key: (jitted step (state, tokens) -> (state, metrics),
      state, tokens)}; the step may donate the state.

  Returns:
    ({key: [seconds per step of each round]}, {key: its last state}).
  """
  states = {}
  for key, (step, state, tokens) in variants.items():  # compile + warm up
    states[key] = _block(step(state, tokens)[0])
  times = {key: [] for key in variants}
  for _ in range(repeats):
    for key, (step, _, tokens) in variants.items():
      start = time.perf_counter()
      for _ in range(steps):
        states[key] = _block(step(states[key], tokens)[0])
      times[key].append((time.perf_counter() - start) / steps)
  return times, states


def write_rows_json(path: str, meta: dict, rows: list) -> None:
  """{'meta': meta + jax version, backend, device and machine, 'rows'} as
  JSON at `path` (the train-step benchmarks' --json)."""
  meta = dict(meta, jax=jax.__version__, backend=jax.default_backend(),
              device=jax.devices()[0].device_kind,
              machine=f'{platform.machine()}, {os.cpu_count()} CPU cores, '
                      f'{jax.device_count()} device(s)')
  with open(path, 'w', encoding='utf-8') as f:
    json.dump({'meta': meta, 'rows': rows}, f, indent=1)


def per_sequence_groups(config) -> None:
  """One routing group per sequence for a config whose MoE layers route one
  group of the whole batch (model.moe.group_sequences=-1; in place).

  The train-step benchmarks run a config over micro-batches or batch
  shards, which cannot split a group of the whole batch; every variant
  gets the per-sequence layout instead (the same G * S = B * L tokens, the
  same expert-buffer size G * E * C up to rounding). Other layouts are
  kept.
  """
  if config.model.moe.get('group_sequences') == -1:
    config.model.moe.group_sequences = None
    config.model.moe.group_order = 'sequence'
