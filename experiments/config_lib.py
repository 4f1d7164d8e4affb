"""Config loading, overrides, validation and the builders of a run.

The model section (its keys, checks and `build_model`) lives in
`experiments.model_config`; its public names are re-exported here.

Everything here raises ValueError with a message naming the full config key
(e.g. `model.moe.top_k`), the bad value and what is allowed, before any
data is built or anything compiles. `experiments.train` turns these into
`error: <message>` and exit code 2. A work dir's stored config is compared
with a new run's in `experiments.workdir_config`.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import os
from typing import Any, Optional

import ml_collections

from configs import base as base_config
from experiments import finetune_setup
from experiments import model_config
from experiments.config_keys import call_in_file
from experiments.config_keys import first_line
from experiments.config_keys import flatten
from experiments.config_keys import is_int as _is_int
from experiments.config_keys import load_file
from experiments.config_keys import require as _require
# The model section's names, re-exported (they lived here first).
from experiments.model_config import DTYPES  # pylint: disable=unused-import
from experiments.model_config import MOE_LAYER_KEYS  # pylint: disable=unused-import
from experiments.model_config import build_model  # pylint: disable=unused-import
from experiments.model_config import config_value  # pylint: disable=unused-import
from experiments.model_config import model_overrides  # pylint: disable=unused-import
from experiments.model_config import model_vocab_size  # pylint: disable=unused-import
from experiments.model_config import moe_kwargs  # pylint: disable=unused-import
from experiments.model_config import vocab_size
from moejax import data as data_lib
from moejax import grouping
from moejax import sharding
from moejax.train import optim

BUILTIN_DATA = ('synthetic_mixture', 'local_text', 'python_stdlib')
# Corpora with fixed domain ids: data.name -> domain names (id order). The
# synthetic mixture's count is data.num_domains.
CORPUS_DOMAINS = {'python_stdlib': data_lib.STDLIB_DOMAINS}
SYNTHETIC_KEYS = ('num_domains', 'vocab_size', 'support', 'alpha', 'seed',
                  'example_len', 'num_train', 'num_eval')
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------ load, override
def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path[:arg]`: the file's `get_config(arg)`.

  Args:
    spec: e.g. 'configs/switch.py:tiny'; a relative path is tried from the
      working directory, then from the repository root.

  Returns:
    The ConfigDict.

  Raises:
    ValueError, one line naming the file: it does not exist, has a syntax
    error (with the line), raises when imported or in get_config (with the
    exception and the line), or get_config returns no ConfigDict.
  """
  path, _, arg = spec.partition(':')
  candidates = [path, os.path.join(_REPO_ROOT, path)]
  found = next((p for p in candidates if os.path.isfile(p)), None)
  if found is None:
    raise ValueError(f'--config file {path!r} does not exist.')
  module = load_file(found)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'--config file {found!r} has no get_config(arg).')
  config = call_in_file(found, module.get_config, arg or None)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f'--config file {found!r}: get_config({arg or None!r}) '
                     f'returned a {type(config).__name__}; allowed: an '
                     'ml_collections.ConfigDict.')
  return config


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


def _unknown_key(key: str, known: dict[str, Any]) -> None:
  close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
  hint = f' Did you mean {", ".join(close)}?' if close else ''
  raise ValueError(f'unknown config key {key!r}: it is not in the base '
                   f'config (configs/base.py).{hint}')


# ---------------------------------------------------------------- validation
def _type_name(kind, key: str = '') -> str:
  if kind is list and key in base_config.STRING_LISTS:
    return 'a list of strings'
  return {int: 'an int', float: 'a number', str: 'a string',
          bool: 'a bool', list: 'a list of ints'}.get(kind, kind.__name__)


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
    item = ((lambda v: isinstance(v, str)) if key in base_config.STRING_LISTS
            else _is_int)
    ok = isinstance(value, (list, tuple)) and all(map(item, value))
  elif kind is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  else:
    ok = isinstance(value, kind)
  if not ok:
    none = ' or None' if key in base_config.NULLABLE else ''
    raise ValueError(f'{key}={value!r} has the wrong type: expected '
                     f'{_type_name(kind, key)}{none}, got '
                     f'{type(value).__name__}.')


