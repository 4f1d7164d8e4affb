"""The FFN arithmetic shared by the expert banks and their expert-parallel
path (`sharding.expert_parallel_ffn`), free of flax and of the mesh, so both
`experts` and `sharding` import it (experts imports sharding).

Axis letters: whatever the matmuls take, e.g. E experts, N slots, D model
width, F hidden width, r LoRA rank.

A kernel is an array, or a `LoraKernel` (a kernel with a low-rank adapter,
Hu et al. 2021): x . base + (x . a) . b, computed as two thin matmuls, never
by materialising base + a . b.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax

MatMul = Callable[[jax.Array, jax.Array], jax.Array]


class LoraKernel(NamedTuple):
  """A kernel with a low-rank adapter: x . base + (x . a) . b.

  A pytree (its fields are leaves), so it passes through jax.tree.map and
  shard_map in_specs (a LoraKernel of PartitionSpecs).
  """
  base: jax.Array  # [E, in, out] (or [in, out])
  a: jax.Array  # [E, in, r]
  b: jax.Array  # [E, r, out], already scaled by lora_alpha / r


Kernel = Union[jax.Array, LoraKernel]


def apply_kernel(x: jax.Array, w: Kernel, matmul: MatMul,
                 matmul_b: MatMul) -> jax.Array:
  """x . w; for a LoraKernel x . base + matmul_b(x . a, b).

  Args:
    x: the inputs, e.g. [E, N, in].
    w: the kernel, e.g. [E, in, out], or a LoraKernel.
    matmul: (x, w) -> x . w for `base` and `a` (the same contraction, and
      the same collectives, as the kernel itself).
    matmul_b: (t [.., r], b [.., r, out]) -> t . b, the adapter's second,
      rank-r matmul.

  Returns:
    e.g. [E, N, out].
  """
  if not isinstance(w, LoraKernel):
    return matmul(x, w)
  return matmul(x, w.base) + matmul_b(matmul(x, w.a), w.b)


def gated_ffn(x: jax.Array, wis: Sequence[Kernel], wo: Kernel,
              nonlinearity: Callable[[jax.Array], jax.Array],
              matmul_in: MatMul, matmul_out: MatMul,
              matmul_b: Optional[MatMul] = None) -> jax.Array:
  """act(x . wi) . wo, or act(x . wi_0) * (x . wi_1) . wo for two kernels.

  Args:
    x: the inputs, e.g. [E, N, D].
    wis: [wi] or the gated pair [wi_0, wi_1], e.g. each [E, D, F]; each an
      array or a LoraKernel.
    wo: the output kernel, e.g. [E, F, D], or a LoraKernel.
    nonlinearity: the activation (applied to x . wi / x . wi_0).
    matmul_in: (x, wi) -> x . wi, e.g. an einsum or a grouped matmul.
    matmul_out: (h, wo) -> h . wo.
    matmul_b: (t [.., r], b [.., r, out]) -> t . b, the second matmul of
      every adapter; None = matmul_out (right whenever matmul_out is a
      plain per-expert matmul with no collective).

  Returns:
    matmul_out's result, e.g. [E, N, D].
  """
  if len(wis) not in (1, 2):
    raise ValueError(f'wis must hold 1 or 2 kernels, got {len(wis)}.')
  matmul_b = matmul_out if matmul_b is None else matmul_b
  hidden = [apply_kernel(x, wi, matmul_in, matmul_b) for wi in wis]
  h = nonlinearity(hidden[0])
  if len(hidden) == 2:
    h = h * hidden[1]
  return apply_kernel(h, wo, matmul_out, matmul_b)
