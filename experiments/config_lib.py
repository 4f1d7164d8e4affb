"""Config loading, overrides, validation and the builders of a run.

Everything here raises ValueError with a message naming the full config key
(e.g. `model.moe.top_k`), the bad value and what is allowed, before any
data is built or anything compiles. `experiments.train` turns these into
`error: <message>` and exit code 2. A work dir's stored config is compared
with a new run's in `experiments.workdir_config`.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import json
import math
import os
import re
from typing import Any, Mapping, Optional

import jax.numpy as jnp
import ml_collections

from configs import base as base_config
from moejax import ACTIVATIONS
from moejax import data as data_lib
from moejax import sharding
from moejax.models import EncoderClassifier, TransformerLM
from moejax.train import optim

# float16 is left out: it would need loss scaling.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
BUILTIN_DATA = ('synthetic_mixture', 'local_text')
SYNTHETIC_KEYS = ('num_domains', 'vocab_size', 'support', 'alpha', 'seed',
                  'example_len', 'num_train', 'num_eval')
# model.moe keys passed to MoeLayer (the rest are loss weights / placement).
MOE_LAYER_KEYS = ('num_experts', 'top_k', 'capacity_factor',
                  'eval_capacity_factor', 'min_capacity',
                  'capacity_multiple_of', 'router', 'score_fn', 'dispatcher',
                  'priority', 'renormalize', 'routed_scaling',
                  'second_expert_policy', 'second_expert_threshold',
                  'jitter_eps', 'num_groups', 'topk_groups', 'group_score',
                  'bias_update_rate', 'selection_bias', 'granularity',
                  'num_shared_experts', 'shared_d_ff', 'shared_gate',
                  'slots_per_expert', 'soft_normalize', 'group_size',
                  'allow_noncausal_routing')
TASKS = ('lm', 'classify')  # model.task: TransformerLM | EncoderClassifier
MLA_KEYS = ('q_lora_rank', 'kv_lora_rank', 'qk_nope_head_dim',
            'qk_rope_head_dim', 'v_head_dim')  # model.mla.<key>
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
                    f'model.mla.{k}' for k in MLA_KEYS)
# The argument a model error names -> config key (MoeLayer arguments:
# model.moe.<arg>; 'bias' is AttentionOptions' name for attn_bias).
MODEL_ARG_KEYS = {
    **MODEL_CONFIG_KEYS, 'vocab_size': 'data.vocab_size',
    'bias': 'model.attn_bias', **{k: f'model.mla.{k}' for k in MLA_KEYS},
}
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------ load, override
def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path[:arg]`: the file's `get_config(arg)`.

  Args:
    spec: e.g. 'configs/switch.py:tiny'; a relative path is tried from the
      working directory, then from the repository root.

  Returns:
    The ConfigDict.
  """
  path, _, arg = spec.partition(':')
  candidates = [path, os.path.join(_REPO_ROOT, path)]
  found = next((p for p in candidates if os.path.isfile(p)), None)
  if found is None:
    raise ValueError(f'--config file {path!r} does not exist.')
  name = 'moejax_config_' + re.sub(r'\W', '_', os.path.basename(found)[:-3])
  module_spec = importlib.util.spec_from_file_location(name, found)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'--config file {found!r} has no get_config(arg).')
  return module.get_config(arg or None)


