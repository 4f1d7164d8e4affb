"""Speed of the MoE layer and of MoE Transformer training steps.

    python -m experiments.benchmark [--quick] [--json FILE] [--dtype bfloat16]

Axis letters: T tokens, D model width, F expert hidden width, E experts,
K experts per token, S tokens per group, C capacity, B batch, L sequence.

Three measurements, all in one process on `jax.devices()[0]`:
  matmul  a square [N, N] x [N, N] matmul in the benchmark dtype; its FLOP/s
          is the machine's attainable peak that every row is compared with.
  layer   jitted forward+backward (value_and_grad of sum(y) + aux_loss w.r.t.
          the params and x, deterministic=False) of an MoeLayer for every
          dispatcher x E x K, and of the dense FFN with the same activated
          FLOPs per token (DenseFfn of width K*F): the `dense` rows.
  model   tokens/s of jitted training steps (value_and_grad + optax adamw)
          of dense / switch (top-1) / gshard (top-2) TransformerLMs.

Timing: compile first (not timed), one warm-up call, then the median of
`--repeats` calls, each blocked with `jax.block_until_ready`. The rows of
one (E, K) and its dense FFN are timed round-robin, so ratio_to_dense and
speedup_vs_einsum compare timings taken side by side (the dense rows alone
are timed on their own; `dense_seconds` is the paired dense time).

Useful FLOPs of a layer row: 3 (fwd+bwd) * 2 (matmuls) * 2 * T*D*F*K plus
the router's 3 * 2 * T*D*E. Capacity padding (cf > 1 makes the experts
compute cf times that), dispatch and combine are overhead, not useful work.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import cli
import moejax
from moejax import capacity as capacity_lib
from moejax import routing
from moejax.experts import ExpertBank
from moejax.models import TransformerLM, flops_per_token

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
MODEL_KINDS = ('dense', 'switch', 'gshard')
# Fallback model sizes when configs/base.py is not importable.
DEFAULT_SIZES = {
    'tiny': dict(seq_len=64, batch_size=16, num_layers=2, d_model=64,
                 num_heads=4, d_ff=256, num_experts=4),
    'small': dict(seq_len=128, batch_size=32, num_layers=4, d_model=128,
                  num_heads=4, d_ff=512, num_experts=8),
}


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
  profile: bool = False
  skip_layer: bool = False
  skip_model: bool = False


QUICK = dict(num_experts=(4, 8), top_k=(1, 2), tokens=512, d_model=64,
             d_ff=128, group_size=256, repeats=2, matmul_size=1024,
             model_sizes=('tiny',), model_steps=2)


# ------------------------------------------------------------------ timing
def machine_info() -> dict:
  """Backend, device kind and count, versions, host CPU count."""
  device = jax.devices()[0]
  return {'backend': jax.default_backend(), 'device_kind': device.device_kind,
          'device_count': jax.device_count(), 'jax_version': jax.__version__,
          'python': platform.python_version(), 'cpu_count': os.cpu_count()}


def _block(tree):
  return jax.block_until_ready(tree)


def _error(error: Exception) -> str:
  return f'error: {type(error).__name__}: {str(error)[:200]}'


_COMPILED = {}  # id(fn) -> (fn, executable): the dense FFN recurs per group


def _compile(fn: Callable, args: tuple):
  """jax.jit(fn) compiled for args; reused when the same fn object recurs
  (callers pass the same args with it)."""
  if id(fn) not in _COMPILED:
    _COMPILED[id(fn)] = (fn, jax.jit(fn).lower(*args).compile())
  return _COMPILED[id(fn)][1]


def time_interleaved(entries: dict, repeats: int) -> dict:
  """Times jitted functions round-robin: a slow spell of a shared machine
  hits all of them alike, so their ratios stay meaningful.

  Each is compiled first (not timed) and called once to warm up; then
  `repeats` rounds call each once, blocked with jax.block_until_ready. On
  accelerators each timed call follows an untimed call of the same
  function, so that the previous function's after-effects (allocator,
  clocks, caches) are not charged to it: without it an H100 timed the dense
  FFN up to 40% slower right after an E=256 layer. On CPU the effect is
  under ~10% of calls that take seconds, and drift dominates. Outputs are
  freed after the clock stops.

  Args:
    entries: {name: (fn, args)}.
    repeats: timed calls per entry.

  Returns:
    {name: {'seconds' (median), 'repeat_seconds', 'status', 'temp_mib',
    'device_peak_mib'}}; an entry that failed (e.g. out of memory) has
    seconds None and status 'error: ...'.
  """
  compiled, out = {}, {}
  for name, (fn, args) in entries.items():
    try:
      compiled[name] = _compile(fn, args)
      _block(compiled[name](*args))  # warm-up: allocations, autotuning
    except Exception as error:  # pylint: disable=broad-except
      compiled.pop(name, None)
      out[name] = {'seconds': None, 'status': _error(error)}
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


def time_jitted(fn: Callable, args: tuple, repeats: int) -> tuple:
  """(median seconds, timed seconds) of fn(*args); raises if it fails."""
  result = time_interleaved({'fn': (fn, args)}, repeats)['fn']
  if result['seconds'] is None:
    raise RuntimeError(result['status'])
  return result['seconds'], result['repeat_seconds']


def memory_fields(compiled) -> dict:
  """temp_mib: the executable's scratch memory (memory_analysis), and
  device_peak_mib: the device's peak so far (memory_stats; GPU/TPU only)."""
  out = {'temp_mib': None, 'device_peak_mib': None}
  try:
    analysis = compiled.memory_analysis()
    out['temp_mib'] = round(analysis.temp_size_in_bytes / 2**20, 2)
  except Exception:  # pylint: disable=broad-except
    pass  # not every backend implements it
  stats = getattr(jax.devices()[0], 'memory_stats', lambda: None)()
  if stats and 'peak_bytes_in_use' in stats:
    out['device_peak_mib'] = round(stats['peak_bytes_in_use'] / 2**20, 2)
  return out


