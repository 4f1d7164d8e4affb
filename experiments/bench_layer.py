"""Layer rows of the benchmark: the MoeLayer per dispatcher x E x K, and the
dense FFN of the same activated FLOPs per token.

Axis letters: T tokens, D model width, F expert hidden width, E experts,
K experts per token, G groups, S tokens per group, C capacity.

  dense    jitted forward+backward of DenseFfn of width (K + n)*F on x
           [1, T, D] (value_and_grad of sum(y) w.r.t. the params and x;
           n = --shared_experts, 0 by default).
  layer    the same for MoeLayer (sum(y) + aux_loss, deterministic=False)
           for every dispatcher x E x K; 'ragged' and 'blocked' run
           dropless (capacity_factor=None), and so does a buffer
           dispatcher named with DROPLESS_SUFFIX ('gather:dropless':
           capacity C = S).
  profile  (--profile) the router, dispatch, experts and combine of a
           layer row, each forward+backward on its own.

The rows of one (E, K) are timed round-robin with their dense FFN, so
ratio_to_dense and speedup_vs_einsum compare timings taken side by side
(the dense rows alone are timed on their own; `dense_seconds` is the
paired dense time).

Useful FLOPs of a layer row: 3 (fwd+bwd) * 2 (matmuls) * 2 * T*D*F*(K+n)
plus the router's 3 * 2 * T*D*E. Rows report them as a share of the
measured matmul peak and, for bfloat16 on a device whose data-sheet peak
is known (bench_common.VENDOR_BF16_PEAK), of that peak (MFU). Capacity
padding (cf > 1 makes the experts compute cf times that), dispatch and
combine are overhead, not useful work.

Memory: every row's estimate (bench_memory.layer_bytes, dense_bytes) is
held against the budget before anything of it is built. A skipped row
compiles and allocates nothing, and an E whose rows are all skipped draws
no params; with --dry_run no row runs and nothing is compiled.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from experiments import bench_memory
from experiments.bench_common import (DTYPES, Settings, time_interleaved,
                                      vendor_peak)
import moejax
from moejax import capacity as capacity_lib
from moejax import routing
from moejax.experts import ExpertBank


# Rows that run dropless: these dispatchers always, a buffer dispatcher
# (moejax.DISPATCHERS) when its name ends with DROPLESS_SUFFIX.
DROPLESS = ('ragged', 'blocked')
DROPLESS_SUFFIX = ':dropless'


def row_dispatcher(name: str) -> tuple:
  """A row's name -> (MoeLayer dispatcher, dropless?):
  'gather:dropless' -> ('gather', True), 'ragged' -> ('ragged', True)."""
  if name.endswith(DROPLESS_SUFFIX):
    return name[:-len(DROPLESS_SUFFIX)], True
  return name, name in DROPLESS


def row_names() -> tuple:
  """Every allowed --dispatchers value: moejax.DISPATCHER_NAMES and the
  dropless buffer dispatchers ('einsum:dropless', 'gather:dropless')."""
  return moejax.DISPATCHER_NAMES + tuple(
      name + DROPLESS_SUFFIX for name in moejax.DISPATCHERS)


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
  """Useful training FLOPs: 12*T*D*F*(K+n) for the routed and shared
  experts, 6*T*D*E for the router."""
  return (12 * s.tokens * s.d_model * s.d_ff * (k + s.shared_experts) +
          6 * s.tokens * s.d_model * e)


def _dense_width(s: Settings, k: int) -> int:
  """(K + n) * F: the dense FFN of a top-K row's active FLOPs."""
  return (k + s.shared_experts) * s.d_ff


def _vendor(s: Settings) -> Optional[float]:
  return vendor_peak(jax.devices()[0].device_kind, s.dtype)


def _peaks(row: dict, seconds: float, peak: Optional[float],
           s: Settings) -> dict:
  """% of the measured matmul peak and of the vendor peak (MFU), or None."""
  vendor = _vendor(s)
  rate = row['flops'] / seconds
  return {'pct_of_matmul_peak': 100 * rate / peak if peak else None,
          'pct_of_vendor_peak': 100 * rate / vendor if vendor else None}


def group_size(s: Settings) -> int:
  """S: --group_size capped at --tokens; ValueError unless it divides T."""
  group = min(s.group_size, s.tokens)
  if s.tokens % group:
    raise ValueError(f'--group_size {group} is not allowed with --tokens '
                     f'{s.tokens}; allowed values: a divisor of --tokens, '
                     'or >= it')
  return group


def _itemsize(s: Settings) -> int:
  return jnp.dtype(DTYPES[s.dtype]).itemsize


