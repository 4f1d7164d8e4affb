"""Parameter counts and training FLOPs per token of a TransformerLM or an
EncoderClassifier (`model.task='classify'`).

Axis letters: B batch, L sequence length (T in the formulas), D model width,
F FFN width, E experts, K chosen experts, C slots per expert (Soft MoE),
V vocab, N classes, N_layers blocks.

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

    forward = 2 * N_mm + 4 * N_layers * T * D + router + soft
    train   = 3 * forward

  N_mm: active non-embedding matmul params = active - embedding - norm
    scales - router kernels, plus V * D for the output projection when the
    embedding is tied (an untied head is already in N_mm), so the output
    projection counts exactly once either way.
  4 * N_layers * T * D: attention scores q.k (2 T D per token per layer) and
    the value mixing (2 T D), with the full-T convention of the PaLM
    (appendix B) and Chinchilla (appendix F) papers: the causal mask's saving
    of about half is not taken.
  router: 2 * D * E per MoE layer, the router logits (Soft MoE: 2 * D * E * C,
    the slot logits).
  soft: Soft MoE only, 4 * D * E * C per MoE layer: its dispatch (every
    slot a weighted sum of the group's S tokens) and combine (every token a
    weighted sum of the E * C slot outputs) are dense matmuls, 2 * D * E * C
    per token each.
  Capacity padding (empty expert slots), softmaxes, norms, RoPE and the
  one-hot / index dispatch and combine of token choice and expert choice
  (data movement) are not counted.

EncoderClassifier: no output projection over V (its embedding is input only);
the attention is bidirectional, so the full-T convention is exact; the
classifier head [D, N] runs once per example on the pooled [B, D], so N_mm
leaves it out and forward adds 2 * D * N / T per token. Per example is T
times per token (`summary` prints both for a classifier).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import grouping
from moejax.models.encoder import EncoderClassifier
from moejax.models.transformer import TransformerLM

Model = Union[TransformerLM, EncoderClassifier]


def supports(model: nn.Module) -> bool:
  """Whether this module can count `model`: a TransformerLM or an
  EncoderClassifier (the trainer prints `summary` for these)."""
  return isinstance(model, (TransformerLM, EncoderClassifier))


def _is_classifier(model: Model) -> bool:
  return getattr(model, 'task', 'lm') == 'classify'


def param_shapes(model: Model, seq_len: Optional[int] = None):
  """The model's param tree as ShapeDtypeStructs, without allocating.

  Args:
    model: a TransformerLM or EncoderClassifier.
    seq_len: L of the dummy [B, L] input; default: the MoE group_size if
      set, else 8. B = S / gcd(S, L) sequences, so that routing groups of S
      tokens divide the batch in either group order (B = k with
      group_sequences = k; 1 with WHOLE_BATCH). Param shapes do not depend
      on it.

  Returns:
    A nested dict of jax.ShapeDtypeStruct, like `model.init(...)['params']`.
  """
  moe = model.moe or {}
  group_size = moe.get('group_size')
  seq_len = seq_len or group_size or 8
  batch = group_size // math.gcd(group_size, seq_len) if group_size else 1
  k = moe.get('group_sequences')
  batch = k if k and k != grouping.WHOLE_BATCH else batch
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
  return variables['params']


def experts_per_token(moe, seq_len: int) -> float:
  """Mean number of (effective) experts that process one token.

  Args:
    moe: the model's MoeLayer kwargs (a mapping) or None.
    seq_len: L (Soft MoE groups default to one sequence).

  Returns:
    token choice: granularity * top_k (with null experts an upper bound;
    'relu': the target K; the realised mean of both is the
    `active_experts` metric); expert choice: granularity * cf (the
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
    s = grouping.group_tokens(moe.get('group_size'),
                              moe.get('group_sequences'), seq_len) or seq_len
    return m * moe['num_experts'] * moe.get('slots_per_expert', 1) / s
  return float(m * moe.get('top_k', 1))


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', k)) for k in path)


def param_breakdown(model: Model, seq_len: Optional[int] = None) -> dict:
  """Parameter counts by kind.

  Args:
    model: a TransformerLM or EncoderClassifier.
    seq_len: see `param_shapes`.

  Returns:
    dict of ints: 'total', 'active', 'embedding' (see module docstring),
    'norm' (RMSNorm scales), 'router' (router kernels: D * E per MoE
    block, D * E * C for Soft MoE), 'experts' (all expert weights),
    'classifier_head' (a classifier's head kernel and bias, else 0),
    'moe_layers' (count).
  """
  per_token = experts_per_token(model.moe, seq_len or 8)
  counts = dict(total=0, active=0, embedding=0, norm=0, router=0, experts=0,
                classifier_head=0)
  moe_blocks = set()
  leaves = jax.tree_util.tree_flatten_with_path(param_shapes(model, seq_len))
  for path, leaf in leaves[0]:
    names = _names(path)
    n = math.prod(leaf.shape)
    counts['total'] += n
    if names[0] == 'embed':
      counts['embedding'] += n
    if names[0] == 'head' and _is_classifier(model):
      counts['classifier_head'] += n
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


def count_params(model: Model, seq_len: Optional[int] = None) -> dict:
  """Total, active and embedding parameter counts.

  Args:
    model: a TransformerLM or EncoderClassifier.
    seq_len: see `param_shapes` (does not change the counts).

  Returns:
    {'total': int, 'active': int, 'embedding': int}; active counts each MoE
    block's router plus K / E of its expert weights, all else fully.
  """
  counts = param_breakdown(model, seq_len)
  return {k: counts[k] for k in ('total', 'active', 'embedding')}


def flops_per_token(model: Model, seq_len: int) -> int:
  """Training (forward + backward) FLOPs per token.

      3 * (2 * N_mm + 4 * N_layers * T * D + router + soft [+ head / T])

  with N_mm the active non-embedding matmul params (output projection
  counted once, tied or not); see the module docstring.

  Args:
    model: a TransformerLM or EncoderClassifier.
    seq_len: T, the training sequence length.

  Returns:
    int FLOPs per token (rounded for a classifier, whose head adds a
    fraction per token).
  """
  counts = param_breakdown(model, seq_len)
  matmul = (counts['active'] - counts['embedding'] - counts['norm'] -
            counts['router'] - counts['classifier_head'])
  if model.tie_embeddings:
    matmul += model.vocab_size * model.d_model
  attention = 4 * model.num_layers * seq_len * model.d_model
  router = 2 * counts['router']  # 2 * D * E (Soft MoE: * C) per MoE block
  soft = 0
  if (model.moe or {}).get('router') == 'soft_moe':
    soft = 2 * router  # dispatch + combine, 2 * D * E * C each
  head = 0.0
  if _is_classifier(model):  # [D, N] once per example
    head = 2 * model.d_model * model.num_classes / seq_len
  return round(3 * (2 * matmul + attention + router + soft + head))


def _human(n: float) -> str:
  """1234567 -> '1.23M'."""
  for unit, scale in (('T', 1e12), ('G', 1e9), ('M', 1e6), ('K', 1e3)):
    if abs(n) >= scale:
      return f'{n / scale:.3g}{unit}'
  return f'{n:.3g}'


def summary(model: Model, seq_len: int) -> str:
  """One line for the trainer to print at startup.

  Args:
    model: a TransformerLM or EncoderClassifier.
    seq_len: T, the training sequence length.

  Returns:
    e.g. 'params total 1.23M, active 0.45M (embedding 65.5K), training
    FLOPs/token 2.7M at seq_len 128, 2/4 MoE layers'; a classifier adds
    the FLOPs per example and ', encoder classifier of N classes'.
  """
  counts = param_breakdown(model, seq_len)
  flops = flops_per_token(model, seq_len)
  per_example, kind = '', ''
  if _is_classifier(model):
    per_example = f' ({_human(flops * seq_len)}/example)'
    kind = f', encoder classifier of {model.num_classes} classes'
  return (f'params total {_human(counts["total"])}, active '
          f'{_human(counts["active"])} (embedding '
          f'{_human(counts["embedding"])}), training FLOPs/token '
          f'{_human(flops)}{per_example} at seq_len {seq_len}, '
          f'{counts["moe_layers"]}/{model.num_layers} MoE layers{kind}')