def matmul_row(settings: Settings) -> dict:
  """Times a [N, N] x [N, N] matmul; its FLOP/s is the reference peak."""
  n = settings.matmul_size or (
      2048 if jax.default_backend() == 'cpu' else 8192)
  dtype = DTYPES[settings.dtype]
  a, b = (jax.random.normal(jax.random.key(i), (n, n), dtype)
          for i in (0, 1))
  seconds, times = time_jitted(jnp.matmul, (a, b), max(settings.repeats, 3))
  flops = 2 * n ** 3
  return {'kind': 'matmul', 'size': n, 'dtype': settings.dtype,
          'seconds': seconds, 'repeat_seconds': times, 'flops': flops,
          'flops_per_s': flops / seconds, 'status': 'ok'}


# ------------------------------------------------------------------- layer
def _layer_grad(module) -> Callable:
  """(params, x) -> (sum(y) + aux_loss, (d params, d x)): what is timed."""

  def loss(params, inputs):
    if isinstance(module, moejax.MoeLayer):
      y, aux = module.apply({'params': params}, inputs, deterministic=False)
    else:
      y, aux = module.apply({'params': params}, inputs), {'aux_loss': 0.0}
    return jnp.sum(y.astype(jnp.float32)) + aux['aux_loss']

  return jax.value_and_grad(loss, argnums=(0, 1))


def init_params(module, x: jax.Array):
  """`module`'s own initialiser on x [1, T, D] ('rbg' keys compile faster)."""
  return jax.jit(module.init)(jax.random.key(1, impl='rbg'), x)['params']


def _layer_flops(s: Settings, k: int, e: int = 0) -> int:
  """Useful training FLOPs: 12*T*D*F*K for the experts, 6*T*D*E router."""
  return 12 * s.tokens * s.d_model * s.d_ff * k + 6 * s.tokens * s.d_model * e


def _group(s: Settings) -> int:
  """S: --group_size capped at --tokens; ValueError unless it divides T."""
  group = min(s.group_size, s.tokens)
  if s.tokens % group:
    raise ValueError(f'--group_size {group} is not allowed with --tokens '
                     f'{s.tokens}; allowed values: a divisor of --tokens, '
                     'or >= it')
  return group


def dense_entry(s: Settings, k: int, x: jax.Array) -> tuple:
  """(fwd+bwd fn, args) of the dense FFN of width K*F on x [1, T, D]: the
  same activated FLOPs per token as a top-K MoeLayer."""
  module = moejax.DenseFfn(d_ff=k * s.d_ff, activation='relu',
                           dtype=DTYPES[s.dtype])
  return _layer_grad(module), (init_params(module, x), x)