def _with_estimate(row: dict, estimate: dict, s: Settings,
                   budget: Optional[int]) -> dict:
  """row with estimate_mib, and status 'skipped: ...' if over budget."""
  row['estimate_mib'] = bench_memory.mib(estimate['total'])
  if row['status'] == 'ok':
    row['status'] = bench_memory.gate(estimate, budget, s.dry_run)
  return row


def dense_entry(s: Settings, k: int, x: jax.Array) -> tuple:
  """(fwd+bwd fn, args) of the dense FFN of width (K + n)*F on x [1, T, D]:
  the same activated FLOPs per token as a top-K MoeLayer with n shared
  experts."""
  module = moejax.DenseFfn(d_ff=_dense_width(s, k), activation='relu',
                           dtype=DTYPES[s.dtype])
  return _layer_grad(module), (init_params(module, x), x)


def _dense_row(s: Settings, k: int, budget: Optional[int]) -> dict:
  """The dense row of K, not yet timed: static fields, estimate, status."""
  row = {'kind': 'dense', 'dispatcher': 'dense', 'num_experts': None,
         'top_k': k, 'tokens': s.tokens, 'd_model': s.d_model,
         'd_ff': _dense_width(s, k), 'dtype': s.dtype,
         'flops': _layer_flops(s, k), 'seconds': None, 'ratio_to_dense': 1.0,
         'speedup_vs_einsum': None, 'pct_of_matmul_peak': None,
         'pct_of_vendor_peak': None, 'status': 'ok'}
  estimate = bench_memory.dense_bytes(s.tokens, s.d_model, _dense_width(s, k),
                                      _itemsize(s), jax.default_backend())
  return _with_estimate(row, estimate, s, budget)


def _time_dense(s: Settings, row: dict, entry: tuple, peak: Optional[float],
                budget: Optional[int]) -> dict:
  """The dense FFN timed on its own (the layer rows pair it again)."""
  row.update(time_interleaved({'dense': entry}, s.repeats, budget)['dense'])
  if row['seconds']:
    row.update(_peaks(row, row['seconds'], peak, s))
  return row


def _layer_row(s: Settings, dispatcher: str, e: int, k: int,
               budget: Optional[int] = None) -> dict:
  """A layer row with its static fields and memory estimate; skipped when
  over budget or not a known dispatcher.

  A dropless row (row_dispatcher) has capacity_factor None: 'ragged' and
  'blocked' then have no capacity padding (their expert FLOPs are the
  routed tokens', plus 'blocked''s block padding); a buffer dispatcher
  gets C = S slots per expert.
  """
  group = group_size(s)
  base, dropless = row_dispatcher(dispatcher)
  cf = None if dropless else s.capacity_factor
  capacity = capacity_lib.compute_capacity(group, e, k, cf)
  row = {'kind': 'layer', 'dispatcher': dispatcher, 'num_experts': e,
         'top_k': k, 'tokens': s.tokens, 'group_size': group,
         'capacity_factor': s.capacity_factor, 'capacity': capacity,
         'd_model': s.d_model, 'd_ff': s.d_ff,
         'shared_experts': s.shared_experts, 'dtype': s.dtype,
         'flops': _layer_flops(s, k, e), 'seconds': None,
         'dense_seconds': None, 'ratio_to_dense': None,
         'speedup_vs_einsum': None, 'pct_of_matmul_peak': None,
         'pct_of_vendor_peak': None,
         'temp_mib': None, 'compiled_mib': None, 'device_peak_mib': None,
         'status': 'ok'}
  if dropless:
    row.update(capacity_factor=None,
               capacity=capacity if base in moejax.DISPATCHERS else None)
  if dispatcher not in row_names():
    row['status'] = ('skipped: not in moejax.DISPATCHER_NAMES (has '
                     f'{", ".join(row_names())})')
  shape = bench_memory.LayerShape(s.tokens, group, e, k, capacity,
                                  s.d_model, s.d_ff)
  estimate = bench_memory.layer_bytes(base, shape, _itemsize(s),
                                      jax.default_backend())
  if s.shared_experts:  # the shared FFN: a dense FFN of width n*F
    shared = bench_memory.dense_bytes(
        s.tokens, s.d_model, s.shared_experts * s.d_ff, _itemsize(s),
        jax.default_backend())
    estimate = dict(estimate, shared=shared['total'],
                    total=estimate['total'] + shared['total'])
  return _with_estimate(row, estimate, s, budget)


