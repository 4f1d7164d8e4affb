"""The model section of a run config: its keys, their validation, and the
model they build (and back: the config values of a model).

Split from `experiments.config_lib` (which re-exports `build_model`,
`model_overrides`, `DTYPES`, ...). Errors name the full config key
(`model.num_kv_heads`), the bad value and what is allowed.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping, Optional

import jax.numpy as jnp
import ml_collections

from configs import base as base_config
from experiments.config_keys import flatten
from experiments.config_keys import is_int as _is_int
from experiments.config_keys import require as _require
from moejax import ACTIVATIONS
from moejax import grouping
from moejax.models import EncoderClassifier, TransformerLM
from moejax.models import mod as mod_lib

# float16 is left out: it would need loss scaling.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# model.moe keys passed to MoeLayer (the rest are loss weights / placement).
MOE_LAYER_KEYS = ('num_experts', 'top_k', 'capacity_factor',
                  'eval_capacity_factor', 'min_capacity',
                  'capacity_multiple_of', 'router', 'score_fn', 'dispatcher',
                  'priority', 'renormalize', 'routed_scaling',
                  'second_expert_policy', 'second_expert_threshold',
                  'jitter_eps', 'num_groups', 'topk_groups', 'group_score',
                  'bias_update_rate', 'selection_bias', 'aux_loss_scope',
                  'granularity',
                  'num_shared_experts', 'shared_d_ff', 'shared_gate',
                  'slots_per_expert', 'soft_normalize', 'relu_l1_alpha',
                  'relu_l1_init', 'relu_l1_balance', 'num_null_experts',
                  'group_size', 'group_sequences', 'group_order',
                  'allow_noncausal_routing')
TASKS = ('lm', 'classify')  # model.task: TransformerLM | EncoderClassifier
MLA_KEYS = ('q_lora_rank', 'kv_lora_rank', 'qk_nope_head_dim',
            'qk_rope_head_dim', 'v_head_dim')  # model.mla.<key>
# model.mod.<key>: Mixture-of-Depths (moejax.models.mod.ModOptions fields).
MOD_KEYS = ('every', 'capacity', 'predictor', 'predictor_hidden',
            'aux_weight', 'decisions')
# TransformerLM argument -> config key (the model a config describes;
# `vocab_size` is model.vocab_size there, see `model_overrides`).
MODEL_CONFIG_KEYS = {
    'num_layers': 'model.num_layers', 'd_model': 'model.d_model',
    'num_heads': 'model.num_heads', 'd_ff': 'model.d_ff',
    'activation': 'model.activation',
    'tie_embeddings': 'model.tie_embeddings', 'rope_base': 'model.rope_base',
    'moe_every': 'model.moe.moe_every',
    'first_dense_layers': 'model.moe.first_dense_layers',
    'dense_layers': 'model.moe.dense_layers',
    'dense_d_ff': 'model.dense_d_ff',
    'rope_interleave': 'model.rope_interleave',
    'norm_eps': 'model.norm_eps', 'num_kv_heads': 'model.num_kv_heads',
    'head_dim': 'model.head_dim', 'qk_norm': 'model.qk_norm',
    'attn_bias': 'model.attn_bias', 'attention': 'model.attention',
    'sliding_window': 'model.sliding_window',
}
# Decoder-only options (TransformerLM, not EncoderClassifier).
DECODER_KEYS = ('model.num_kv_heads', 'model.head_dim', 'model.qk_norm',
                'model.attn_bias', 'model.norm_eps', 'model.rope_interleave',
                'model.attention', 'model.dense_d_ff', 'model.sliding_window',
                'model.moe.dense_layers') + tuple(
                    f'model.mla.{k}' for k in MLA_KEYS) + tuple(
                        f'model.mod.{k}' for k in MOD_KEYS)
# The argument a model error names -> config key (MoeLayer arguments:
# model.moe.<arg>; 'bias' is AttentionOptions' name for attn_bias).
MODEL_ARG_KEYS = {
    **MODEL_CONFIG_KEYS, 'vocab_size': 'data.vocab_size',
    'bias': 'model.attn_bias', **{k: f'model.mla.{k}' for k in MLA_KEYS},
}


def _config_key(name: str) -> Optional[str]:
  """The config key of a TransformerLM / MoeLayer argument name, if any."""
  if name in MODEL_ARG_KEYS:
    return MODEL_ARG_KEYS[name]
  if name in MOE_LAYER_KEYS:
    return f'model.moe.{name}'
  return None


def _prefixed(error: ValueError) -> ValueError:
  """Renames the arguments a model error names to their config keys:
  'top_k=5 must be <= num_experts=4' -> 'model.moe.top_k=5 must be <=
  model.moe.num_experts=4'; errors not about an argument get 'model: '."""
  message = str(error)
  match = re.match(r'[A-Za-z_][A-Za-z0-9_]*', message)  # e.g. relu_l1_alpha
  name = match.group(0) if match else ''
  if _config_key(name) is None:
    return ValueError(f'model: {message}')
  rest = re.sub(r"(?<![\w.'])([A-Za-z_][A-Za-z0-9_]*)(?==)",
                lambda m: _config_key(m.group(1)) or m.group(1),
                message[len(name):])
  return ValueError(_config_key(name) + rest)


