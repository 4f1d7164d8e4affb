"""Device mesh, param / batch shardings (expert parallelism: re-exported
from moejax.expert_parallel).

Axis letters: B batch, G groups, E experts, C capacity, D model width,
F expert hidden width, N rows of one expert (groups x slots). Mesh axis
sizes: Pd = 'data', Pe = 'expert', Pm = 'model'.

Mesh. `make_mesh(data, expert, model)` (config keys `mesh.data`,
`mesh.expert`, `mesh.model`; one may be -1) builds a Mesh with Auto axis
types: GSPMD partitions everything outside the expert-parallel region.
`check_moe_mesh` / `check_batch_size` validate a model against a mesh; all
raise ValueError before anything compiles.

Layout. One Flax logical-axis rules table, `LOGICAL_AXIS_RULES`:

    batch       -> ('data', 'expert')   batch and groups: data parallel
    expert      -> 'expert'             E of the expert weights
    expert_mlp  -> 'model'              F of the expert weights
    mlp, heads  -> 'model'              dense FFN hidden, attention heads
                                        (Megatron style; GSPMD adds the
                                        all-reduces)
    embed, vocab, kv, norm -> replicated

A param's logical axes come from its path (`PARAM_LOGICAL_AXES`: the
trailing names of the param trees in layers.py, models/transformer.py), so
modules need no annotations and optimizer states (optax mirrors the param
paths) get the same layout; LoRA adapters (`<w>_lora_a` [.., in, r],
`<w>_lora_b` [.., r, out]) split like their kernel's in / out dims, r
never. A dimension not divisible by its mesh axes, and
a leaf no rule matches, are replicated: every mesh fits every model, and a
layout changes memory and speed, never results.

Expert parallelism (`expert_parallel_mesh`, `expert_parallel_apply`,
`expert_parallel_ffn`, the all_to_all exchange of the expert buffers) lives
in `moejax.expert_parallel`; its names are re-exported here.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'expert', 'model')
BATCH_AXES = ('data', 'expert')

# Flax logical axis rules: (logical name, mesh axes or None).
LOGICAL_AXIS_RULES = (
    ('batch', BATCH_AXES),
    ('expert', 'expert'),
    ('expert_mlp', 'model'),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('embed', None),
    ('vocab', None),
    ('kv', None),
    ('norm', None),
)

_WIS = ('wi', 'wi_0', 'wi_1')
_EXPERT_IN = ('expert', 'embed', 'expert_mlp')  # wi, wi_0, wi_1 [E, D, F]
_DENSE_IN = ('embed', 'mlp')  # wi, wi_0, wi_1 [D, F]
# (trailing path names, ndim, logical axes); the first match wins.
PARAM_LOGICAL_AXES = (
    (('embedding',), 2, ('vocab', 'embed')),  # embed/embedding [V, D]
    (('router', 'kernel'), 2, ('embed', None)),  # [D, E]: small, replicated
    (('head', 'kernel'), 2, ('embed', 'vocab')),  # [D, V]
    (('query',), 3, ('embed', 'heads', 'kv')),  # [D, H, Dh]
    (('key',), 3, ('embed', 'heads', 'kv')),
    (('value',), 3, ('embed', 'heads', 'kv')),
    (('out',), 3, ('heads', 'kv', 'embed')),  # [H, Dh, D]
    (('scale',), 1, ('norm',)),  # RMSNorm [D]
    (('wi',), 3, _EXPERT_IN), (('wi_0',), 3, _EXPERT_IN),
    (('wi_1',), 3, _EXPERT_IN),
    (('wo',), 3, ('expert', 'expert_mlp', 'embed')),  # [E, F, D]
    (('wi',), 2, _DENSE_IN), (('wi_0',), 2, _DENSE_IN),
    (('wi_1',), 2, _DENSE_IN),
    (('wo',), 2, ('mlp', 'embed')),  # [F, D]
    # LoRA adapters (moejax.lora): a [.., in, r] and b [.., r, out] split
    # like their kernel's in / out dims; r is never split.
    *[((f'{w}_lora_a',), 3, ('expert', 'embed', None)) for w in _WIS],
    *[((f'{w}_lora_b',), 3, ('expert', None, 'expert_mlp')) for w in _WIS],
    (('wo_lora_a',), 3, ('expert', 'expert_mlp', None)),  # [E, F, r]
    (('wo_lora_b',), 3, ('expert', None, 'embed')),  # [E, r, D]
    *[((f'{w}_lora_a',), 2, ('embed', None)) for w in _WIS],  # [D, r]
    *[((f'{w}_lora_b',), 2, (None, 'mlp')) for w in _WIS],  # [r, F]
    (('wo_lora_a',), 2, ('mlp', None)),  # [F, r]
    (('wo_lora_b',), 2, (None, 'embed')),  # [r, D]
)

MeshLike = Union[jax.sharding.Mesh, jax.sharding.AbstractMesh,
                 Mapping[str, int]]


def axis_sizes(mesh: MeshLike) -> dict:
  """{axis name: size} of a Mesh, an AbstractMesh or a plain mapping."""
  return dict(mesh.shape if hasattr(mesh, 'shape') else mesh)


def _axes_size(sizes: Mapping[str, int], axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(sizes.get(a, 1) for a in axes)


def resolve_mesh_shape(data: int, expert: int, model: int,
                       num_devices: int) -> tuple[int, int, int]:
  """The (data, expert, model) mesh shape, with a -1 filled in.

  Args:
    data: `mesh.data`, an int >= 1 or -1.
    expert: `mesh.expert`, an int >= 1 or -1.
    model: `mesh.model`, an int >= 1 or -1.
    num_devices: devices available.

  Returns:
    (Pd, Pe, Pm) with Pd * Pe * Pm <= num_devices; a -1 becomes
    num_devices // (product of the others), which must divide exactly.

  Raises:
    ValueError naming the key: not an int, < 1 and not -1, more than one
    -1, a mesh larger than the devices, a -1 that cannot fill them exactly.
  """
  shape = {'mesh.data': data, 'mesh.expert': expert, 'mesh.model': model}
  for key, value in shape.items():
    if isinstance(value, bool) or not isinstance(value, int) or (
        value < 1 and value != -1):
      raise ValueError(f'{key}={value!r} must be an int >= 1, or -1 to use '
                       'the remaining devices.')
  fill = [key for key, value in shape.items() if value == -1]
  if len(fill) > 1:
    raise ValueError(f'only one of mesh.data, mesh.expert, mesh.model may be '
                     f'-1; got -1 for {", ".join(fill)}.')
  fixed = math.prod(v for v in shape.values() if v != -1)
  desc = ', '.join(f'{k}={v}' for k, v in shape.items())
  if fixed > num_devices:
    raise ValueError(f'the mesh ({desc}) needs {fixed} devices but only '
                     f'{num_devices} are available.')
  if fill:
    if num_devices % fixed:
      raise ValueError(f'{fill[0]}=-1 cannot fill {num_devices} devices: the '
                       f'other sizes ({desc}) multiply to {fixed}, which does '
                       f'not divide {num_devices}.')
    shape[fill[0]] = num_devices // fixed
  return tuple(shape.values())


def make_mesh(data: int = 1, expert: int = 1, model: int = 1,
              devices: Optional[Sequence[Any]] = None) -> jax.sharding.Mesh:
  """A ('data', 'expert', 'model') mesh with Auto axis types.

  Args:
    data: `mesh.data` (-1: the remaining devices).
    expert: `mesh.expert` (-1: the remaining devices).
    model: `mesh.model` (-1: the remaining devices).
    devices: devices to use; default `jax.devices()` (all processes). A mesh
      smaller than the devices uses the first ones, in a single process
      only (every process must own part of a multi-process mesh).

  Returns:
    jax.sharding.Mesh of shape (Pd, Pe, Pm). Use it with `jax.set_mesh`.

  Raises:
    ValueError (see `resolve_mesh_shape`), before anything compiles.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(data, expert, model, len(devices))
  size = math.prod(shape)
  types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if size == len(devices):
    return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
  if jax.process_count() > 1:
    raise ValueError(f'the mesh (mesh.data, mesh.expert, mesh.model) = '
                     f'{shape} uses {size} of the {len(devices)} devices; a '
                     'multi-process mesh must use them all.')
  return jax.sharding.Mesh(np.asarray(devices[:size]).reshape(shape),
                           MESH_AXES, axis_types=types)


