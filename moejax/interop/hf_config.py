"""Hugging Face `config.json` <-> `TransformerLM` keyword arguments.

One table of HF keys per family, no model code per family: every supported
family is the one TransformerLM with options (moejax.models.transformer)
and MoeLayers in their dropless, token-choice form (capacity_factor and
eval_capacity_factor None: every token reaches its K experts, as in HF).

Families (HF `model_type`):
  mixtral      softmax top-K, always renormalised; GQA.
  qwen2_moe    softmax top-K (norm_topk_prob); a sigmoid-gated shared expert;
               q/k/v biases; dense blocks (mlp_only_layers,
               decoder_sparse_step) of width intermediate_size.
  qwen3_moe    as qwen2_moe without shared expert and biases, with q/k
               RMSNorm per head and an explicit head_dim.
  olmoe        softmax top-K; q/k RMSNorm over the whole projection.
  deepseek_v3  MLA; sigmoid scores, a fixed selection bias
               (e_score_correction_bias), group-limited selection by the
               sum of a group's top-2, renormalised, routed scaling; shared
               experts; first_k_dense_replace dense blocks; interleaved RoPE.
  deepseek_v2  as deepseek_v3 with softmax scores, no bias, groups scored by
               their best expert (group_limited_greedy), never renormalised.
An option a family has but moejax does not implement (RoPE scaling, a
sliding window shorter than the sequence, tied embeddings, QKV clipping,
...) is refused by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

FAMILIES = ('mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'deepseek_v3',
            'deepseek_v2')
ARCHITECTURES = {
    'mixtral': 'MixtralForCausalLM', 'qwen2_moe': 'Qwen2MoeForCausalLM',
    'qwen3_moe': 'Qwen3MoeForCausalLM', 'olmoe': 'OlmoeForCausalLM',
    'deepseek_v3': 'DeepseekV3ForCausalLM',
    'deepseek_v2': 'DeepseekV2ForCausalLM'}
# MoeLayer settings every imported model uses: dropless token choice.
DROPLESS = dict(capacity_factor=None, eval_capacity_factor=None,
                router='topk', dispatcher='gather', priority='choice')


class UnsupportedConfigError(ValueError):
  """A config.json that moejax cannot represent exactly."""


def _get(hf: Mapping[str, Any], key: str, default: Any = None,
         required: bool = False) -> Any:
  if required and hf.get(key) is None:
    raise UnsupportedConfigError(
        f'config.json of model_type {hf.get("model_type")!r} lacks the key '
        f'{key!r}.')
  value = hf.get(key)
  return default if value is None else value


def _refuse(hf: Mapping[str, Any], key: str, allowed, why: str) -> None:
  """Raises unless hf[key] (missing = None) is one of `allowed`."""
  value = hf.get(key)
  if value not in allowed:
    raise UnsupportedConfigError(
        f'config.json has {key}={value!r}, which moejax does not implement '
        f'({why}); allowed values: {", ".join(map(repr, allowed))}.')


def rope_theta(hf: Mapping[str, Any]) -> float:
  """rope_theta from the top level or `rope_parameters` (transformers 5);
  refuses any RoPE scaling."""
  params = hf.get('rope_parameters') or {}
  scaling = hf.get('rope_scaling') or {}
  for source in (params, scaling):
    kind = source.get('rope_type', source.get('type', 'default'))
    if kind not in ('default', None):
      raise UnsupportedConfigError(
          f'config.json sets rope_type={kind!r} (RoPE scaling), which moejax'
          " does not implement; allowed values: 'default'.")
  theta = hf.get('rope_theta', params.get('rope_theta'))
  if theta is None:
    raise UnsupportedConfigError('config.json has no rope_theta (neither at '
                                 'the top level nor in rope_parameters).')
  return float(theta)


def _common(hf: Mapping[str, Any]) -> dict[str, Any]:
  """Keys every family shares."""
  _refuse(hf, 'hidden_act', ('silu',), 'the experts are SwiGLU')
  _refuse(hf, 'tie_word_embeddings', (False, None),
          "moejax's tied head scales logits by 1/sqrt(D)")
  d, h = _get(hf, 'hidden_size', required=True), _get(
      hf, 'num_attention_heads', required=True)
  kv = _get(hf, 'num_key_value_heads', h)
  head_dim = hf.get('head_dim')
  return dict(
      num_layers=_get(hf, 'num_hidden_layers', required=True), d_model=d,
      num_heads=h, vocab_size=_get(hf, 'vocab_size', required=True),
      activation='swiglu', tie_embeddings=False, rope_base=rope_theta(hf),
      norm_eps=float(_get(hf, 'rms_norm_eps', 1e-6)),
      num_kv_heads=None if kv == h else kv,
      head_dim=None if head_dim in (None, d // h) else head_dim)


def _softmax_moe(hf, experts_key: str, renormalize: bool) -> dict[str, Any]:
  return dict(DROPLESS, num_experts=_get(hf, experts_key, required=True),
              top_k=_get(hf, 'num_experts_per_tok', required=True),
              score_fn='softmax', renormalize=renormalize)


def _mixtral(hf) -> dict[str, Any]:
  out = _common(hf)
  window = hf.get('sliding_window')
  out.update(d_ff=_get(hf, 'intermediate_size', required=True),
             sliding_window=window or None,
             moe=_softmax_moe(hf, 'num_local_experts', True))
  return out


def _qwen(hf, qk_norm: str) -> dict[str, Any]:
  """qwen2_moe (qk_norm 'none') and qwen3_moe ('head')."""
  _refuse(hf, 'use_sliding_window', (False, None), 'no sliding window')
  if qk_norm == 'head':
    _refuse(hf, 'attention_bias', (False, None), 'Qwen3 biases also on '
            'o_proj')
  out = _common(hf)
  experts_key = ('num_experts' if 'num_experts' in hf else
                 'num_local_experts')
  moe = _softmax_moe(hf, experts_key, bool(hf.get('norm_topk_prob')))
  shared = hf.get('shared_expert_intermediate_size') or 0
  if shared:
    moe.update(num_shared_experts=1, shared_d_ff=shared, shared_gate=True)
  bias = hf.get('qkv_bias', hf.get('attention_bias', qk_norm == 'none'))
  out.update(d_ff=_get(hf, 'moe_intermediate_size', required=True),
             dense_d_ff=_get(hf, 'intermediate_size', required=True),
             moe_every=_get(hf, 'decoder_sparse_step', 1),
             dense_layers=tuple(hf.get('mlp_only_layers') or ()),
             qk_norm=qk_norm, attn_bias=bool(bias), moe=moe)
  return out


def _olmoe(hf) -> dict[str, Any]:
  _refuse(hf, 'clip_qkv', (None,), 'no QKV clipping')
  _refuse(hf, 'attention_bias', (False, None), 'OLMoE biases also on o_proj')
  out = _common(hf)
  out.update(d_ff=_get(hf, 'intermediate_size', required=True),
             qk_norm='full',
             moe=_softmax_moe(hf, 'num_experts',
                              bool(hf.get('norm_topk_prob'))))
  return out


def _deepseek(hf, version: int) -> dict[str, Any]:
  """deepseek_v3 (version 3) and deepseek_v2 (2)."""
  _refuse(hf, 'attention_bias', (False, None), 'MLA without biases')
  _refuse(hf, 'moe_layer_freq', (1, None), 'every block after the dense '
          'ones is MoE')
  out = _common(hf)
  out.update(num_kv_heads=None, head_dim=None)
  n_group = _get(hf, 'n_group', 1)
  moe = dict(DROPLESS, num_experts=_get(hf, 'n_routed_experts', required=True),
             top_k=_get(hf, 'num_experts_per_tok', required=True),
             routed_scaling=float(_get(hf, 'routed_scaling_factor', 1.0)),
             num_groups=n_group,
             topk_groups=_get(hf, 'topk_group', n_group))
  if version == 3:
    moe.update(score_fn='sigmoid', selection_bias=True,
               renormalize=bool(hf.get('norm_topk_prob')))
  else:
    _refuse(hf, 'topk_method', ('greedy', 'group_limited_greedy'),
            'DeepSeek-V2 top-k methods')
    moe.update(score_fn='softmax', renormalize=False, group_score='max')
    if hf.get('topk_method') == 'greedy':
      moe.update(num_groups=1, topk_groups=None)
  shared = _get(hf, 'n_shared_experts', 0)
  if shared:
    moe.update(num_shared_experts=shared,
               shared_d_ff=_get(hf, 'moe_intermediate_size', required=True))
  out.update(
      d_ff=_get(hf, 'moe_intermediate_size', required=True),
      dense_d_ff=_get(hf, 'intermediate_size', required=True),
      first_dense_layers=_get(hf, 'first_k_dense_replace', 0),
      attention='mla', rope_interleave=bool(hf.get('rope_interleave', True)),
      mla=dict(q_lora_rank=hf.get('q_lora_rank'),
               kv_lora_rank=_get(hf, 'kv_lora_rank', required=True),
               qk_nope_head_dim=_get(hf, 'qk_nope_head_dim', required=True),
               qk_rope_head_dim=_get(hf, 'qk_rope_head_dim', required=True),
               v_head_dim=_get(hf, 'v_head_dim', required=True)),
      moe=moe)
  return out


def model_kwargs(hf: Mapping[str, Any]) -> dict[str, Any]:
  """TransformerLM keyword arguments of an HF config.json.

  Args:
    hf: the parsed config.json.

  Returns:
    kwargs for `TransformerLM(**kwargs)` (dtype / param_dtype not set).

  Raises:
    UnsupportedConfigError: an unsupported model_type, or an option of a
      supported family that moejax cannot reproduce exactly (named).
  """
  family = hf.get('model_type')
  builders = {
      'mixtral': _mixtral, 'qwen2_moe': lambda c: _qwen(c, 'none'),
      'qwen3_moe': lambda c: _qwen(c, 'head'), 'olmoe': _olmoe,
      'deepseek_v3': lambda c: _deepseek(c, 3),
      'deepseek_v2': lambda c: _deepseek(c, 2)}
  if family not in builders:
    raise UnsupportedConfigError(
        f'config.json model_type={family!r} is not supported; allowed '
        f'values: {", ".join(map(repr, FAMILIES))}.')
  return builders[family](hf)


# ------------------------------------------------------------------ export
def family_of(model) -> str:
  """The HF family a TransformerLM maps onto, from its options.

  Raises:
    UnsupportedConfigError naming what keeps it from every family.
  """
  moe = dict(model.moe or {})
  if not moe:
    raise UnsupportedConfigError(
        'a dense model (moe=None) maps onto no supported MoE family.')
  if model.attention == 'mla':
    return 'deepseek_v3' if moe.get('score_fn') == 'sigmoid' else 'deepseek_v2'
  if model.qk_norm == 'full':
    return 'olmoe'
  if model.qk_norm == 'head':
    return 'qwen3_moe'
  if moe.get('shared_gate') or model.attn_bias:
    return 'qwen2_moe'
  return 'mixtral'


def _moe_setting(moe: Mapping[str, Any], key: str) -> Any:
  """moe[key], or MoeLayer's default for it."""
  from moejax.layers import MoeLayer  # pylint: disable=import-outside-toplevel
  if key in moe:
    return moe[key]
  return {f.name: f.default for f in dataclasses.fields(MoeLayer)}[key]