def check_model(config: ml_collections.ConfigDict) -> None:
  """model.* keys, by building TransformerLM (and so its MoeLayers);
  raises ValueError naming the first bad key."""
  m, d, t = config.model, config.data, config.train
  for key in ('dtype', 'param_dtype'):
    _require(f'model.{key}', m[key], m[key] in DTYPES,
             ', '.join(map(repr, DTYPES)))
  _require('model.activation', m.activation, m.activation in ACTIVATIONS,
           ', '.join(map(repr, ACTIVATIONS)))
  _require('model.task', m.task, m.task in TASKS, ', '.join(map(repr, TASKS)))
  if m.task == 'classify' and d.name != 'synthetic_mixture':
    raise ValueError(
        f"model.task='classify' predicts each example's domain id, which "
        f'data.name={d.name!r} does not have; allowed values with '
        "model.task='classify': data.name='synthetic_mixture'.")
  moe = m.moe
  _require('model.moe.num_experts', moe.num_experts, moe.num_experts >= 0,
           '0 (dense) or an int >= 1')
  _check_decoder(config)
  _check_mod(config)
  _check_dense_moe_keys(config)
  try:
    model = build_model(config)
  except ValueError as e:
    raise _prefixed(e) from e
  if moe.num_experts and not model.moe_layers:
    dense = (f' and model.moe.dense_layers={list(moe.dense_layers)}'
             if moe.dense_layers else '')
    raise ValueError(
        f'model.moe.first_dense_layers={moe.first_dense_layers} with '
        f'model.moe.moe_every={moe.moe_every}{dense} leaves no MoE layer '
        f'among model.num_layers={m.num_layers}; allowed values: '
        'model.moe.first_dense_layers + model.moe.moe_every <= '
        f'{m.num_layers}{" with fewer dense_layers" if dense else ""}, or '
        'model.moe.num_experts=0 for a dense model.')
  if moe.num_experts:
    _check_groups(config, model)
  for name in ('aux_loss_weight', 'z_loss_weight'):
    _require(f'model.moe.{name}', moe[name], moe[name] >= 0, '>= 0')
  if (moe.num_experts and moe.second_expert_policy == 'random' and
      moe.top_k < 2):
    raise ValueError(
        f"model.moe.second_expert_policy='random' drops 2nd-and-later "
        f'expert choices, but model.moe.top_k={moe.top_k} makes none; '
        "allowed values: 'all' with top_k=1, or model.moe.top_k >= 2.")