def check_moe_mesh(mesh: MeshLike, num_experts: int,
                   num_groups: Optional[int] = None) -> None:
  """Checks that an MoE layer fits the mesh's expert and batch shards.

  Args:
    mesh: a Mesh, AbstractMesh or {axis name: size}.
    num_experts: E (`model.moe.num_experts`).
    num_groups: G of one MoE layer call (batch * length / group size), or
      None to skip that check.

  Raises:
    ValueError naming the keys: E % Pe != 0 when Pe <= E, Pe % E != 0 when
    Pe > E, or G % (Pd * Pe) != 0.
  """
  sizes = axis_sizes(mesh)
  pe = sizes.get('expert', 1)
  if pe <= num_experts and num_experts % pe:
    raise ValueError(
        f'model.moe.num_experts={num_experts} must be divisible by '
        f'mesh.expert={pe} (each device of the expert axis holds '
        'E / mesh.expert experts); allowed mesh.expert values: divisors or '
        f'multiples of {num_experts}.')
  if pe > num_experts and pe % num_experts:
    raise ValueError(
        f'mesh.expert={pe} is larger than model.moe.num_experts='
        f'{num_experts} and must then be a multiple of it (each expert is '
        'replicated on mesh.expert / E devices); allowed mesh.expert values: '
        f'divisors or multiples of {num_experts}.')
  shards = _axes_size(sizes, BATCH_AXES)
  if num_groups is not None and num_groups % shards:
    raise ValueError(
        f'the MoE layer has G={num_groups} groups (train.batch_size * '
        'data.seq_len / model.moe.group_size, or train.batch_size / '
        'model.moe.group_sequences), which must be divisible by '
        f'the batch shards mesh.data * mesh.expert = {shards}; allowed: '
        'smaller groups (G a multiple of the batch shards) or fewer batch '
        'shards.')