def _moe_problems(model, family: str) -> list[str]:
  """Why the model's options differ from what HF `family` computes."""
  moe = dict(model.moe)
  expected = {'capacity_factor': None, 'eval_capacity_factor': None,
              'router': 'topk', 'granularity': 1, 'jitter_eps': 0.0,
              'num_null_experts': 0,  # HF families have no null experts
              'score_fn': 'sigmoid' if family == 'deepseek_v3' else 'softmax'}
  if family == 'mixtral':
    expected['renormalize'] = True
  if family == 'deepseek_v2':
    expected.update(renormalize=False, group_score='max')
  if family in ('mixtral', 'olmoe', 'qwen3_moe'):
    expected['num_shared_experts'] = 0
  problems = [f'moe.{key}={_moe_setting(moe, key)!r} ({family} needs '
              f'{value!r})' for key, value in expected.items()
              if _moe_setting(moe, key) != value]
  if model.activation != 'swiglu':
    problems.append(f'activation={model.activation!r} (HF: swiglu)')
  if model.tie_embeddings:
    problems.append('tie_embeddings=True (HF families here are untied)')
  return problems


def _placement(model, family: str) -> dict[str, Any]:
  """HF keys for which blocks are dense."""
  moe_layers = set(model.moe_layers)
  dense = [i for i in range(model.num_layers) if i not in moe_layers]
  if family.startswith('deepseek'):
    first = model.first_dense_layers
    if dense != list(range(first)) or model.moe_every != 1:
      raise UnsupportedConfigError(
          f'{family} needs the dense blocks first (first_k_dense_replace); '
          f'this model has dense blocks {dense}.')
    return dict(first_k_dense_replace=first, moe_layer_freq=1)
  if family.startswith('qwen'):
    step = model.moe_every if model.first_dense_layers == 0 else 1
    by_step = {i for i in range(model.num_layers) if (i + 1) % step}
    return dict(decoder_sparse_step=step,
                mlp_only_layers=sorted(set(dense) - by_step))
  if dense:
    raise UnsupportedConfigError(
        f'{family} has no dense blocks; this model has dense blocks {dense}.')
  return {}


