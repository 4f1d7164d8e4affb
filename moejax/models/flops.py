"""Parameter counts and training FLOPs per token of a TransformerLM.

Axis letters: B batch, L sequence length (T in the formulas), D model width,
F FFN width, E experts, K chosen experts, V vocab, N_layers blocks.

Nothing is allocated: the param tree comes from `jax.eval_shape(model.init)`.

Params:
  total      every parameter once (a tied embedding is one [V, D] table).
  active     what one token uses: in each MoE block the router plus its
             share of the expert params (`experts_per_token` / E of them:
             K for token choice, cf for expert choice, E*C/S slots for
             Soft MoE; times the granularity); everything else fully.
  embedding  the input table embed/embedding [V, D] (an untied head [D, V]
             is not in it).

Training FLOPs per token (forward + backward = 3 x forward):

    forward = 2 * N_mm + 4 * N_layers * T * D + 2 * D * E * N_moe
    train   = 3 * forward

  N_mm: active non-embedding matmul params = active - embedding - norm
    scales - router kernels, plus V * D for the output projection when the
    embedding is tied (an untied head is already in N_mm), so the output
    projection counts exactly once either way.
  4 * N_layers * T * D: attention scores q.k (2 T D per token per layer) and
    the value mixing (2 T D), with the full-T convention of the PaLM
    (appendix B) and Chinchilla (appendix F) papers: the causal mask's saving
    of about half is not taken.
  2 * D * E per MoE layer: the router logits.
  Capacity padding (empty expert slots), softmaxes, norms, RoPE and the
  dispatch/combine data movement are not counted.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from moejax.models.transformer import TransformerLM


def param_shapes(model: TransformerLM, seq_len: Optional[int] = None):
  """The model's param tree as ShapeDtypeStructs, without allocating.

  Args:
    model: a TransformerLM.
    seq_len: L of the dummy [1, L] input; default: the MoE group_size if
      set (so groups divide the tokens), else 8. Param shapes do not depend
      on it.

  Returns:
    A nested dict of jax.ShapeDtypeStruct, like `model.init(...)['params']`.
  """
  if seq_len is None:
    seq_len = (model.moe or {}).get('group_size') or 8
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
  return variables['params']


def experts_per_token(moe, seq_len: int) -> float:
  """Mean number of (effective) experts that process one token.

  Args:
    moe: the model's MoeLayer kwargs (a mapping) or None.
    seq_len: L (Soft MoE groups default to one sequence).

  Returns:
    token choice: granularity * top_k; expert choice: granularity * cf (the
    training capacity factor; every expert fills its C = cf * S / E slots,
    up to rounding); Soft MoE: granularity * E * slots_per_expert / S slot
    evaluations per token; 0 without MoE.
  """
  if not moe:
    return 0.0
  m = moe.get('granularity', 1)
  router = moe.get('router', 'topk')
  if router == 'expert_choice':
    cf = moe.get('capacity_factor', 1.25)
    return float(m * (moe['num_experts'] if cf is None else cf))
  if router == 'soft_moe':
    s = moe.get('group_size') or seq_len
    return m * moe['num_experts'] * moe.get('slots_per_expert', 1) / s
  return float(m * moe.get('top_k', 1))


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', k)) for k in path)


def param_breakdown(model: TransformerLM,
                    seq_len: Optional[int] = None) -> dict:
  """Parameter counts by kind.

  Args:
    model: a TransformerLM.
    seq_len: see `param_shapes`.

  Returns:
    dict of ints: 'total', 'active', 'embedding' (see module docstring),
    'norm' (RMSNorm scales), 'router' (router kernels, D * E per MoE
    block), 'experts' (all expert weights), 'moe_layers' (count).
  """
  per_token = experts_per_token(model.moe, seq_len or 8)
  counts = dict(total=0, active=0, embedding=0, norm=0, router=0, experts=0)
  moe_blocks = set()
  leaves = jax.tree_util.tree_flatten_with_path(param_shapes(model, seq_len))
  for path, leaf in leaves[0]:
    names = _names(path)
    n = math.prod(leaf.shape)
    counts['total'] += n
    if names[0] == 'embed':
      counts['embedding'] += n
    if names[-1] == 'scale':
      counts['norm'] += n
    if names[-2:] == ('router', 'kernel'):
      counts['router'] += n
      moe_blocks.add(names[0])
    if len(names) > 2 and names[1:3] == ('ffn', 'experts'):
      counts['experts'] += n
      counts['active'] += round(n / leaf.shape[0] * per_token)
    else:
      counts['active'] += n
  counts['moe_layers'] = len(moe_blocks)
  return counts


def count_params(model: TransformerLM, seq_len: Optional[int] = None) -> dict:
  """Total, active and embedding parameter counts.

  Args:
    model: a TransformerLM.
    seq_len: see `param_shapes` (does not change the counts).

  Returns:
    {'total': int, 'active': int, 'embedding': int}; active counts each MoE
    block's router plus K / E of its expert weights, all else fully.
  """
  counts = param_breakdown(model, seq_len)
  return {k: counts[k] for k in ('total', 'active', 'embedding')}


def flops_per_token(model: TransformerLM, seq_len: int) -> int:
  """Training (forward + backward) FLOPs per token.

      3 * (2 * N_mm + 4 * N_layers * T * D + 2 * D * E * N_moe)

  with N_mm the active non-embedding matmul params (output projection
  counted once, tied or not); see the module docstring.

  Args:
    model: a TransformerLM.
    seq_len: T, the training sequence length.

  Returns:
    int FLOPs per token.
  """
  counts = param_breakdown(model, seq_len)
  matmul = (counts['active'] - counts['embedding'] - counts['norm'] -
            counts['router'])
  if model.tie_embeddings:
    matmul += model.vocab_size * model.d_model
  attention = 4 * model.num_layers * seq_len * model.d_model
  router = 2 * counts['router']  # 2 * D * E per MoE block
  return 3 * (2 * matmul + attention + router)


def _human(n: float) -> str:
  """1234567 -> '1.23M'."""
  for unit, scale in (('T', 1e12), ('G', 1e9), ('M', 1e6), ('K', 1e3)):
    if abs(n) >= scale:
      return f'{n / scale:.3g}{unit}'
  return f'{n:.3g}'


def summary(model: TransformerLM, seq_len: int) -> str:
  """One line for the trainer to print at startup.

  Args:
    model: a TransformerLM.
    seq_len: T, the training sequence length.

  Returns:
    e.g. 'params total 1.23M, active 0.45M (embedding 65.5K), training
    FLOPs/token 2.7M at seq_len 128, 2/4 MoE layers'.
  """
  counts = param_breakdown(model, seq_len)
  flops = flops_per_token(model, seq_len)
  return (f'params total {_human(counts["total"])}, active '
          f'{_human(counts["active"])} (embedding '
          f'{_human(counts["embedding"])}), training FLOPs/token '
          f'{_human(flops)} at seq_len {seq_len}, {counts["moe_layers"]}/'
          f'{model.num_layers} MoE layers')