def dense_row(s: Settings, k: int, entry: tuple, peak: float) -> dict:
  """The dense FFN timed on its own (the layer rows pair it again)."""
  row = {'kind': 'dense', 'dispatcher': 'dense', 'num_experts': None,
         'top_k': k, 'tokens': s.tokens, 'd_model': s.d_model,
         'd_ff': k * s.d_ff, 'dtype': s.dtype, 'flops': _layer_flops(s, k),
         'ratio_to_dense': 1.0, 'speedup_vs_einsum': None}
  row.update(time_interleaved({'dense': entry}, s.repeats)['dense'])
  row['pct_of_matmul_peak'] = 100 * row['flops'] / row['seconds'] / peak
  return row


def _layer_row(s: Settings, dispatcher: str, e: int, k: int) -> dict:
  """A layer row with its static fields; skipped unless a known dispatcher.

  'ragged' runs dropless (capacity_factor=None): no capacity padding, so
  its expert FLOPs are exactly the routed tokens'.
  """
  group = _group(s)
  row = {'kind': 'layer', 'dispatcher': dispatcher, 'num_experts': e,
         'top_k': k, 'tokens': s.tokens, 'group_size': group,
         'capacity_factor': s.capacity_factor,
         'capacity': capacity_lib.compute_capacity(group, e, k,
                                                   s.capacity_factor),
         'd_model': s.d_model, 'd_ff': s.d_ff, 'dtype': s.dtype,
         'flops': _layer_flops(s, k, e), 'seconds': None,
         'dense_seconds': None, 'ratio_to_dense': None,
         'speedup_vs_einsum': None, 'pct_of_matmul_peak': None,
         'temp_mib': None, 'device_peak_mib': None, 'status': 'ok'}
  if dispatcher == 'ragged':
    row.update(capacity_factor=None, capacity=None)
  if dispatcher not in moejax.DISPATCHER_NAMES:
    row['status'] = ('skipped: not in moejax.DISPATCHER_NAMES (has '
                     f'{", ".join(moejax.DISPATCHER_NAMES)})')
  return row


def _moe(s: Settings, dispatcher: str, e: int, k: int) -> moejax.MoeLayer:
  cf = None if dispatcher == 'ragged' else s.capacity_factor
  return moejax.MoeLayer(num_experts=e, d_ff=s.d_ff, top_k=k,
                         capacity_factor=cf,
                         dispatcher=dispatcher, group_size=_group(s),
                         activation='relu', dtype=DTYPES[s.dtype])


def _sum32(y: jax.Array) -> jax.Array:
  return jnp.sum(y.astype(jnp.float32))


def component_fns(s: Settings, dispatcher: str, e: int, k: int,
                  x: jax.Array, params) -> dict:
  """{component: (fwd+bwd fn, args)} for one layer row, as MoeLayer runs.

  router: Router on x [G, S, D] (logits, top-K, slots, aux); loss
    sum(combine_weight) + aux_loss, grads w.r.t. kernel and x.
  dispatch: [G, S, D] -> [G, E, C, D] for a fixed decision, grad w.r.t. x.
  experts: ExpertBank on the [G, E, C, D] buffers, grads w.r.t. both.
  combine: [G, E, C, D] -> [G, S, D], grads w.r.t. buffers and gates.
  """
  group, dtype = _group(s), DTYPES[s.dtype]
  capacity = capacity_lib.compute_capacity(group, e, k, s.capacity_factor)
  xg = x.reshape(-1, group, s.d_model)
  router = routing.Router(num_experts=e, top_k=k)
  router_params = {'params': params['router']}

  def router_loss(p, inputs):
    decision, aux = router.apply(p, inputs, capacity, deterministic=False)
    return jnp.sum(decision.combine_weight) + aux['aux_loss']

  decision = jax.jit(lambda p, inputs: router.apply(
      p, inputs, capacity, deterministic=False)[0])(router_params, xg)
  pair = moejax.DISPATCHERS[dispatcher]
  buffers = jax.jit(pair.dispatch)(xg.astype(dtype), decision)
  bank = ExpertBank(num_experts=e, d_ff=s.d_ff, activation='relu',
                    dtype=dtype)
  grad = jax.value_and_grad
  return {
      'router': (grad(router_loss, (0, 1)), (router_params, xg)),
      'dispatch': (grad(lambda v, d: _sum32(pair.dispatch(v, d))),
                   (xg.astype(dtype), decision)),
      'experts': (grad(lambda p, b: _sum32(bank.apply(p, b)), (0, 1)),
                  ({'params': params['experts']}, buffers)),
      'combine': (grad(lambda y, gate, d: _sum32(pair.combine(
          y, d.replace(gate=gate))), (0, 1)),
                  (buffers, decision.gate, decision)),
  }