def hf_config(model, dtype: str = 'float32') -> dict[str, Any]:
  """The HF config.json of a TransformerLM that maps onto a family.

  Args:
    model: a TransformerLM.
    dtype: the weights' dtype name written as `torch_dtype` / `dtype`.

  Returns:
    The config dict (model_type, architectures, the family's keys).

  Raises:
    UnsupportedConfigError listing every option that does not map.
  """
  family = family_of(model)
  problems = _moe_problems(model, family)
  if problems:
    raise UnsupportedConfigError(
        f'the model does not map exactly onto HF {family}: ' +
        '; '.join(problems) + '.')
  moe = dict(model.moe)
  out = dict(
      architectures=[ARCHITECTURES[family]], model_type=family,
      vocab_size=model.vocab_size, hidden_size=model.d_model,
      num_hidden_layers=model.num_layers,
      num_attention_heads=model.num_heads,
      num_key_value_heads=model.num_kv_heads or model.num_heads,
      hidden_act='silu', rms_norm_eps=model.norm_eps,
      rope_theta=model.rope_base, tie_word_embeddings=False,
      num_experts_per_tok=moe['top_k'], dtype=dtype, torch_dtype=dtype,
      max_position_embeddings=model.sliding_window or 4096)
  out.update(_placement(model, family))
  out.update(_FAMILY_EXPORT[family](model, moe))
  return out