def parse_value(text: str) -> Any:
  """Command-line text -> Python value ('none' -> None, 'true' -> True,
  Python literals via ast.literal_eval, anything else stays a string)."""
  low = text.strip().lower()
  if low in ('none', 'null'):
    return None
  if low in ('true', 'false'):
    return low == 'true'
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys ('model.moe.top_k') to values; keys must exist.

  Args:
    config: the loaded config.
    overrides: {dotted key: value}.

  Returns:
    A new ConfigDict (types are checked later by validate_config).
  """
  tree = config.to_dict()
  for key, value in overrides.items():
    node, parts = tree, key.split('.')
    for i, part in enumerate(parts):
      if not isinstance(node, dict) or part not in node:
        _unknown_key(key, flatten(config.to_dict()))
      if i == len(parts) - 1:
        node[part] = value
      node = node[part]
  return ml_collections.ConfigDict(tree)


def flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1} (dicts are recursed into, not leaves)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out.update(flatten(dict(value), f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _unknown_key(key: str, known: dict[str, Any]) -> None:
  close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
  hint = f' Did you mean {", ".join(close)}?' if close else ''
  raise ValueError(f'unknown config key {key!r}: it is not in the base '
                   f'config (configs/base.py).{hint}')


# ---------------------------------------------------------------- validation
def _type_name(kind) -> str:
  return {int: 'an int', float: 'a number', str: 'a string',
          bool: 'a bool', list: 'a list of ints'}.get(kind, kind.__name__)


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_type(key: str, value: Any, default: Any) -> None:
  """Raises unless `value` has the type of the base default `default`."""
  kind = base_config.NULLABLE.get(key, type(default))
  if value is None and key in base_config.NULLABLE:
    return
  if kind is bool:
    ok = isinstance(value, bool)
  elif kind is int:
    ok = _is_int(value)
  elif kind is list:  # JSON and ConfigDict give lists; a literal may be ()
    ok = isinstance(value, (list, tuple)) and all(map(_is_int, value))
  elif kind is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  else:
    ok = isinstance(value, kind)
  if not ok:
    none = ' or None' if key in base_config.NULLABLE else ''
    raise ValueError(f'{key}={value!r} has the wrong type: expected '
                     f'{_type_name(kind)}{none}, got {type(value).__name__}.')


def check_keys_and_types(config: ml_collections.ConfigDict) -> None:
  """Every key of `config` is in the base config, with the base's type."""
  known = flatten(base_config.get_base_config().to_dict())
  given = flatten(config.to_dict())
  for key, value in given.items():
    if key not in known:
      _unknown_key(key, known)
    _check_type(key, value, known[key])
  missing = sorted(set(known) - set(given))
  if missing:
    raise ValueError(f'config key {missing[0]!r} is missing (every key of '
                     'configs/base.py must be set).')


def _require(key: str, value: Any, ok: bool, allowed: str) -> None:
  if not ok:
    raise ValueError(f'{key}={value!r} is not allowed; allowed values: '
                     f'{allowed}.')


def _check_train(config: ml_collections.ConfigDict) -> None:
  """Ranges of the train.* keys and the seed."""
  t = config.train
  _require('seed', config.seed, 0 <= config.seed < 2**32, '[0, 2**32)')
  for name in ('steps', 'batch_size', 'log_every', 'eval_every',
               'checkpoint_every', 'keep_checkpoints', 'eval_batches'):
    _require(f'train.{name}', t[name], t[name] >= 1, 'an int >= 1')
  _require('train.learning_rate', t.learning_rate, t.learning_rate > 0,
           'a number > 0')
  for name in ('warmup_steps', 'weight_decay', 'grad_clip'):
    _require(f'train.{name}', t[name], t[name] >= 0, '>= 0')
  for name in ('b1', 'b2'):
    _require(f'train.{name}', t[name], 0 <= t[name] < 1, '[0, 1)')
  _require('train.min_lr_ratio', t.min_lr_ratio, 0 <= t.min_lr_ratio <= 1,
           '[0, 1]')


def _check_data(config: ml_collections.ConfigDict) -> None:
  """data.* keys: name, lengths against the stored length, split sizes."""
  d, t = config.data, config.train
  _require('data.name', d.name, bool(d.name.strip()),
           f'{", ".join(map(repr, BUILTIN_DATA))} or a prepared TFDS name')
  _require('data.seq_len', d.seq_len, d.seq_len >= 1, 'an int >= 1')
  if d.seq_len + 1 > d.example_len:
    raise ValueError(
        f'data.seq_len={d.seq_len} needs seq_len + 1 = {d.seq_len + 1} tokens'
        f' per example, but the stored example length data.example_len is '
        f'{d.example_len}; allowed values: data.seq_len <= '
        f'{d.example_len - 1}, or raise data.example_len.')
  if d.name == 'synthetic_mixture':
    try:
      data_lib.synthetic_mixture_config(
          **{k: d[k] for k in SYNTHETIC_KEYS})
    except ValueError as e:
      raise ValueError(f'data (synthetic_mixture): {e}') from e
    needed = t.eval_batches * t.batch_size
    if d.num_eval < needed:
      raise ValueError(
          f'data.num_eval={d.num_eval} is too small for train.eval_batches='
          f'{t.eval_batches} x train.batch_size={t.batch_size}; allowed '
          f'values: data.num_eval >= {needed}.')
  if d.name == 'local_text':
    _require('data.pattern', d.pattern, bool(d.pattern),
             'a glob of text files (required for local_text)')
  if d.pad_id is not None:
    _require('data.pad_id', d.pad_id, 0 <= d.pad_id < vocab_size(config),
             f'None or a token id in [0, {vocab_size(config)})')


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
  match = re.match(r'[A-Za-z_]+', message)
  name = match.group(0) if match else ''
  if _config_key(name) is None:
    return ValueError(f'model: {message}')
  rest = re.sub(r"(?<![\w.'])([A-Za-z_]+)(?==)",
                lambda m: _config_key(m.group(1)) or m.group(1),
                message[len(name):])
  return ValueError(_config_key(name) + rest)


