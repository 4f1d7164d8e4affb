"""The FFN arithmetic shared by the expert banks and their expert-parallel
path (`sharding.expert_parallel_ffn`), free of flax and of the mesh, so both
`experts` and `sharding` import it (experts imports sharding).

Axis letters: whatever the matmuls take, e.g. E experts, N slots, D model
width, F hidden width.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax

MatMul = Callable[[jax.Array, jax.Array], jax.Array]


def gated_ffn(x: jax.Array, wis: Sequence[jax.Array], wo: jax.Array,
              nonlinearity: Callable[[jax.Array], jax.Array],
              matmul_in: MatMul, matmul_out: MatMul) -> jax.Array:
  """act(x . wi) . wo, or act(x . wi_0) * (x . wi_1) . wo for two kernels.

  Args:
    x: the inputs, e.g. [E, N, D].
    wis: [wi] or the gated pair [wi_0, wi_1], e.g. each [E, D, F].
    wo: the output kernel, e.g. [E, F, D].
    nonlinearity: the activation (applied to x . wi / x . wi_0).
    matmul_in: (x, wi) -> x . wi, e.g. an einsum or a grouped matmul.
    matmul_out: (h, wo) -> h . wo.

  Returns:
    matmul_out's result, e.g. [E, N, D].
  """
  if len(wis) not in (1, 2):
    raise ValueError(f'wis must hold 1 or 2 kernels, got {len(wis)}.')
  hidden = [matmul_in(x, wi) for wi in wis]
  h = nonlinearity(hidden[0])
  if len(hidden) == 2:
    h = h * hidden[1]
  return matmul_out(h, wo)
