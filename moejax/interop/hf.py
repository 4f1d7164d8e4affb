"""Hugging Face MoE checkpoints in and out: `load_pretrained`, `save_pretrained`.

    model, variables = load_pretrained('path/to/Mixtral-dir')
    logits, aux = model.apply(variables, tokens)          # [B, L, V]
    save_pretrained(model, variables, 'out-dir')          # HF layout

A model directory holds `config.json` and `model.safetensors`, or shards
listed by `model.safetensors.index.json`. Reading uses the `safetensors`
package's numpy API (no torch), one tensor at a time: the host holds at
most one link's tensors (e.g. one layer's experts) besides the params
already placed, never two copies of the model. With `mesh`, every leaf goes
straight to its sharding (`moejax.sharding` rules) as it is read.

Config mapping: `moejax.interop.hf_config` (families, refused options).
Tensor names: `moejax.interop.hf_params` (per family, per-expert or fused
expert layouts). Transforms are transposes, reshapes, stacks and splits, so
import -> export reproduces the original tensors bit for bit (dtypes kept:
a router stored in bfloat16 is float32 in moejax and bfloat16 again on
export) and export -> import reproduces the moejax variables.

Errors (`HfCheckpointError`, a ValueError) name the file, the tensor or the
config key: a missing or unexpected tensor, a shape that does not fit
config.json, an unsupported model_type or option.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from moejax import sharding
from moejax.interop import hf_config
from moejax.interop import hf_params
from moejax.models.transformer import TransformerLM

CONFIG = 'config.json'
SINGLE = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class HfCheckpointError(ValueError):
  """A model directory that cannot be read as the model it claims to be."""


def read_config(path: str) -> dict[str, Any]:
  """The parsed config.json of a model directory."""
  file = os.path.join(path, CONFIG)
  if not os.path.isdir(path):
    raise HfCheckpointError(f'{path!r} is not a directory (a Hugging Face '
                            'model directory with config.json).')
  try:
    with open(file, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise HfCheckpointError(f'{file}: cannot be read as JSON ({e}).') from e


class TensorReader:
  """Tensor-by-tensor reads from `model.safetensors` or indexed shards."""

  def __init__(self, path: str):
    self.path = path
    self.files = self._weight_map()

  def _weight_map(self) -> dict[str, str]:
    """{tensor name: file name}."""
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    index = os.path.join(self.path, INDEX)
    if os.path.exists(index):
      try:
        with open(index, encoding='utf-8') as f:
          weight_map = json.load(f)['weight_map']
      except (OSError, ValueError, KeyError) as e:
        raise HfCheckpointError(f'{index}: not a safetensors index with a '
                                f'weight_map ({e}).') from e
      for file in sorted(set(weight_map.values())):
        if not os.path.exists(os.path.join(self.path, file)):
          raise HfCheckpointError(f'{index} lists {file!r}, which is not in '
                                  f'{self.path}.')
      return dict(weight_map)
    single = os.path.join(self.path, SINGLE)
    if not os.path.exists(single):
      raise HfCheckpointError(f'{self.path} has neither {SINGLE} nor {INDEX} '
                              '(only safetensors checkpoints are read).')
    with safe_open(single, framework='np') as f:
      return {name: SINGLE for name in f.keys()}

  @property
  def names(self) -> list[str]:
    return sorted(self.files)

  def get(self, name: str) -> np.ndarray:
    """One tensor as a numpy array (a copy: the file is closed again, so
    its mapped pages do not stay resident as the model loads)."""
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    with safe_open(os.path.join(self.path, self.files[name]),
                   framework='np') as f:
      return f.get_tensor(name)

  def dtype(self) -> Any:
    """The dtype of the embedding table (the checkpoint's weight dtype)."""
    name = 'model.embed_tokens.weight'
    return self.get(name).dtype if name in self.files else np.float32


def _param_dtype(reader: TensorReader, param_dtype) -> Any:
  if param_dtype is not None:
    return param_dtype
  kind = np.dtype(reader.dtype()).name
  # float16 is stored as float32 (exact): moejax trains in f32 or bf16.
  return jnp.bfloat16 if kind == 'bfloat16' else jnp.float32


def abstract_variables(model: TransformerLM) -> dict:
  """The model's variables as ShapeDtypeStructs (nothing allocated)."""
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), tokens)


def _leaf_paths(tree, prefix=()) -> Iterator[tuple]:
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _leaf_paths(value, prefix + (key,))
    else:
      yield prefix + (key,)


def _check_names(links, reader: TensorReader, num_layers: int) -> None:
  """Every link's tensors present; no tensor left over."""
  wanted = set()
  for link in links:
    for name in link.hf:
      if name not in reader.files:
        raise HfCheckpointError(
            f'{reader.path}: the checkpoint lacks tensor {name!r}, which '
            f'config.json implies (for moejax {"/".join(link.jax[0])}).')
      wanted.add(name)
  extra = sorted(n for n in reader.files if n not in wanted and
                 not hf_params.ignorable(n, num_layers))
  if extra:
    more = f' (and {len(extra) - 3} more)' if len(extra) > 3 else ''
    raise HfCheckpointError(
        f'{reader.path}: unexpected tensor {extra[0]!r}'
        f'{", " + ", ".join(map(repr, extra[1:3])) if extra[1:] else ""}'
        f'{more}: config.json implies no such weight (an option moejax '
        'does not convert?).')