def _moe(s: Settings, dispatcher: str, e: int, k: int) -> moejax.MoeLayer:
  """The MoeLayer of a row (`dispatcher`: a row name, row_dispatcher)."""
  base, dropless = row_dispatcher(dispatcher)
  cf = None if dropless else s.capacity_factor
  return moejax.MoeLayer(num_experts=e, d_ff=s.d_ff, top_k=k,
                         capacity_factor=cf,
                         dispatcher=base, group_size=group_size(s),
                         num_shared_experts=s.shared_experts,
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
  group, dtype = group_size(s), DTYPES[s.dtype]
  capacity = capacity_lib.compute_capacity(group, e, k, s.capacity_factor)
  xg = x.reshape(-1, group, s.d_model)  # [G, S, D]
  router = routing.Router(num_experts=e, top_k=k)
  router_params = {'params': params['router']}

  def router_loss(p, inputs):
    decision, aux = router.apply(p, inputs, capacity, deterministic=False)
    return jnp.sum(decision.combine_weight) + aux['aux_loss']

  decision = jax.jit(lambda p, inputs: router.apply(
      p, inputs, capacity, deterministic=False)[0])(router_params, xg)
  pair = moejax.DISPATCHERS[dispatcher]
  buffers = jax.jit(pair.dispatch)(xg.astype(dtype), decision)  # [G,E,C,D]
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
                dense: Optional[tuple], peak: Optional[float],
                budget: Optional[int] = None) -> list:
  """Every dispatcher at one (E, K), timed round-robin with the dense FFN.

  Pairing each row with its own dense timing keeps ratio_to_dense and
  speedup_vs_einsum honest on a machine whose speed drifts (shared CPUs).
  A row over `budget` is skipped (its profile components with it); `dense`
  is None when the dense row was skipped.
  """
  rows = [_layer_row(s, d, e, k, budget) for d in s.dispatchers]
  entries = {}
  for row in rows:
    name = row['dispatcher']
    if row['status'] == 'ok':
      entries[name] = (_layer_grad(_moe(s, name, e, k)), (params, x))
      if s.profile and name in moejax.DISPATCHERS:  # buffer dispatchers
        for part, entry in component_fns(s, name, e, k, x, params).items():
          entries[f'{name}/{part}'] = entry
  if not entries:  # every row skipped: nothing to pair the dense FFN with
    return rows
  if dense:
    entries = {'dense': dense, **entries}
  results = time_interleaved(entries, s.repeats, budget)
  dense_seconds = results.get('dense', {}).get('seconds')
  einsum = results.get('einsum', {}).get('seconds')
  profile = []
  for row in rows:
    seconds = results.get(row['dispatcher'], {}).get('seconds')
    if row['status'] == 'ok':
      row.update(results[row['dispatcher']])
    if seconds:
      row.update(speedup_vs_einsum=einsum / seconds if einsum else None,
                 **_peaks(row, seconds, peak, s))
    if seconds and dense_seconds:
      row.update(dense_seconds=dense_seconds,
                 ratio_to_dense=seconds / dense_seconds)
    profile += _profile_rows(row, results)
  return rows + profile


def layer_rows(s: Settings, peak: Optional[float], budget: Optional[int],
               log: Callable) -> list:
  """Dense rows (one per K), then every E x K x dispatcher layer row.

  Rows are planned first (estimate, status); x, the dense FFNs and each
  E's params are built only for rows that will run.
  """
  dense = {k: _dense_row(s, k, budget) for k in s.top_k}
  runs = {e: any(_layer_row(s, d, e, k, budget)['status'] == 'ok'
                 for d in s.dispatchers for k in s.top_k)
          for e in s.num_experts}
  x = None  # [1, T, D], drawn only if a row runs
  if any(runs.values()) or any(r['status'] == 'ok' for r in dense.values()):
    x = jax.random.normal(jax.random.key(0), (1, s.tokens, s.d_model),
                          DTYPES[s.dtype])
  entries = {k: dense_entry(s, k, x) for k, row in dense.items()
             if row['status'] == 'ok'}
  rows = []
  for k, row in dense.items():
    rows.append(_time_dense(s, row, entries[k], peak, budget)
                if k in entries else row)
    log(rows[-1])
    if rows[-1]['seconds'] is None:
      entries.pop(k, None)  # skipped or failed: no dense pair
  for e in s.num_experts:
    params = init_params(moejax.MoeLayer(
        num_experts=e, d_ff=s.d_ff, group_size=group_size(s),
        num_shared_experts=s.shared_experts, activation='relu'),
                         x) if runs[e] else None
    for k in s.top_k:
      for row in layer_group(s, e, k, x, params, entries.get(k), peak,
                             budget):
        rows.append(row)
        log(row)
    del params
  return rows