def _profile_rows(row: dict, results: dict) -> list:
  """`profile` rows of one layer row from its interleaved results."""
  out = []
  for name, result in results.items():
    dispatcher, _, component = name.partition('/')
    if dispatcher != row['dispatcher'] or not component:
      continue
    seconds = result['seconds']
    out.append({
        'kind': 'profile', 'dispatcher': dispatcher,
        'num_experts': row['num_experts'], 'top_k': row['top_k'],
        'component': component, 'seconds': seconds,
        'repeat_seconds': result.get('repeat_seconds'),
        'pct_of_layer': (100 * seconds / row['seconds']
                         if seconds and row['seconds'] else None),
        'ratio_to_dense': (seconds / row['dense_seconds']
                           if seconds and row['dense_seconds'] else None),
        'status': result['status']})
  return out


def layer_group(s: Settings, e: int, k: int, x: jax.Array, params,
                dense: tuple, peak: float) -> list:
  """Every dispatcher at one (E, K), timed round-robin with the dense FFN.

  Pairing each row with its own dense timing keeps ratio_to_dense and
  speedup_vs_einsum honest on a machine whose speed drifts (shared CPUs).
  """
  rows = [_layer_row(s, d, e, k) for d in s.dispatchers]
  entries = {'dense': dense}
  for row in rows:
    name = row['dispatcher']
    if row['status'] == 'ok':
      entries[name] = (_layer_grad(_moe(s, name, e, k)), (params, x))
      if s.profile and name in moejax.DISPATCHERS:  # not 'ragged'
        for part, entry in component_fns(s, name, e, k, x, params).items():
          entries[f'{name}/{part}'] = entry
  results = time_interleaved(entries, s.repeats)
  dense_seconds = results['dense']['seconds']
  einsum = results.get('einsum', {}).get('seconds')
  profile = []
  for row in rows:
    seconds = results.get(row['dispatcher'], {}).get('seconds')
    if row['status'] == 'ok':
      row.update(results[row['dispatcher']])
    if seconds and dense_seconds:
      row.update(dense_seconds=dense_seconds,
                 ratio_to_dense=seconds / dense_seconds,
                 speedup_vs_einsum=einsum / seconds if einsum else None,
                 pct_of_matmul_peak=100 * row['flops'] / seconds / peak)
    profile += _profile_rows(row, results)
  return rows + profile


def layer_rows(s: Settings, peak: float, log: Callable) -> list:
  """Dense rows (one per K), then every E x K x dispatcher layer row."""
  x = jax.random.normal(jax.random.key(0), (1, s.tokens, s.d_model),
                        DTYPES[s.dtype])
  dense = {k: dense_entry(s, k, x) for k in s.top_k}
  rows = []
  for k in s.top_k:
    rows.append(dense_row(s, k, dense[k], peak))
    log(rows[-1])
  for e in s.num_experts:
    params = init_params(moejax.MoeLayer(
        num_experts=e, d_ff=s.d_ff, group_size=_group(s), activation='relu'),
                         x)
    for k in s.top_k:
      for row in layer_group(s, e, k, x, params, dense[k], peak):
        rows.append(row)
        log(row)
    del params
  return rows


# ------------------------------------------------------------------- model
def model_sizes() -> dict:
  """{size: dims} from configs/base.py's SIZES, else DEFAULT_SIZES."""
  try:
    from configs import base  # pylint: disable=g-import-not-at-top
    sizes = {}
    for name, size in base.SIZES.items():
      sizes[name] = dict(seq_len=size['data']['seq_len'],
                         batch_size=size['train']['batch_size'],
                         num_experts=size['moe']['num_experts'],
                         **{k: size['model'][k] for k in (
                             'num_layers', 'd_model', 'num_heads', 'd_ff')})
    return sizes
  except Exception:  # pylint: disable=broad-except
    return dict(DEFAULT_SIZES)