def _check_coverage(links, abstract: dict) -> None:
  covered = [p for link in links for p in link.jax]
  leaves = set(_leaf_paths(abstract))
  if sorted(covered) != sorted(leaves):
    missing = sorted(leaves - set(covered))
    raise AssertionError(f'tensor table does not cover {missing[:3]} '
                         f'(or covers a leaf twice)')  # a moejax bug


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def build_model(hf: Mapping[str, Any], dtype=None, param_dtype=jnp.float32,
                ) -> TransformerLM:
  """The TransformerLM of an HF config (ValueErrors as HfCheckpointError)."""
  try:
    kwargs = hf_config.model_kwargs(hf)
    return TransformerLM(**kwargs, dtype=dtype or param_dtype,
                         param_dtype=param_dtype)
  except ValueError as e:
    raise HfCheckpointError(f'config.json: {e}') from e


def load_pretrained(path: str, *, mesh: Optional[jax.sharding.Mesh] = None,
                    dtype=None, param_dtype=None):
  """Reads an HF MoE checkpoint as a moejax TransformerLM and its variables.

  Args:
    path: model directory (config.json + model.safetensors or an index).
    mesh: place each leaf onto this mesh with `moejax.sharding`'s rules as
      it is read (None: the default device).
    dtype: compute dtype (default: param_dtype).
    param_dtype: storage dtype (default: the checkpoint's; float16 files
      become float32).

  Returns:
    (model, variables): `model.apply(variables, tokens [B, L])` gives the HF
    model's logits [B, L, V]. variables = {'params': ..., and 'moe_state'
    with DeepSeek-V3's fixed selection bias}.

  Raises:
    HfCheckpointError naming the file, tensor or config key.
  """
  hf = read_config(path)
  reader = TensorReader(path)
  model = build_model(hf, dtype, _param_dtype(reader, param_dtype))
  abstract = abstract_variables(model)
  links = hf_params.links(model, hf['model_type'],
                          fused=hf_params.is_fused(reader.names))
  _check_coverage(links, abstract)
  _check_names(links, reader, model.num_layers)
  shardings = (sharding.tree_shardings(abstract, mesh) if mesh is not None
               else None)
  get_abstract = hf_params.leaf_getter(abstract)
  variables = {}
  for link in links:
    arrays = [reader.get(name) for name in link.hf]
    shapes = [get_abstract(p).shape for p in link.jax]
    try:
      leaves = hf_params.to_moejax(link, arrays, shapes)
    except ValueError as e:
      raise HfCheckpointError(f'{path}: {e}') from e
    for p, leaf in zip(link.jax, leaves):
      leaf = leaf.astype(get_abstract(p).dtype, copy=False)
      target = (hf_params.leaf_getter(shardings)(p) if shardings else None)
      _set(variables, p, jax.device_put(leaf, target))
    del arrays, leaves
  return model, variables


def _export_dtype(path: tuple, leaf: np.ndarray, model: TransformerLM):
  """Routers are float32 in moejax; on export they take the weights' dtype
  (the dtype the HF checkpoint stores them in)."""
  if path[-2:] == ('router', 'kernel'):
    return np.dtype(model.param_dtype)
  return leaf.dtype


def save_pretrained(model: TransformerLM, variables: Mapping[str, Any],
                    path: str, fused_experts: bool = False,
                    max_shard_bytes: Optional[int] = None) -> list[str]:
  """Writes an HF model directory: config.json + safetensors.

  Args:
    model: a TransformerLM whose options map onto one HF family
      (`hf_config.hf_config` says which, or why none).
    variables: its variables ({'params': ..., 'moe_state': ...}).
    path: output directory (created).
    fused_experts: write experts as `experts.gate_up_proj` /
      `experts.down_proj` (transformers 5's module layout) instead of the
      per-expert layout of released checkpoints.
    max_shard_bytes: split into `model-0000i-of-0000n.safetensors` files
      of at most this size plus an index (None: one file).

  Returns:
    The file names written.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  config = hf_config.hf_config(model, np.dtype(model.param_dtype).name)
  get = hf_params.leaf_getter(variables)
  tensors = {}
  for link in hf_params.links(model, config['model_type'], fused_experts):
    leaves = []
    for p in link.jax:
      leaf = np.asarray(jax.device_get(get(p)))
      leaves.append(leaf.astype(_export_dtype(p, leaf, model)))
    tensors.update(zip(link.hf, hf_params.to_hf(link, leaves)))
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG), 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2, sort_keys=True)
  shards = _shards(tensors, max_shard_bytes)
  if len(shards) == 1:
    save_file(tensors, os.path.join(path, SINGLE), metadata={'format': 'pt'})
    return [CONFIG, SINGLE]
  weight_map, names = {}, []
  for i, shard in enumerate(shards):
    name = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    save_file({k: tensors[k] for k in shard}, os.path.join(path, name),
              metadata={'format': 'pt'})
    weight_map.update({k: name for k in shard})
    names.append(name)
  total = sum(t.nbytes for t in tensors.values())
  with open(os.path.join(path, INDEX), 'w', encoding='utf-8') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map},
              f, indent=2, sort_keys=True)
  return [CONFIG, INDEX] + names


def _shards(tensors: Mapping[str, np.ndarray],
            max_bytes: Optional[int]) -> list[list[str]]:
  """Tensor names split into consecutive groups of at most max_bytes."""
  if max_bytes is None:
    return [list(tensors)]
  shards, size = [[]], 0
  for name, t in tensors.items():
    if shards[-1] and size + t.nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += t.nbytes
  return shards