def _check_groups(config: ml_collections.ConfigDict, model) -> None:
  """model.moe.group_size / group_sequences / group_order against the
  batch, for every row length the model's MoE layers see (L, and Lc in
  Mixture-of-Depths blocks): groups divide it, 'position' groups hold
  whole sequences, and the causal LM refuses a layout that lets a token
  see later positions (moejax.grouping)."""
  moe = config.model.moe
  k = moe.group_sequences
  if k is not None:
    _require('model.moe.group_sequences', k,
             _is_int(k) and (k >= 1 or k == grouping.WHOLE_BATCH),
             'None (one group per sequence), an int >= 1, or -1 (one group '
             'of the whole batch)')
  try:
    grouping.group_tokens(moe.group_size, k, 1, 1)
  except ValueError as e:
    raise _prefixed(e) from e
  for length, where in _moe_row_lengths(config, model):
    _check_group_rows(config, length, where)


def _moe_row_lengths(config: ml_collections.ConfigDict, model):
  """(length, description) of the rows the MoE layers see: data.seq_len,
  and Lc in the MoD blocks that route the top-Lc tokens (moejax.models.mod:
  decisions='topk', their MoE FFN sees [B, Lc] rows)."""
  seq_len = config.data.seq_len
  lengths = []
  mod = getattr(model, 'mod', None)
  mod_layers = (set(mod.layers(model.num_layers))
                if mod is not None and mod.decisions == 'topk' else set())
  if set(model.moe_layers) - mod_layers:
    lengths.append((seq_len, ''))
  if set(model.moe_layers) & mod_layers:
    lc = mod_lib.capacity_tokens(mod.capacity, seq_len)
    lengths.append((lc, f" in the Mixture-of-Depths blocks, whose MoE FFN "
                        f"sees only the Lc={lc} selected tokens of a "
                        f"sequence (model.mod.capacity={mod.capacity})"))
  return lengths


def _check_group_rows(config: ml_collections.ConfigDict, length: int,
                      where: str) -> None:
  """The group layout of one row length (see _check_groups)."""
  moe, t = config.model.moe, config.train
  micro = config_value(config, 'train.grad_accum_steps')
  rows = t.batch_size // micro
  tokens = rows * length
  k = moe.group_sequences
  batch = (f'{"micro-" if micro > 1 else ""}batch (train.batch_size='
           f'{t.batch_size}' + (f' / train.grad_accum_steps={micro} '
                                'micro-batches' if micro > 1 else ''))
  if k == grouping.WHOLE_BATCH and micro > 1:
    raise ValueError(
        f'model.moe.group_sequences=-1 makes one routing group of the whole '
        f'batch, but train.grad_accum_steps={micro} runs micro-batches of '
        f'{rows} sequences, each of which would be its own group (the '
        'accumulated step would not be the whole-batch step); allowed: '
        f'model.moe.group_sequences = a divisor of {rows}, or '
        'train.grad_accum_steps=1.')
  if k is not None and k != grouping.WHOLE_BATCH and rows % k:
    raise ValueError(
        f'model.moe.group_sequences={k} does not divide the {rows} '
        f'sequences of a {batch}); allowed values: None or a divisor of '
        f'{rows}.')
  group_size = grouping.group_tokens(moe.group_size, k, length, rows)
  if group_size and tokens % group_size:
    also = (f'; or model.moe.group_sequences (groups of whole sequences, '
            f'k * {length} tokens here)' if where else '')
    raise ValueError(
        f'model.moe.group_size={group_size} does not divide the {tokens} '
        f'tokens of a {batch} x {"Lc" if where else "data.seq_len"}='
        f'{length}){where}; allowed values: None or a divisor of '
        f'{tokens}{also}.')
  try:
    leak = grouping.causal_group_leak(group_size, moe.group_order, length)
  except ValueError as e:
    raise ValueError(f'{_prefixed(e).args[0][:-1]}{where}.') from e
  if (leak and config.model.task == 'lm' and
      not moe.allow_noncausal_routing):
    text = _prefixed(ValueError(leak)).args[0]
    if k:
      text = text.replace(f'model.moe.group_size={group_size}',
                          f'model.moe.group_sequences={k} (S={group_size} '
                          'tokens)', 1)
    raise ValueError(
        f'{text}{where}, which the '
        "causal LM must not see; allowed: model.moe.group_order='position' "
        f'with group_size a multiple of {length} (or group_sequences), or '
        f'a group_size dividing {length} (or '
        'model.moe.allow_noncausal_routing=True).')