def _check_finite(key: str, value: Any) -> None:
  """Raises for a float that is inf or nan (e.g. `1e999` on the command
  line): no key takes one."""
  values = value if isinstance(value, (list, tuple)) else [value]
  if any(isinstance(v, float) and not math.isfinite(v) for v in values):
    none = ' or None' if key in base_config.NULLABLE else ''
    raise ValueError(f'{key}={value!r} is not allowed; allowed values: a '
                     f'finite number{none}.')


def check_keys_and_types(config: ml_collections.ConfigDict) -> None:
  """Every key of `config` is in the base config, with the base's type."""
  known = flatten(base_config.get_base_config().to_dict())
  given = flatten(config.to_dict())
  for key, value in given.items():
    if key not in known:
      _unknown_key(key, known)
    _check_type(key, value, known[key])
    _check_finite(key, value)
  missing = sorted(set(known) - set(given))
  if missing:
    raise ValueError(f'config key {missing[0]!r} is missing (every key of '
                     'configs/base.py must be set).')


def _check_train(config: ml_collections.ConfigDict) -> None:
  """Ranges of the train.* keys and the seed."""
  t = config.train
  _require('seed', config.seed, 0 <= config.seed < 2**32, '[0, 2**32)')
  for name in ('steps', 'batch_size', 'log_every', 'eval_every',
               'checkpoint_every', 'keep_checkpoints', 'eval_batches',
               'grad_accum_steps'):
    _require(f'train.{name}', t[name], t[name] >= 1, 'an int >= 1')
  _require('train.grad_accum_steps', t.grad_accum_steps,
           t.batch_size % t.grad_accum_steps == 0,
           f'a divisor of train.batch_size={t.batch_size}')
  _require('train.learning_rate', t.learning_rate, t.learning_rate > 0,
           'a number > 0')
  for name in ('warmup_steps', 'weight_decay', 'grad_clip'):
    _require(f'train.{name}', t[name], t[name] >= 0, '>= 0')
  # A warmup past the last step would be cut short (the schedule clamps it).
  _require('train.warmup_steps', t.warmup_steps, t.warmup_steps <= t.steps,
           f'an int in [0, train.steps={t.steps}]')
  for name in ('b1', 'b2'):
    _require(f'train.{name}', t[name], 0 <= t[name] < 1, '[0, 1)')
  _require('train.min_lr_ratio', t.min_lr_ratio, 0 <= t.min_lr_ratio <= 1,
           '[0, 1]')
  _require('train.master_weights', t.master_weights,
           not t.master_weights or config.model.param_dtype != 'float32',
           "False with model.param_dtype='float32' (there is nothing to "
           "keep a float32 copy of); True needs model.param_dtype="
           "'bfloat16'")


def _check_data(config: ml_collections.ConfigDict) -> None:
  """data.* keys: name, lengths against the stored length, split sizes."""
  d = config.data
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
    check_split_sizes(config, d.num_train, d.num_eval)
  _check_domains(config)
  if d.name == 'local_text':
    _require('data.pattern', d.pattern, bool(d.pattern),
             'a glob of text files (required for local_text)')
  if d.pad_id is not None:
    _require('data.pad_id', d.pad_id, 0 <= d.pad_id < vocab_size(config),
             f'None or a token id in [0, {vocab_size(config)})')