def _export_mixtral(model, moe) -> dict[str, Any]:
  return dict(num_local_experts=moe['num_experts'],
              intermediate_size=model.d_ff,
              sliding_window=model.sliding_window, router_jitter_noise=0.0,
              head_dim=model.head_dim or model.d_model // model.num_heads)


def _export_qwen(model, moe) -> dict[str, Any]:
  out = dict(num_experts=moe['num_experts'],
             moe_intermediate_size=model.d_ff,
             intermediate_size=model.dense_d_ff or model.d_ff,
             norm_topk_prob=bool(moe.get('renormalize', False)),
             use_sliding_window=False, sliding_window=None)
  if model.qk_norm == 'head':
    out.update(head_dim=model.head_dim or model.d_model // model.num_heads,
               attention_bias=model.attn_bias)
  else:
    out.update(qkv_bias=model.attn_bias,
               shared_expert_intermediate_size=(
                   moe.get('num_shared_experts', 0) *
                   (moe.get('shared_d_ff') or model.d_ff)))
  return out


def _export_olmoe(model, moe) -> dict[str, Any]:
  return dict(num_experts=moe['num_experts'], intermediate_size=model.d_ff,
              norm_topk_prob=bool(moe.get('renormalize', False)),
              clip_qkv=None, attention_bias=False)


def _export_deepseek(model, moe) -> dict[str, Any]:
  mla = dict(model.mla)
  groups = moe.get('num_groups', 1)
  out = dict(
      n_routed_experts=moe['num_experts'], moe_intermediate_size=model.d_ff,
      intermediate_size=model.dense_d_ff or model.d_ff,
      n_shared_experts=moe.get('num_shared_experts', 0) or None,
      routed_scaling_factor=moe.get('routed_scaling', 1.0), n_group=groups,
      topk_group=moe.get('topk_groups') or groups,
      norm_topk_prob=bool(moe.get('renormalize', False)),
      rope_interleave=model.rope_interleave, attention_bias=False,
      qk_head_dim=mla['qk_nope_head_dim'] + mla['qk_rope_head_dim'],
      head_dim=mla['qk_rope_head_dim'], **mla)
  if moe.get('score_fn') != 'sigmoid':
    out.update(topk_method='group_limited_greedy', scoring_func='softmax')
  return out


_FAMILY_EXPORT = {
    'mixtral': _export_mixtral, 'qwen2_moe': _export_qwen,
    'qwen3_moe': _export_qwen, 'olmoe': _export_olmoe,
    'deepseek_v3': _export_deepseek, 'deepseek_v2': _export_deepseek}


def describe(kwargs: Mapping[str, Any], family: Optional[str] = None) -> str:
  """One line about an imported model's shape, for logs."""
  moe = kwargs.get('moe') or {}
  return (f'{family or "model"}: {kwargs["num_layers"]} layers, D='
          f'{kwargs["d_model"]}, H={kwargs["num_heads"]}, V='
          f'{kwargs["vocab_size"]}, E={moe.get("num_experts")}, K='
          f'{moe.get("top_k")}, attention={kwargs.get("attention", "mha")}')