def _check_decoder(config: ml_collections.ConfigDict) -> None:
  """The decoder options: model.vocab_size against the data's V, RoPE's
  even head width, MLA sizes only with MLA, a window covering data.seq_len,
  and none of them on the encoder classifier."""
  m, d = config.model, config.data
  if m.vocab_size is not None:
    _require('model.vocab_size', m.vocab_size, m.vocab_size >= 1,
             "None (the data's vocabulary) or an int >= 1")
    if m.vocab_size < vocab_size(config):
      source = (f'data.vocab_size={d.vocab_size}'
                if d.name == 'synthetic_mixture' else
                f'the 256 byte values of data.name={d.name!r}')
      raise ValueError(
          f'model.vocab_size={m.vocab_size} is smaller than the data\'s '
          f'vocabulary ({source}): its token ids must be < the model\'s; '
          f'allowed values: model.vocab_size >= {vocab_size(config)} or '
          'None, or a smaller data.vocab_size.')
  if m.task == 'classify':
    _require_defaults(config, DECODER_KEYS,
                      "applies to model.task='lm' only (the encoder "
                      'classifier has no such option)', "model.task='lm'")
  if m.attention != 'mla':
    _require_defaults(config, [f'model.mla.{k}' for k in MLA_KEYS],
                      'sizes multi-head latent attention, but '
                      f'model.attention={m.attention!r}',
                      "model.attention='mla'")
  if (m.attention == 'mha' and m.head_dim is None and m.num_heads >= 1 and
      m.d_model % m.num_heads == 0 and (m.d_model // m.num_heads) % 2):
    raise ValueError(
        f'model.d_model={m.d_model} with model.num_heads={m.num_heads} gives '
        f'an odd head width {m.d_model // m.num_heads}, but RoPE needs an '
        'even one; allowed values: model.d_model a multiple of 2 x '
        f'model.num_heads = {2 * m.num_heads}.')
  window = m.sliding_window
  if _is_int(window) and 1 <= window < d.seq_len:
    raise ValueError(
        f'model.sliding_window={window} is shorter than data.seq_len='
        f'{d.seq_len}; moejax implements only windows that cover the whole '
        f'sequence; allowed values: None or an int >= {d.seq_len}.')


def _check_mod(config: ml_collections.ConfigDict) -> None:
  """model.mod.*: the Mixture-of-Depths options (when every >= 1)."""
  get = lambda k: config_value(config, f'model.mod.{k}')
  every = get('every')
  _require('model.mod.every', every, _is_int(every) and every >= 0,
           '0 (off) or an int >= 1 (block i is MoD iff (i + 1) % every == 0)')
  if every == 0:  # off: a changed option would silently do nothing
    _require_defaults(config, [f'model.mod.{k}' for k in MOD_KEYS
                               if k != 'every'],
                      'applies only to Mixture-of-Depths blocks, and '
                      'model.mod.every=0 makes none',
                      'model.mod.every >= 1')
    return
  capacity = get('capacity')
  _require('model.mod.capacity', capacity,
           isinstance(capacity, (int, float)) and
           not isinstance(capacity, bool) and 0 < capacity <= 1,
           'a number in (0, 1] (the fraction of a sequence each MoD block '
           'processes)')
  hidden = get('predictor_hidden')
  _require('model.mod.predictor_hidden', hidden,
           _is_int(hidden) and hidden >= 1, 'an int >= 1')
  for key, allowed in (('predictor', ('mlp', 'router')),
                       ('decisions', ('topk', 'predictor'))):
    _require(f'model.mod.{key}', get(key), get(key) in allowed,
             ', '.join(map(repr, allowed)))
  weight = get('aux_weight')
  _require('model.mod.aux_weight', weight,
           isinstance(weight, (int, float)) and
           not isinstance(weight, bool) and weight >= 0, 'a number >= 0')
  if every > config.model.num_layers:
    raise ValueError(
        f'model.mod.every={every} makes no block an MoD block among '
        f'model.num_layers={config.model.num_layers}; allowed values: 0 '
        f'(off) or an int in [1, {config.model.num_layers}].')


def mod_kwargs(config: ml_collections.ConfigDict) -> Optional[dict]:
  """TransformerLM's `mod` mapping from model.mod.*, None when off."""
  if not config_value(config, 'model.mod.every'):
    return None
  return {k: config_value(config, f'model.mod.{k}') for k in MOD_KEYS}


def _require_defaults(config: ml_collections.ConfigDict, keys, why: str,
                      alternative: str) -> None:
  """Raises for the first of `keys` not at its base default."""
  for key in keys:
    value, default = config_value(config, key), _base_defaults()[key]
    if _normalized(value) != _normalized(default):
      raise ValueError(f'{key}={value!r} {why}; allowed values: the '
                       f'default {default!r}, or {alternative}.')


def _check_dense_moe_keys(config: ml_collections.ConfigDict) -> None:
  """A dense model (num_experts=0) must leave the MoE-only keys at their
  defaults: a set one would silently do nothing."""
  moe = config.model.moe
  if moe.num_experts != 0:
    return
  defaults = base_config.get_base_config().model.moe
  for key in defaults:
    if key != 'num_experts' and (_normalized(moe[key]) !=
                                 _normalized(defaults[key])):
      raise ValueError(
          f'model.moe.{key}={moe[key]!r} is an MoE-only setting, but '
          'model.moe.num_experts=0 makes a dense model where it would do '
          f'nothing; allowed values: the default {defaults[key]!r}, or set '
          'model.moe.num_experts >= 1.')


def vocab_size(config: ml_collections.ConfigDict) -> int:
  """V: data.vocab_size for synthetic data, 256 (bytes) otherwise."""
  if config.data.name == 'synthetic_mixture':
    return config.data.vocab_size
  return 256


def moe_kwargs(config: ml_collections.ConfigDict) -> Optional[dict]:
  """MoeLayer keyword args from model.moe, or None for a dense model."""
  moe = config.model.moe
  if moe.num_experts == 0:
    return None
  # A key missing from an older config.json keeps the MoeLayer default.
  kwargs = {k: moe[k] for k in MOE_LAYER_KEYS if k in moe}
  if config.get('finetune') and config.finetune.get('freeze_bias'):
    # The bias stops moving but still steers the selection (same state).
    kwargs.update(bias_update_rate=0.0, selection_bias=True)
  return kwargs


@functools.lru_cache(maxsize=1)
def _base_defaults() -> dict[str, Any]:
  """The base config's defaults, {dotted key: value} (do not mutate)."""
  return flatten(base_config.get_base_config().to_dict())


def _normalized(value: Any) -> Any:
  """A tuple as a list: the form config.json gives back."""
  return list(value) if isinstance(value, tuple) else value


def config_value(config: ml_collections.ConfigDict, key: str) -> Any:
  """config's value of a dotted key, or the base default for a key that an
  older config.json lacks (such a run used the default)."""
  node = config
  for part in key.split('.'):
    if not isinstance(node, (dict, ml_collections.ConfigDict)) or (
        part not in node):
      return _base_defaults()[key]
    node = node[part]
  return node


def model_vocab_size(config: ml_collections.ConfigDict) -> int:
  """The model's V: model.vocab_size, or the data's (`vocab_size`)."""
  value = config_value(config, 'model.vocab_size')
  return vocab_size(config) if value is None else value


def _decoder_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """TransformerLM's decoder options from their config keys."""
  kwargs = {arg: config_value(config, key)
            for arg, key in MODEL_CONFIG_KEYS.items()
            if key in DECODER_KEYS}
  kwargs['dense_layers'] = tuple(kwargs['dense_layers'])
  kwargs['norm_eps'] = float(kwargs['norm_eps'])
  kwargs['mla'] = ({k: config_value(config, f'model.mla.{k}')
                    for k in MLA_KEYS}
                   if kwargs['attention'] == 'mla' else None)
  kwargs['mod'] = mod_kwargs(config)
  return kwargs


def build_model(config: ml_collections.ConfigDict):
  """The model of a config (raises its ValueErrors unprefixed).

  Keys an older config.json lacks take their base default.

  Args:
    config: run config.

  Returns:
    An (unbound) TransformerLM (model.task='lm'), or an EncoderClassifier
    of the data's domain ids (model.task='classify').
  """
  m = config.model
  common = dict(
      num_layers=m.num_layers, d_model=m.d_model, num_heads=m.num_heads,
      d_ff=m.d_ff, vocab_size=model_vocab_size(config),
      activation=m.activation, moe=moe_kwargs(config),
      moe_every=m.moe.moe_every, first_dense_layers=m.moe.first_dense_layers,
      rope_base=float(m.rope_base), dtype=DTYPES[m.dtype],
      param_dtype=DTYPES[m.param_dtype])
  if m.get('task', 'lm') == 'classify':
    if _lora_kwargs(config):
      raise ValueError(
          f'finetune.lora_rank={config.finetune.lora_rank} is not allowed '
          "with model.task='classify'; allowed values: 0, or model.task="
          "'lm'.")
    return EncoderClassifier(**common, num_classes=config.data.num_domains)
  return TransformerLM(**common, tie_embeddings=m.tie_embeddings,
                       **_decoder_kwargs(config), **_lora_kwargs(config))


def _lora_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """TransformerLM's LoRA arguments from finetune.* ({} without adapters)."""
  f = config.get('finetune')
  if f is None or not f.get('lora_rank', 0):
    return {}
  return dict(lora_rank=f.lora_rank, lora_alpha=float(f.lora_alpha),
              lora_targets=tuple(f.lora_targets))


def model_overrides(kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """Config values describing a TransformerLM: the inverse of build_model.

  Args:
    kwargs: TransformerLM keyword arguments (e.g. from
      `moejax.interop.hf_config.model_kwargs`); dtype / param_dtype, if
      present, are left out.

  Returns:
    {dotted config key: value} for every model.* key but model.dtype and
    model.param_dtype: the base default where `kwargs` says nothing (so
    model.task='lm', the loss weights 0.01 / 0.0, the mla block unused for
    attention='mha').

  Raises:
    ValueError: an argument that no config key holds.
  """
  out = {key: _normalized(value) for key, value in _base_defaults().items()
         if key.startswith('model.') and
         key not in ('model.dtype', 'model.param_dtype')}
  for arg, value in kwargs.items():
    if arg in ('dtype', 'param_dtype'):
      continue
    if arg == 'vocab_size':
      out['model.vocab_size'] = value
    elif arg == 'moe':
      out.update({f'model.moe.{k}': _normalized(v)
                  for k, v in dict(value or {'num_experts': 0}).items()})
    elif arg == 'mla':
      out.update({f'model.mla.{k}': v for k, v in dict(value or {}).items()})
    elif arg in MODEL_CONFIG_KEYS:
      out[MODEL_CONFIG_KEYS[arg]] = _normalized(value)
    else:
      raise ValueError(f'TransformerLM argument {arg!r} has no config key.')
  unknown = sorted(k for k in out if k not in _base_defaults())
  if unknown:
    raise ValueError(f'{unknown[0]} is not a config key (a MoeLayer option '
                     'the config does not hold).')
  return out