def check_batch_size(mesh: MeshLike, batch_size: int) -> None:
  """Raises ValueError unless B is divisible by Pd * Pe (batch shards)."""
  shards = _axes_size(axis_sizes(mesh), BATCH_AXES)
  if batch_size % shards:
    raise ValueError(f'train.batch_size={batch_size} must be divisible by '
                     f'the batch shards mesh.data * mesh.expert = {shards}.')


def path_names(path) -> tuple[str, ...]:
  """Dict keys and attribute names of a key path (indices dropped)."""
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      names.append(key.name)
  return tuple(names)


def logical_axes(path_names: Sequence[str], ndim: int) -> tuple:
  """Logical axis names of a param from its path.

  Args:
    path_names: the names along its path, e.g. ('block_1', 'ffn',
      'experts', 'wi').
    ndim: its rank.

  Returns:
    A tuple of ndim logical names (None = never sharded); all None when no
    rule of PARAM_LOGICAL_AXES matches.
  """
  names = tuple(path_names)
  for suffix, rank, axes in PARAM_LOGICAL_AXES:
    if rank == ndim and names[-len(suffix):] == suffix:
      return axes
  return (None,) * ndim


def partition_spec(shape: Sequence[int], axes: Sequence[Optional[str]],
                   mesh: MeshLike) -> P:
  """PartitionSpec of an array from its logical axes and the rules.

  Args:
    shape: the array's shape.
    axes: its logical axis names (LOGICAL_AXIS_RULES).
    mesh: the mesh (or {axis name: size}).

  Returns:
    PartitionSpec; mesh axes the mesh lacks are dropped, and a dimension
    not divisible by its mesh axes' size is replicated.
  """
  sizes = axis_sizes(mesh)
  spec = nn.logical_to_mesh_axes(tuple(axes), LOGICAL_AXIS_RULES)
  out = []
  for dim, entry in zip(shape, spec):
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    names = tuple(a for a in names if a in sizes)
    if not names or dim % _axes_size(sizes, names):
      out.append(None)
    else:
      out.append(names[0] if len(names) == 1 else names)
  return P(*out)


def tree_partition_specs(tree: Any, mesh: MeshLike) -> Any:
  """PartitionSpecs for every array leaf of a param-like tree, by path.

  Works on params, optimizer states (optax mirrors the param paths), a
  whole TrainState, and trees of jax.ShapeDtypeStruct. Scalars and leaves
  no rule matches are replicated.

  Args:
    tree: a pytree of arrays or ShapeDtypeStructs.
    mesh: the mesh (or {axis name: size}).

  Returns:
    The same structure with a PartitionSpec per leaf.
  """
  def spec(path, leaf):
    axes = logical_axes(path_names(path), len(leaf.shape))
    return partition_spec(leaf.shape, axes, mesh)

  return jax.tree_util.tree_map_with_path(spec, tree)


