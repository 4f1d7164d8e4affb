"""Memory a training step needs, estimated before anything compiles.

`check_memory` refuses a run whose estimate exceeds the device's memory
(e.g. `train.batch_size=32768` on a laptop), with the estimate and the
device memory, instead of a long compile and a RESOURCE_EXHAUSTED
traceback. `estimate_train_bytes` is the documented estimate: nothing is
compiled; the param shapes come from `jax.eval_shape` of the model's init.

Axis letters: B batch, L sequence length, D model width, F FFN / expert
hidden width, H heads, V vocab, E experts, K chosen experts, G groups, S
tokens per group, C capacity (slots per expert per group), T = B * L tokens.

The estimate (bytes; `a` = bytes of model.dtype, P = param bytes):

    params       P
    optimizer    2 P               AdamW's mu and nu (param dtype); with
                                   train.master_weights 3 P32: mu, nu and
                                   the master copy in float32 (P32 = P
                                   at 4 bytes a param)
    gradients    P
    activations  sum over blocks of what the backward pass keeps:
                   T * (10 D + 4 F) * a          dense block (norms, q, k,
                                                 v, attention out, residual;
                                                 FFN in / hidden / act)
                   3 * B * H * L * L * 4         attention scores, softmax
                                                 and its mask (float32)
                   MoE block instead of the dense FFN:
                   G * E * C * 4 * (D + F) * a   dispatch / expert hidden /
                                                 output buffers [G, E, C, D]
                                                 and [G, E, C, F] (+ grads)
                   4 * T * E * 4                 router logits, probs (f32)
                   3 * G * S * E * C * 4         one-hot dispatch / combine
                                                 [G, S, E, C] (einsum only)
                   4 * T * n F_s * a             n shared experts
                 (E * C slots per group: C from `compute_capacity`, with
                 K = 1 for expert choice; Soft MoE: E * slots_per_expert;
                 ragged / per_token: the S * K (token, choice) rows;
                 blocked: those padded to blocks, moejax.blocked. E, K,
                 F are the fine-grained m E, m K, F / m.)
    logits       5 * B * L * V * 4 logits, softmax, its gradient and the
                                   head's transposed copies (float32;
                                   a classifier: 5 * B * N * 4)
    total        their sum (+ the tokens, B * (L + 1) * 4)

The coefficients were read off XLA's buffer assignment of the train step
(CPU, float32) and checked against `compiled.memory_analysis()` (temp +
argument + output bytes) on the dense / switch / gshard / deepseek /
expert_choice / soft_moe tiny configs, the einsum and ragged dispatchers
and switch small, from D = 32 to 256, L = 16 to 256, B = 4 to 64: 0.76 to
1.05 times it (0.76: bfloat16, which XLA on CPU computes in float32;
tests/test_memory_check.py holds two of them to 2x). It is an estimate:
XLA on GPU/TPU may fuse or rematerialise differently.

On a mesh, the activations are divided by the batch shards (mesh.data x
mesh.expert) and the expert weights (and their optimizer state and
gradients) by mesh.expert; mesh.model splits are not counted (an
over-estimate). A host's CPU devices share its RAM, so `check_memory`
counts every one of them.

Device memory: `device.memory_stats()['bytes_limit']` on GPU / TPU; on CPU
the host's total RAM (/proc/meminfo, else os.sysconf), or a container's
cgroup limit when lower.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from moejax import blocked
from moejax import capacity as capacity_lib
from moejax import grouping
from moejax.models import flops

GIB = 2**30
# Saved copies per tensor kind (see the module docstring).
TOKEN_D, TOKEN_F, SCORES, BUFFERS = 10, 4, 3, 4
ROUTER, ONE_HOT, LOGITS = 4, 3, 5


def _split_params(model, seq_len: int) -> tuple[int, int]:
  """(bytes of expert weights, bytes of all other params)."""
  expert, other = 0, 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      flops.param_shapes(model, seq_len))[0]:
    size = math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
    if any(getattr(k, 'key', None) == 'experts' for k in path):
      expert += size
    else:
      other += size
  return expert, other


def _moe_block_bytes(moe: dict, batch: int, seq_len: int, d_model: int,
                     d_ff: int, itemsize: int) -> int:
  """Activation bytes of one MoE FFN (router, buffers, one-hot tensors)."""
  m = moe.get('granularity', 1)
  experts, top_k = m * moe['num_experts'], m * moe.get('top_k', 1)
  width = d_ff // m
  s = grouping.group_tokens(moe.get('group_size'),
                            moe.get('group_sequences'), seq_len,
                            batch) or seq_len
  groups = -(-batch * seq_len // s)
  router = moe.get('router', 'topk')
  if router == 'soft_moe':
    slots = experts * moe.get('slots_per_expert', 1)
  elif moe.get('dispatcher', 'gather') in ('ragged', 'per_token'):
    # the sorted (token, choice) rows, no padding ('relu': K = E choices)
    slots = s * (experts if router == 'relu' else top_k)
  elif moe.get('dispatcher') == 'blocked':
    # the sorted rows padded to blocks of b (moejax.blocked), per group
    rows = groups * s * (experts if router in ('relu', 'expert_choice')
                         else top_k)
    b = blocked.default_block_size(rows, experts)
    slots = -(-b * blocked.num_blocks(rows, experts, b) // groups)
  else:
    c = capacity_lib.compute_capacity(
        s, experts, 1 if router == 'expert_choice' else top_k,
        moe.get('capacity_factor', 1.25), moe.get('min_capacity', 4),
        moe.get('capacity_multiple_of', 1))
    slots = experts * c
  total = groups * slots * BUFFERS * (d_model + width) * itemsize
  total += ROUTER * groups * s * (experts + moe.get('num_null_experts', 0)) * 4
  if router == 'relu':  # K = E choices: assign_slots' [G, S, E, E] one-hot
    total += groups * s * experts * experts * 4
  if moe.get('dispatcher') == 'einsum':
    total += ONE_HOT * groups * s * slots * 4
  shared = moe.get('num_shared_experts', 0) * (moe.get('shared_d_ff') or
                                                 width)
  return total + TOKEN_F * batch * seq_len * shared * itemsize


def _activation_bytes(model, batch: int, seq_len: int) -> dict[str, int]:
  """{'activations', 'attention', 'moe_buffers', 'logits'} of a train step."""
  a = jnp.dtype(model.dtype).itemsize
  tokens = batch * seq_len
  moe_layers = set(getattr(model, 'moe_layers', ()) or ())
  dense_ff = getattr(model, 'dense_d_ff', None) or model.d_ff
  attention = SCORES * batch * model.num_heads * seq_len**2 * 4
  out = {'attention': attention * model.num_layers, 'moe_buffers': 0}
  total = 0
  for block in range(model.num_layers):
    total += TOKEN_D * tokens * model.d_model * a + attention
    if block in moe_layers:
      moe = _moe_block_bytes(dict(model.moe), batch, seq_len, model.d_model,
                             model.d_ff, a)
      out['moe_buffers'] += moe
      total += moe
    else:
      total += TOKEN_F * tokens * dense_ff * a
  classes = getattr(model, 'num_classes', None)
  out['logits'] = LOGITS * batch * (classes if getattr(
      model, 'task', 'lm') == 'classify' else seq_len * model.vocab_size) * 4
  out['activations'] = total
  return out


def estimate_train_bytes(config: ml_collections.ConfigDict, model,
                         batch_shards: int = 1,
                         expert_shards: int = 1) -> dict[str, int]:
  """Estimated bytes one device needs for a training step (see module doc).

  Args:
    config: the validated run config (train.batch_size, data.seq_len).
    model: the config's model (`config_lib.build_model`).
    batch_shards: devices the batch is split over (mesh.data * mesh.expert).
    expert_shards: devices the experts are split over (mesh.expert).

  Returns:
    {'params', 'optimizer', 'gradients', 'activations', 'logits', 'total'}
    plus the parts of 'activations': 'attention' (scores, [B, H, L, L]
    float32) and 'moe_buffers' ([G, E, C, D] / [G, E, C, F] buffers,
    router, one-hot tensors). Ints, bytes.
  """
  seq_len = config.data.seq_len
  return _estimate(model, config.train.batch_size, seq_len,
                   _split_params(model, seq_len), batch_shards,
                   expert_shards, config.train.get('master_weights', False))


def _estimate(model, batch: int, seq_len: int, split: tuple[int, int],
              batch_shards: int, expert_shards: int,
              master: bool = False) -> dict[str, int]:
  """estimate_train_bytes with the (expert, other) param bytes given."""
  expert, other = split
  params = other + expert // max(expert_shards, 1)
  parts = _activation_bytes(model, batch, seq_len)
  optimizer = 2 * params
  if master:  # float32 mu, nu and master (the f32 routers over-counted)
    optimizer = 3 * params * 4 // jnp.dtype(model.param_dtype).itemsize
  out = {'params': params, 'optimizer': optimizer, 'gradients': params}
  for key in ('activations', 'attention', 'moe_buffers', 'logits'):
    out[key] = parts[key] // max(batch_shards, 1)
  out['total'] = (2 * params + optimizer + out['activations'] +
                  out['logits'] + batch * (seq_len + 1) * 4)
  return out


def _cgroup_limit() -> Optional[int]:
  """The container's memory limit (cgroup v2 or v1), if one is set."""
  for path in ('/sys/fs/cgroup/memory.max',
               '/sys/fs/cgroup/memory/memory.limit_in_bytes'):
    try:
      with open(path, encoding='utf-8') as f:
        text = f.read().strip()
    except OSError:
      continue
    if text.isdigit() and int(text) < 2**60:
      return int(text)
  return None