def build_model(size: dict, kind: str, dtype) -> TransformerLM:
  """dense | switch (top-1, cf 1.25) | gshard (top-2, 'random' policy)."""
  moe = None
  if kind != 'dense':
    moe = dict(num_experts=size['num_experts'], capacity_factor=1.25,
               top_k=1 if kind == 'switch' else 2,
               second_expert_policy='all' if kind == 'switch' else 'random')
  return TransformerLM(num_layers=size['num_layers'], d_model=size['d_model'],
                       num_heads=size['num_heads'], d_ff=size['d_ff'],
                       vocab_size=256, activation='gelu', moe=moe,
                       dtype=dtype)


def host_params(model: TransformerLM, tokens: jax.Array):
  """A param tree for timing, drawn with numpy: no init program to compile.

  Shapes and dtypes come from jax.eval_shape(model.init). Norm scales are 1,
  the embedding N(0, 1), every other kernel N(0, 1 / fan_in) with fan_in
  its size over its last axis (the router's [D, E] too: near-uniform
  routing, as at the real init). Speed does not depend on the values: the
  expert buffers have a fixed capacity whatever the routing.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)['params']
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name == 'scale':
      return jnp.ones(leaf.shape, leaf.dtype)
    std = 1.0 if name == 'embedding' else (
        leaf.shape[-1] / math.prod(leaf.shape)) ** 0.5
    value = rng.standard_normal(leaf.shape, np.float32) * std
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def make_train_steps(model: TransformerLM, optimizer, steps: int):
  """`steps` adamw training steps as one jittable function.

  (params, opt_state, tokens [B, L + 1], key) -> (params, opt_state, loss).
  """

  def loss_fn(params, tokens, key):
    logits, aux = model.apply({'params': params}, tokens[:, :-1],
                              deterministic=False, rngs={'router': key})
    lm = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return lm.mean() + 0.01 * aux['aux_loss']

  def one_step(carry, i):
    params, opt_state, tokens, key = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens,
                                              jax.random.fold_in(key, i))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, tokens,
            key), loss

  def run(params, opt_state, tokens, key):
    carry, losses = jax.lax.scan(one_step, (params, opt_state, tokens, key),
                                 jnp.arange(steps))
    return carry[0], carry[1], losses[-1]

  return run


def model_entry(s: Settings, size: dict, kind: str) -> tuple:
  """(model, (train-steps fn, args)) for one size and kind."""
  model = build_model(size, kind, DTYPES[s.dtype])
  b, l = size['batch_size'], size['seq_len']
  tokens = jax.random.randint(jax.random.key(0), (b, l + 1), 0, 256)
  params = host_params(model, tokens[:, :-1])
  optimizer = optax.adamw(1e-3, weight_decay=0.1)
  args = (params, optimizer.init(params), tokens, jax.random.key(2))
  return model, (make_train_steps(model, optimizer, s.model_steps), args)


def model_rows(s: Settings, peak: float, log: Callable) -> list:
  """Per size: every kind's training tokens/s, timed round-robin, with
  ratio_to_dense (None without a dense row) and MFU."""
  rows = []
  for size_name in s.model_sizes:
    size = model_sizes()[size_name]
    b, l = size['batch_size'], size['seq_len']
    models, entries = {}, {}
    for kind in s.model_kinds:
      models[kind], entries[kind] = model_entry(s, size, kind)
    results = time_interleaved(entries, s.repeats)
    dense = results.get('dense', {}).get('seconds')
    for kind, model in models.items():
      result, steps = results[kind], s.model_steps
      row = {'kind': 'model', 'model': kind, 'size': size_name,
             'num_experts': 0 if kind == 'dense' else size['num_experts'],
             'top_k': {'dense': 0, 'switch': 1, 'gshard': 2}[kind],
             'batch_size': b, 'seq_len': l, 'dtype': s.dtype,
             'status': result['status'], 'seconds': None,
             'tokens_per_s': None, 'ratio_to_dense': None, 'mfu_pct': None,
             'flops_per_token': flops_per_token(model, l)}
      if result['seconds']:
        per_step = [t / steps for t in result['repeat_seconds']]
        row.update(seconds=result['seconds'] / steps, repeat_seconds=per_step,
                   tokens_per_s=b * l * steps / result['seconds'],
                   ratio_to_dense=dense / result['seconds'] if dense else None)
        row['mfu_pct'] = 100 * row['flops_per_token'] * row[
            'tokens_per_s'] / peak
      rows.append(row)
      log(row)
  return rows


# ------------------------------------------------------------------ output
def _fmt(value, spec: str = '.3g') -> str:
  if value is None:
    return '-'
  return format(value, spec) if isinstance(value, float) else str(value)


_TABLES = {  # kind -> (title, [(header, key, format)])
    'matmul': ('Matmul peak', [
        ('N', 'size', ''), ('dtype', 'dtype', ''), ('seconds', 'seconds',
                                                    '.4g'),
        ('GFLOP/s', 'gflops_per_s', '.4g')]),
    'layer': ('MoeLayer / dense FFN fwd+bwd', [
        ('dispatcher', 'dispatcher', ''), ('E', 'num_experts', ''),
        ('K', 'top_k', ''), ('T', 'tokens', ''), ('S', 'group_size', ''),
        ('C', 'capacity', ''), ('seconds', 'seconds', '.4g'),
        ('dense s (paired)', 'dense_seconds', '.4g'),
        ('ratio_to_dense', 'ratio_to_dense', '.3f'),
        ('speedup_vs_einsum', 'speedup_vs_einsum', '.2f'),
        ('% matmul peak', 'pct_of_matmul_peak', '.1f'),
        ('temp MiB', 'temp_mib', '.1f'),
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
        ('MFU %', 'mfu_pct', '.1f')]),
}


def _cell(row: dict, key: str, spec: str) -> str:
  if key == 'gflops_per_s':
    return _fmt(row['flops_per_s'] / 1e9, spec)
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
  """One progress line on stderr per finished row."""
  what = {k: row.get(k) for k in ('kind', 'dispatcher', 'model', 'size',
                                  'num_experts', 'top_k') if k in row}
  print(f'done {what}: seconds={_fmt(row.get("seconds"))} '
        f'{row.get("status", "")}', file=sys.stderr, flush=True)


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
  _group(s)


def run(settings: Settings, log: Callable = _log) -> dict:
  """Measures everything `settings` asks for.

  Returns:
    {'machine': machine_info() plus the matmul FLOP/s and the settings,
     'rows': [matmul row, dense and layer rows, model rows]}.
  """
  check_settings(settings)
  machine = machine_info()
  rows = [matmul_row(settings)]
  log(rows[0])
  peak = rows[0]['flops_per_s']
  machine['matmul_flops_per_s'] = peak
  if not settings.skip_layer:
    rows += layer_rows(settings, peak, log)
  if not settings.skip_model:
    rows += model_rows(settings, peak, log)
  _COMPILED.clear()
  machine['settings'] = dataclasses.asdict(settings)
  return {'machine': machine, 'rows': rows}


# --------------------------------------------------------------------- CLI
EPILOG = """\
--dispatchers, --num_experts, --top_k, --model_sizes and --model_kinds take
comma lists (--num_experts 8,64). --quick sets QUICK's value (a tiny grid)
of every flag not given on the command line.

exit codes:
  0  done; a row that failed (e.g. out of memory) is a row with status
     'error: ...', and the run goes on
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
      ('dispatchers', cli.comma_list(cli.choice(moejax.DISPATCHER_NAMES),
                                     ', '.join(moejax.DISPATCHER_NAMES)),
       'NAME[,NAME...]', 'dispatchers to time'),
      ('num_experts', ints, 'E[,E...]', 'E values'),
      ('top_k', ints, 'K[,K...]', 'K values, each <= every E'),
      ('tokens', positive, 'T', 'T, tokens per layer call'),
      ('d_model', positive, 'D', 'D, model width'),
      ('d_ff', positive, 'F', 'F, hidden width of one expert'),
      ('group_size', positive, 'S', 'S, tokens per routing group, capped '
       'at --tokens, which it must divide'),
      ('capacity_factor', cli.number(float, 'a number > 0', lambda v: v > 0),
       'CF', "training capacity factor ('ragged' rows are dropless)"),
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
      ('skip_layer', 'no layer rows'), ('skip_model', 'no model rows')):
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