def tree_shardings(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """NamedShardings for every leaf of `tree` (see tree_partition_specs).

  Use as `jax.jit(..., out_shardings=...)` of the init function, or with
  `jax.device_put(tree, tree_shardings(tree, mesh))`.
  """
  return jax.tree.map(lambda s: NamedSharding(mesh, s),
                      tree_partition_specs(tree, mesh))


def abstract_with_shardings(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """ShapeDtypeStructs carrying the mesh's shardings.

  The restore target of a checkpoint on `mesh`, whatever mesh saved it
  (orbax `StandardRestore(abstract_with_shardings(abstract_state, mesh))`).

  Args:
    tree: pytree of arrays or ShapeDtypeStructs.
    mesh: the target mesh.

  Returns:
    The same structure of jax.ShapeDtypeStruct with `sharding` set.
  """
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
      tree_shardings(tree, mesh))


def batch_axes(mesh: MeshLike) -> tuple[str, ...]:
  """The mesh axes the batch (and G) is split over: ('data', 'expert')."""
  return tuple(a for a in BATCH_AXES if a in axis_sizes(mesh))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis over ('data', 'expert'), the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def _process_rows(devices: np.ndarray, axis_names: Sequence[str],
                  global_batch_size: int, process_index: int) -> slice:
  """Rows of a [B, ...] batch on `process_index`'s devices (see below)."""
  sizes = dict(zip(axis_names, devices.shape))
  check_batch_size(sizes, global_batch_size)
  shards = _axes_size(sizes, BATCH_AXES)
  per_shard = global_batch_size // shards
  # Batch shard of a device: its row-major index over ('data', 'expert').
  order = [axis_names.index(a) for a in batch_axes(sizes)]
  rest = [i for i in range(devices.ndim) if i not in order]
  by_shard = devices.transpose(order + rest).reshape(shards, -1)
  mine = [i for i in range(shards)
          if any(d.process_index == process_index for d in by_shard[i])]
  if not mine or mine != list(range(mine[0], mine[-1] + 1)):
    raise ValueError(f'process {process_index} owns batch shards {mine}, '
                     'not one contiguous block; order the devices of the '
                     'mesh by process.')
  return slice(mine[0] * per_shard, (mine[-1] + 1) * per_shard)


def process_batch_rows(mesh: jax.sharding.Mesh, global_batch_size: int,
                       process_index: Optional[int] = None) -> slice:
  """Which rows of the global batch this process must load.

  Args:
    mesh: the mesh.
    global_batch_size: B (`train.batch_size`), divisible by Pd * Pe.
    process_index: default `jax.process_index()`.

  Returns:
    slice(start, stop) into [0, B); one process: slice(0, B).
  """
  if process_index is None:
    process_index = jax.process_index()
  return _process_rows(np.asarray(mesh.devices), list(mesh.axis_names),
                       global_batch_size, process_index)


def shard_batch(batch: Any, mesh: jax.sharding.Mesh,
                global_batch_size: int) -> Any:
  """Global batch arrays from this process's rows, split over the batch axes.

  Args:
    batch: pytree of host arrays [B_local, ...], the rows
      `process_batch_rows(mesh, global_batch_size)` of the global batch.
    mesh: the mesh.
    global_batch_size: B.

  Returns:
    The same structure of jax.Arrays [B, ...] with `batch_sharding(mesh)`.
  """
  rows = process_batch_rows(mesh, global_batch_size)
  sharding = batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    if x.shape[0] != rows.stop - rows.start:
      raise ValueError(f'this process must pass rows {rows.start}:'
                       f'{rows.stop} of the global batch of '
                       f'{global_batch_size}, got {x.shape[0]} rows.')
    return jax.make_array_from_process_local_data(
        sharding, x, (global_batch_size,) + x.shape[1:])

  return jax.tree.map(put, batch)


# Re-exported: `sharding.expert_parallel_*` is the name the layers, tests and
# notebooks use. Imported last: moejax.expert_parallel reads this module's
# names, and the package __init__ (through moejax.experts) imports this
# module first. pylint: disable=wrong-import-position
from moejax.expert_parallel import expert_parallel_apply  # pylint: disable=unused-import
from moejax.expert_parallel import expert_parallel_ffn  # pylint: disable=unused-import
from moejax.expert_parallel import expert_parallel_mesh  # pylint: disable=unused-import