def host_memory_bytes() -> int:
  """Total RAM (/proc/meminfo, else os.sysconf), capped by a cgroup limit."""
  total = None
  try:
    with open('/proc/meminfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('MemTotal:'):
          total = int(line.split()[1]) * 1024
          break
  except OSError:
    pass
  if total is None:
    total = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  limit = _cgroup_limit()
  return min(total, limit) if limit else total


def device_memory_bytes(device: Any) -> Optional[int]:
  """Memory of a JAX device: `memory_stats()['bytes_limit']` (GPU / TPU),
  host RAM for a CPU device; None when the device does not say."""
  if getattr(device, 'platform', 'cpu') == 'cpu':
    return host_memory_bytes()
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    return None  # some backends do not implement it
  return stats.get('bytes_limit')


def _mesh_shards(mesh) -> tuple[int, int]:
  """(batch shards, expert shards) of a jax.sharding.Mesh (1, 1 if None)."""
  if mesh is None:
    return 1, 1
  shape = dict(mesh.shape)
  return (shape.get('data', 1) * shape.get('expert', 1),
          shape.get('expert', 1))


def check_memory(config: ml_collections.ConfigDict, model,
                 device: Any = None, mesh=None) -> dict[str, int]:
  """Refuses a run whose estimated step memory exceeds the device's.

  Call it after the config is validated and the model built, before the
  data is built or anything compiles.

  Args:
    config: the validated run config.
    model: its model.
    device: a JAX device (default: this process's first local device).
    mesh: the run's mesh, or None (one device).

  Returns:
    The estimate (`estimate_train_bytes`) when it fits (or the device
    does not report its memory).

  Raises:
    ValueError naming the estimate, the device memory and what to change.
  """
  device = device if device is not None else jax.local_devices()[0]
  shards, copies = _mesh_shards(mesh), _host_copies(device, mesh)
  batch, seq_len = config.train.batch_size, config.data.seq_len
  split = _split_params(model, seq_len)
  master = config.train.get('master_weights', False)
  need = lambda b: copies * _estimate(model, b, seq_len, split, *shards,
                                      master)['total']
  estimate = _estimate(model, batch, seq_len, split, *shards, master)
  limit = device_memory_bytes(device)
  if limit is None or need(batch) <= limit:
    return estimate
  fits = batch  # the largest power-of-two fraction of B that fits
  while fits > 1 and need(fits) > limit:
    fits //= 2
  times = f' x {copies} CPU devices of this host' if copies > 1 else ''
  state = sum(estimate[k] for k in ('params', 'optimizer', 'gradients'))
  raise ValueError(
      f'train.batch_size={batch} x data.seq_len={seq_len} needs an '
      f'estimated {_size(estimate["total"])}{times} per training step '
      f'(params + AdamW state + gradients {_size(state)}, '
      f'activations {_size(estimate["activations"])}, logits '
      f'{_size(estimate["logits"])}), but the device '
      f'({getattr(device, "device_kind", device)}) has {_size(limit)}; '
      f'allowed: a smaller train.batch_size (about {fits} fits), a shorter '
      'data.seq_len, a smaller model, or more devices (mesh.data).')


def _host_copies(device: Any, mesh) -> int:
  """How many of the mesh's devices share `device`'s memory: a host's CPU
  devices all use its RAM; GPU / TPU devices have their own (1)."""
  if mesh is None or getattr(device, 'platform', None) != 'cpu':
    return 1
  mine = getattr(device, 'process_index', 0)
  return max(1, sum(getattr(d, 'process_index', 0) == mine
                    for d in mesh.devices.flat))


def _size(num_bytes: int) -> str:
  """'47.3 GiB', or '8.3 MiB' below 1 GiB."""
  if num_bytes >= GIB:
    return f'{num_bytes / GIB:.1f} GiB'
  return f'{num_bytes / 2**20:.1f} MiB'