def _check_model(config: ml_collections.ConfigDict) -> None:
  """model.* keys, by building TransformerLM (and so its MoeLayers)."""
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
  tokens = t.batch_size * d.seq_len
  if moe.num_experts and moe.group_size and tokens % moe.group_size:
    raise ValueError(
        f'model.moe.group_size={moe.group_size} does not divide the {tokens} '
        f'tokens of a batch (train.batch_size={t.batch_size} x data.seq_len='
        f'{d.seq_len}); allowed values: None or a divisor of {tokens}.')
  for name in ('aux_loss_weight', 'z_loss_weight'):
    _require(f'model.moe.{name}', moe[name], moe[name] >= 0, '>= 0')
  if (moe.num_experts and moe.second_expert_policy == 'random' and
      moe.top_k < 2):
    raise ValueError(
        f"model.moe.second_expert_policy='random' drops 2nd-and-later "
        f'expert choices, but model.moe.top_k={moe.top_k} makes none; '
        "allowed values: 'all' with top_k=1, or model.moe.top_k >= 2.")


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


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks a whole config; raises ValueError naming the first bad key.

  Covers unknown / missing keys, types, train ranges, data (name, seq_len
  against data.example_len, split sizes) and the model and MoE arguments
  (through TransformerLM / MoeLayer's own validation). Nothing is built or
  compiled.

  Args:
    config: the run config.
  """
  check_keys_and_types(config)
  _check_train(config)
  _check_data(config)
  _check_model(config)
  _check_distributed(config)
  if -1 not in mesh_sizes(config):  # else: after the devices are known
    check_mesh_fit(config, mesh_sizes(config))


# ---------------------------------------------------- mesh and processes
def mesh_sizes(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(mesh.data, mesh.expert, mesh.model) as set (-1 not resolved).

  Raises:
    ValueError naming the key: a size not an int >= 1 or -1, two -1s.
  """
  sizes = tuple(config.mesh[a] for a in sharding.MESH_AXES)
  # Validates the values; the device count only matters for a -1.
  fixed = math.prod(v for v in sizes if isinstance(v, int) and v > 0)
  sharding.resolve_mesh_shape(*sizes, num_devices=fixed)
  return sizes


def check_mesh_fit(config: ml_collections.ConfigDict,
                   shape: tuple[int, int, int]) -> None:
  """Checks the batch and the experts against a (Pd, Pe, Pm) mesh shape.

  B (`train.batch_size`) and the MoE layers' group count G = B * L / S
  must split over the Pd * Pe batch shards; E (`model.moe.num_experts` x
  `granularity`) must be a divisor or a multiple of Pe. The ragged and
  per_token dispatchers run without expert parallelism, so only B is
  checked there.

  Args:
    config: the run config.
    shape: resolved mesh sizes (no -1).

  Raises:
    ValueError naming the keys and the allowed values.
  """
  mesh = dict(zip(sharding.MESH_AXES, shape))
  t, d, moe = config.train, config.data, config.model.moe
  expert_bank = moe.num_experts and (
      moe.dispatcher not in ('ragged', 'per_token') or
      moe.router == 'soft_moe')
  experts = moe.num_experts * moe.granularity
  if expert_bank:  # E first: its message is the most specific
    try:
      sharding.check_moe_mesh(mesh, experts)
    except ValueError as e:
      if moe.granularity == 1:
        raise
      raise ValueError(f'{e} (model.moe.granularity={moe.granularity}: E = '
                       f'{moe.num_experts} x {moe.granularity} = {experts} '
                       'fine-grained experts)') from e
  sharding.check_batch_size(mesh, t.batch_size)
  if expert_bank:
    groups = -(-t.batch_size * d.seq_len // (moe.group_size or d.seq_len))
    sharding.check_moe_mesh(mesh, experts, groups)


def _check_distributed(config: ml_collections.ConfigDict) -> None:
  """distributed.*: ranges, 'host:port', nothing set that would be unused."""
  dist = config.distributed
  n, pid = dist.num_processes, dist.process_id
  address = dist.coordinator_address
  if n is not None:
    _require('distributed.num_processes', n, n >= 1, 'None or an int >= 1')
  if pid is not None:
    allowed = f'None or an int in [0, {n})' if n else 'None or an int >= 0'
    _require('distributed.process_id', pid, pid >= 0 and (n is None or
                                                          pid < n), allowed)
  if address is not None:
    host, _, port = address.rpartition(':')
    _require('distributed.coordinator_address', address,
             bool(host) and port.isdigit() and 0 < int(port) < 65536,
             "None or 'host:port' of process 0, e.g. '10.0.0.1:1234'")
  if (n is not None or pid is not None) and not (dist.initialize or address):
    key = 'num_processes' if n is not None else 'process_id'
    raise ValueError(
        f'distributed.{key}={n if n is not None else pid} is set but '
        'jax.distributed is not started; allowed: also set '
        "distributed.coordinator_address='host:port' (process 0's) or "
        'distributed.initialize=True, or leave it None for one process.')


def uses_distributed(config: ml_collections.ConfigDict) -> bool:
  """Whether the run calls jax.distributed.initialize (see configs/base)."""
  dist = config.distributed
  return bool(dist.initialize or dist.coordinator_address)


# ------------------------------------------------------------------ builders
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
  return {k: moe[k] for k in MOE_LAYER_KEYS if k in moe}


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
    return EncoderClassifier(**common, num_classes=config.data.num_domains)
  return TransformerLM(**common, tie_embeddings=m.tie_embeddings,
                       **_decoder_kwargs(config))


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


def build_optimizer(config: ml_collections.ConfigDict):
  """AdamW + warmup-cosine + clipping from train.*.

  Args:
    config: run config.

  Returns:
    (optax GradientTransformation, learning-rate schedule).
  """
  t = config.train
  schedule = optim.lr_schedule(t.learning_rate, t.warmup_steps, t.steps,
                               t.min_lr_ratio)
  optimizer = optim.make_optimizer(
      t.learning_rate, t.warmup_steps, t.steps, weight_decay=t.weight_decay,
      grad_clip=t.grad_clip, b1=t.b1, b2=t.b2, min_lr_ratio=t.min_lr_ratio)
  return optimizer, schedule


def data_dir(config: ml_collections.ConfigDict) -> str:
  """data.data_dir, or ~/tensorflow_datasets when None."""
  return os.path.expanduser(config.data.data_dir or '~/tensorflow_datasets')


def _source_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  d = config.data
  if d.name == 'synthetic_mixture':
    return {k: d[k] for k in SYNTHETIC_KEYS}
  if d.name == 'local_text':
    return {'pattern': d.pattern, 'example_len': d.example_len}
  return {'text_key': d.text_key, 'example_len': d.example_len,
          'pad': d.pad_id or 0}


def build_data(config: ml_collections.ConfigDict,
               rows: Optional[slice] = None):
  """Builds (offline, if needed) the data and returns the loaders.

  Args:
    config: run config.
    rows: the rows of every global batch this process loads (see
      `sharding.process_batch_rows`), one of B / (stop - start) equal
      blocks; None: all of them.

  Returns:
    (BatchLoader of the train split, list of train.eval_batches eval
    batches of the eval split); batches hold 'tokens' [b, seq_len + 1],
    b = B or the number of `rows`.
  """
  d, t = config.data, config.train
  kwargs = _source_kwargs(config)
  rows = rows or slice(0, t.batch_size)
  local = rows.stop - rows.start  # block rows.start // local of B // local
  if local < 1 or rows.start % local or t.batch_size % local:
    raise ValueError(f'rows {rows.start}:{rows.stop} of the global batch '
                     f'(train.batch_size={t.batch_size}) are not one of '
                     'equal blocks; order the mesh devices by process.')
  part = dict(process_index=rows.start // local,
              process_count=t.batch_size // local)
  try:
    train = data_lib.load_source(d.name, d.train_split, data_dir(config),
                                 **kwargs)
    valid = data_lib.load_source(d.name, d.eval_split, data_dir(config),
                                 **kwargs)
    loader = data_lib.BatchLoader(train, batch_size=t.batch_size,
                                  seed=config.seed, seq_len=d.seq_len, **part)
    evals = data_lib.eval_batches(valid, batch_size=t.batch_size,
                                  num_batches=t.eval_batches,
                                  seq_len=d.seq_len, **part)
  except Exception as e:  # pylint: disable=broad-except
    first_line = (str(e).strip().splitlines() or [''])[0]
    raise ValueError(
        f'data.name={d.name!r} could not be loaded from data_dir '
        f'{data_dir(config)!r} ({type(e).__name__}: {first_line}); allowed '
        f'values: {", ".join(map(repr, BUILTIN_DATA))} or a TFDS dataset '
        'already prepared (as array_record) under data.data_dir.') from e
  return loader, evals


def resolved_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as a plain dict with data.data_dir (and a set
  init.from_workdir) resolved to absolute paths (config.json)."""
  out = config.to_dict()
  out['data']['data_dir'] = data_dir(config)
  if out.get('init', {}).get('from_workdir'):
    out['init']['from_workdir'] = os.path.abspath(out['init']['from_workdir'])
  # As config.json gives it back (a tuple, e.g. dense_layers, as a list).
  return json.loads(json.dumps(out))
