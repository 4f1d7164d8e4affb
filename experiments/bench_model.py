"""Model rows of the benchmark: training tokens/s of MoE Transformer LMs.

Axis letters: B batch, L sequence length, E experts, K experts per token.

Per size (configs/base.py's SIZES): tokens/s of jitted training steps
(`--model_steps` value_and_grad + optax adamw steps in one lax.scan) of the
dense / switch (top-1, cf 1.25) / gshard (top-2, 'random' second-expert
policy) TransformerLMs, timed round-robin, with ratio_to_dense and MFU
(model FLOPs per token x tokens/s over the matmul peak).

Memory: each row's estimate (bench_memory.model_bytes, from jax.eval_shape:
nothing compiled) is held against the budget before its params are drawn.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import bench_memory
from experiments.bench_common import DTYPES, Settings, time_interleaved
from moejax.models import TransformerLM, flops_per_token

# Fallback model sizes when configs/base.py is not importable.
DEFAULT_SIZES = {
    'tiny': dict(seq_len=64, batch_size=16, num_layers=2, d_model=64,
                 num_heads=4, d_ff=256, num_experts=4),
    'small': dict(seq_len=128, batch_size=32, num_layers=4, d_model=128,
                  num_heads=4, d_ff=512, num_experts=8),
}
TOP_K = {'dense': 0, 'switch': 1, 'gshard': 2}


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
  """dense | switch (top-1, cf 1.25) | gshard (top-2, 'random' policy,
  GShard's choice-major slot order: allow_noncausal_routing)."""
  moe = None
  if kind != 'dense':
    moe = dict(num_experts=size['num_experts'], capacity_factor=1.25,
               top_k=1 if kind == 'switch' else 2,
               second_expert_policy='all' if kind == 'switch' else 'random',
               allow_noncausal_routing=kind == 'gshard')
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


def model_entry(s: Settings, size: dict, model: TransformerLM) -> tuple:
  """(train-steps fn, args) of `model` at one size."""
  b, l = size['batch_size'], size['seq_len']
  tokens = jax.random.randint(jax.random.key(0), (b, l + 1), 0, 256)
  params = host_params(model, tokens[:, :-1])
  optimizer = optax.adamw(1e-3, weight_decay=0.1)
  args = (params, optimizer.init(params), tokens, jax.random.key(2))
  return make_train_steps(model, optimizer, s.model_steps), args


def _model_row(s: Settings, size_name: str, kind: str, model: TransformerLM,
               budget: Optional[int]) -> dict:
  """A model row not yet timed: static fields, estimate and status."""
  size = model_sizes()[size_name]
  b, l = size['batch_size'], size['seq_len']
  estimate = bench_memory.model_bytes(model, b, l)
  return {'kind': 'model', 'model': kind, 'size': size_name,
          'num_experts': 0 if kind == 'dense' else size['num_experts'],
          'top_k': TOP_K[kind], 'batch_size': b, 'seq_len': l,
          'dtype': s.dtype, 'seconds': None, 'tokens_per_s': None,
          'ratio_to_dense': None, 'mfu_pct': None,
          'flops_per_token': bench_memory.traced(
              lambda: flops_per_token(model, l)),
          'estimate_mib': bench_memory.mib(estimate['total']),
          'status': bench_memory.gate(estimate, budget, s.dry_run)}


def model_rows(s: Settings, peak: Optional[float], budget: Optional[int],
               log: Callable) -> list:
  """Per size: every kind's training tokens/s, timed round-robin, with
  ratio_to_dense (None without a dense row) and MFU (None without peak)."""
  rows = []
  for size_name in s.model_sizes:
    size = model_sizes()[size_name]
    models = {kind: build_model(size, kind, DTYPES[s.dtype])
              for kind in s.model_kinds}
    planned = {kind: _model_row(s, size_name, kind, model, budget)
               for kind, model in models.items()}
    entries = {kind: model_entry(s, size, models[kind])
               for kind, row in planned.items() if row['status'] == 'ok'}
    results = time_interleaved(entries, s.repeats, budget)
    dense = results.get('dense', {}).get('seconds')
    for kind, row in planned.items():
      result, steps = results.get(kind), s.model_steps
      if result:
        row.update(status=result['status'],
                   compiled_mib=result.get('compiled_mib'))
      if result and result['seconds']:
        per_step = [t / steps for t in result['repeat_seconds']]
        tokens_per_s = row['batch_size'] * row['seq_len'] * steps / result[
            'seconds']
        row.update(seconds=result['seconds'] / steps, repeat_seconds=per_step,
                   tokens_per_s=tokens_per_s,
                   ratio_to_dense=dense / result['seconds'] if dense else None,
                   mfu_pct=(100 * row['flops_per_token'] * tokens_per_s / peak
                            if peak else None))
      rows.append(row)
      log(row)
  return rows