def _check_domains(config: ml_collections.ConfigDict) -> None:
  """data.domains: [] or distinct ids of a dataset with domain labels."""
  d = config.data
  domains = list(config_value(config, 'data.domains'))
  if d.name in CORPUS_DOMAINS:
    names = CORPUS_DOMAINS[d.name]
    count = len(names)
    where = (f'[0, {count}) of data.name={d.name!r} ('
             + ', '.join(f'{i} {n}' for i, n in enumerate(names)) + ')')
  else:
    count = d.num_domains if d.name == 'synthetic_mixture' else 0
    where = (f"[0, data.num_domains={d.num_domains}) of data.name="
             f"'synthetic_mixture' or of "
             + ', '.join(map(repr, CORPUS_DOMAINS)))
  _require('data.domains', domains, not domains or (
      count and len(set(domains)) == len(domains)
      and all(0 <= x < count for x in domains)),
      f'[] (all), or distinct domain ids in {where}')


def check_split_sizes(config: ml_collections.ConfigDict, num_train: int,
                      num_eval: int) -> None:
  """A train split of >= train.batch_size examples (fewer would repeat
  examples within a batch) and an eval split of >= train.eval_batches x
  train.batch_size; raises ValueError naming the keys.

  Args:
    config: the run config.
    num_train: examples of data.train_split (data.num_train for the
      synthetic mixture, else counted once loaded).
    num_eval: examples of data.eval_split.
  """
  t = config.train
  if num_train < t.batch_size:
    raise ValueError(
        f'{_split_size("train", num_train, config)} fewer than '
        f'train.batch_size={t.batch_size}; allowed values: train.batch_size '
        f'<= {num_train}, or more training examples.')
  needed = t.eval_batches * t.batch_size
  if num_eval < needed:
    raise ValueError(
        f'{_split_size("eval", num_eval, config)} too few for train.'
        f'eval_batches={t.eval_batches} x train.batch_size={t.batch_size}; '
        f'allowed values: >= {needed} eval examples, or fewer '
        'train.eval_batches.')


def _split_size(kind: str, num: int, config: ml_collections.ConfigDict) -> str:
  """'data.num_train=10 examples is' or "data.train_split='train' of
  data.name='local_text' (data.pattern='*.txt') holds 10 examples,"."""
  d = config.data
  if d.name == 'synthetic_mixture':
    return f'data.num_{kind}={num} examples is'
  key = 'train_split' if kind == 'train' else 'eval_split'
  pattern = (f' (data.pattern={d.pattern!r})' if d.name == 'local_text'
             else '')
  return (f'data.{key}={d[key]!r} of data.name={d.name!r}{pattern} holds '
          f'{num} examples,')


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
  finetune_setup.check_config(config)
  model_config.check_model(config)
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
  micro = t.get('grad_accum_steps', 1)
  rows = t.batch_size // micro  # one micro-batch is what is split
  shards = mesh['data'] * mesh['expert']
  if rows % shards:
    raise ValueError(
        f'train.grad_accum_steps={micro} makes micro-batches of '
        f'train.batch_size={t.batch_size} / {micro} = {rows} rows, which the '
        f'batch shards mesh.data * mesh.expert = {shards} do not divide; '
        f'allowed values: a train.grad_accum_steps dividing '
        f'{t.batch_size // shards}.')
  if expert_bank:
    s = grouping.group_tokens(moe.group_size, moe.get('group_sequences'),
                              d.seq_len, rows) or d.seq_len
    groups = -(-rows * d.seq_len // s)
    if moe.get('group_sequences') == grouping.WHOLE_BATCH and shards > 1:
      raise ValueError(
          f'model.moe.group_sequences=-1 makes one routing group of the '
          f'whole batch, which the batch shards mesh.data * mesh.expert = '
          f'{shards} cannot split; allowed: model.moe.group_sequences = a '
          f'divisor of {rows // shards} (the sequences of one batch shard), '
          'or None (one group per sequence).')
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
def build_optimizer(config: ml_collections.ConfigDict,
                    expert_rows: Optional[dict] = None):
  """AdamW + warmup-cosine + clipping from train.*, training what the
  finetune block says (moejax.train.finetune).

  Args:
    config: run config.
    expert_rows: ESFT's chosen experts ({layer path: expert ids};
      `finetune_setup.esft_rows` / `load_expert_rows`). With
      finetune.train_experts='topk_used' and None, no expert is chosen:
      right for param shapes, not for restoring a run's optimizer state.

  Returns:
    (optax GradientTransformation, learning-rate schedule).
  """
  t = config.train
  schedule = optim.lr_schedule(t.learning_rate, t.warmup_steps, t.steps,
                               t.min_lr_ratio)
  if (config.get('finetune') and expert_rows is None and
      config.finetune.train_experts == 'topk_used'):
    expert_rows = {}  # finetune_setup.plan: no layer restricted yet
  optimizer = optim.make_optimizer(
      t.learning_rate, t.warmup_steps, t.steps, weight_decay=t.weight_decay,
      grad_clip=t.grad_clip, b1=t.b1, b2=t.b2, min_lr_ratio=t.min_lr_ratio,
      plan=finetune_setup.plan(config, expert_rows),
      master_weights=t.master_weights)
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
  if d.name == 'python_stdlib':  # this interpreter's stdlib
    return {'example_len': d.example_len}
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
  rows = rows or slice(0, t.batch_size)
  local = rows.stop - rows.start  # block rows.start // local of B // local
  if local < 1 or rows.start % local or t.batch_size % local:
    raise ValueError(f'rows {rows.start}:{rows.stop} of the global batch '
                     f'(train.batch_size={t.batch_size}) are not one of '
                     'equal blocks; order the mesh devices by process.')
  part = dict(process_index=rows.start // local,
              process_count=t.batch_size // local)
  train, valid = _load_split(config, d.train_split), _load_split(
      config, d.eval_split)
  if config_value(config, 'data.domains'):
    train = data_lib.DomainSubset(train, d.domains)
    valid = data_lib.DomainSubset(valid, d.domains)
  check_split_sizes(config, len(train), len(valid))
  try:
    loader = data_lib.BatchLoader(train, batch_size=t.batch_size,
                                  seed=config.seed, seq_len=d.seq_len, **part)
    evals = data_lib.eval_batches(valid, batch_size=t.batch_size,
                                  num_batches=t.eval_batches,
                                  seq_len=d.seq_len, **part)
  except (RuntimeError, OSError, KeyError) as e:  # unreadable records
    raise ValueError(
        f'data.name={d.name!r} in data_dir {data_dir(config)!r} could not be '
        f'read ({type(e).__name__}: {first_line(e)}); allowed values: a '
        'readable dataset: prepare it again under data.data_dir.') from e
  return loader, evals


def _load_split(config: ml_collections.ConfigDict, split: str):
  """data_lib.load_source of one split; a corrupt synthetic / local_text
  cache is rebuilt there (or named: DataCacheError, a ValueError)."""
  d = config.data
  try:
    return data_lib.load_source(d.name, split, data_dir(config),
                                **_source_kwargs(config))
  except data_lib.DataCacheError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'data.name={d.name!r} could not be loaded from data_dir '
        f'{data_dir(config)!r} ({type(e).__name__}: {first_line(e)}); '
        f'allowed values: {", ".join(map(repr, BUILTIN_DATA))} or a TFDS '
        'dataset already prepared (as array_record) under data.data_dir.'
    ) from e


def resolved_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as a plain dict with data.data_dir (and a set
  init.from_workdir) resolved to absolute paths (config.json)."""
  out = config.to_dict()
  out['data']['data_dir'] = data_dir(config)
  if out.get('init', {}).get('from_workdir'):
    out['init']['from_workdir'] = os.path.abspath(out['init']['from_workdir'])
  # As config.json gives it back (a tuple, e.g. dense_layers, as a list).
  return json.loads(json.dumps(out))
