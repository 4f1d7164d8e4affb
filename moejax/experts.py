"""Feed-forward experts: a bank of E FFNs with stacked weights, and a dense FFN.

Axis letters: G groups, E experts, C capacity, D model width, F hidden width,
N = G*C slots of one expert.

Activations: 'relu' and 'gelu' (one input projection `wi`), and the gated
'swiglu' / 'geglu' (gate projection `wi_0` through the nonlinearity, times
the linear projection `wi_1`). No biases, so an empty (all-zero) slot maps
to zero.

LoRA (`lora_rank` r > 0, `lora_alpha`; moejax.lora): every kernel w above
gets `<w>_lora_a` [E, in, r] (fan-in normal) and `<w>_lora_b` [E, r, out]
(zeros; DenseFfn: [in, r], [r, out]), created after all the kernels (so the
kernels' init does not depend on r), and each of the bank's matmuls adds
(alpha / r) * (x . a) . b through the same matmuls (grouped, per-choice or
expert-parallel). lora_rank=0: no adapter, the FFN exactly as without LoRA.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import blocked
from moejax import ffn_math
from moejax import lora as lora_lib
from moejax import sharding

ACTIVATIONS = ('relu', 'gelu', 'swiglu', 'geglu')
_NONLINEARITY = {'relu': jax.nn.relu, 'gelu': jax.nn.gelu,
                 'swiglu': jax.nn.silu, 'geglu': jax.nn.gelu}


def check_activation(activation: str) -> None:
  """Raises ValueError naming `activation` and the allowed values."""
  if activation not in ACTIVATIONS:
    raise ValueError(f'activation={activation!r} is not supported; allowed '
                     f'values: {", ".join(map(repr, ACTIVATIONS))}.')


def _input_names(activation: str):
  return ('wi_0', 'wi_1') if activation in ('swiglu', 'geglu') else ('wi',)


def _kernels(module: nn.Module, in_shape, out_shape, init):
  """Creates the FFN params of `module`: (wis, wo), in `param_dtype`.

  `wi` (or the gated `wi_0`, `wi_1`) of `in_shape` [.., in, out] and `wo` of
  `out_shape`, in this order; with `module.lora_rank` r > 0 then, for each
  kernel, `<name>_lora_a` [.., in, r] (`init`) and `<name>_lora_b`
  [.., r, out] (zeros), and each kernel is returned as a
  ffn_math.LoraKernel whose b is scaled by lora_alpha / r and cast to
  `module.dtype`.
  """
  check_activation(module.activation)
  lora_lib.check_lora_options(module.lora_rank, module.lora_alpha)
  names = _input_names(module.activation) + ('wo',)
  shapes = [in_shape] * (len(names) - 1) + [out_shape]
  kernels = [module.param(name, init, shape, module.param_dtype)
             for name, shape in zip(names, shapes)]
  r = module.lora_rank
  if r:
    scale = lora_lib.lora_scale(r, module.lora_alpha)
    for i, (name, shape) in enumerate(zip(names, shapes)):
      a_name, b_name = lora_lib.adapter_names(name)
      a = module.param(a_name, init, (*shape[:-1], r), module.param_dtype)
      b = module.param(b_name, nn.initializers.zeros,
                       (*shape[:-2], r, shape[-1]), module.param_dtype)
      b = (b.astype(jnp.float32) * scale).astype(module.dtype)
      kernels[i] = ffn_math.LoraKernel(kernels[i], a, b)
  return kernels[:-1], kernels[-1]


def _ffn(module: nn.Module, x: jax.Array, in_shape, out_shape, init,
         spec_in, spec_out) -> jax.Array:
  """The FFN of ExpertBank, RaggedExpertBank, TokenExpertBank and DenseFfn.

  Creates the params (`_kernels`) and computes act(x . wi) [* (x . wi_1)]
  . wo in `module.dtype`. `spec_in` / `spec_out` are einsum specs, or
  callables (x, w) -> x . w (e.g. grouped matmuls). An adapter's a goes
  through its kernel's matmul, and its b through `spec_out`'s: in every
  bank that is the plain per-expert product rows [.., r] x [E, r, out].
  """
  matmul = lambda spec: (spec if callable(spec) else
                         lambda a, w: jnp.einsum(spec, a, w))
  wis, wo = _kernels(module, in_shape, out_shape, init)
  cast = lambda w: jax.tree.map(lambda t: t.astype(module.dtype), w)
  return ffn_math.gated_ffn(
      x.astype(module.dtype), cast(wis), cast(wo),
      _NONLINEARITY[module.activation], matmul(spec_in), matmul(spec_out))


# Standard deviation of a unit normal truncated to [-2, 2]; variance_scaling
# divides by it so the truncated draw keeps the requested variance.
_TRUNCATED_STD = 0.87962566103423978


def expert_kernel_init(scale: float = 1.0) -> nn.initializers.Initializer:
  """Fan-in truncated normal for [E, in, out] kernels, experts independent.

  Each expert is drawn independently with fan_in = `in` (the E axis is a
  batch axis, as `variance_scaling(..., batch_axis=(0,))`). The draw is a
  2-D [E*in, out] matrix reshaped to [E, in, out]: the same distribution,
  but XLA:CPU compiles 3-D random draws many times more slowly.
  """

  def init(key, shape, dtype=jnp.float32):
    e, fan_in, fan_out = shape
    std = math.sqrt(scale / fan_in) / _TRUNCATED_STD
    draw = nn.initializers.truncated_normal(std, lower=-2.0, upper=2.0)
    return draw(key, (e * fan_in, fan_out), dtype).reshape(shape)

  return init


class _Bank(nn.Module):
  """The fields every expert bank has: E experts of width F, their
  nonlinearity, compute / param dtypes, and LoRA rank and alpha."""
  num_experts: int
  d_ff: int
  activation: str = 'relu'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora_rank: int = 0
  lora_alpha: float = 16.0


class ExpertBank(_Bank):
  """E independent FFNs applied to their own buffers.

  Params: `wi` [E, D, F] (or `wi_0`, `wi_1` [E, D, F] when gated) and
  `wo` [E, F, D], stored in `param_dtype`, computed in `dtype`; with
  `lora_rank` r > 0 also `wi_lora_a` [E, D, r], `wi_lora_b` [E, r, F] (for
  each input kernel), `wo_lora_a` [E, F, r] and `wo_lora_b` [E, r, D],
  scaled by `lora_alpha` / r (module docstring).

  __call__: buffers [G, E, C, D] -> [G, E, C, D].

  Under `jax.set_mesh(mesh)` with an 'expert' axis and more than one device
  the experts run expert-parallel (`sharding.expert_parallel_ffn`); the
  params (names, shapes, init) do not depend on the mesh.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    g, e, c, d = x.shape
    f = self.d_ff
    mesh = sharding.expert_parallel_mesh()
    if mesh is not None:  # The same params as _ffn's.
      wis, wo = _kernels(self, (e, d, f), (e, f, d), expert_kernel_init())
      return sharding.expert_parallel_ffn(
          x, wis, wo, _NONLINEARITY[self.activation], self.dtype, mesh)
    # Expert-major [E, G*C, D]: one plain GEMM per expert. Contracting the
    # [G, E, C, D] layout directly made XLA transpose operands and outputs
    # (measured on CPU: up to 1.7x slower at E=256; experiments/benchmark.py).
    x = x.transpose(1, 0, 2, 3).reshape(e, g * c, d)
    y = _ffn(self, x, (e, d, f), (e, f, d), expert_kernel_init(),
             'END,EDF->ENF', 'ENF,EFD->END')  # [E, G*C, D]
    return y.reshape(e, g, c, d).transpose(1, 0, 2, 3)  # [G, E, C, D]


class DenseFfn(nn.Module):
  """One FFN on every token: x [..., D] -> [..., D].

  Params: `wi` [D, F] (or `wi_0`, `wi_1` when gated) and `wo` [F, D]; with
  `lora_rank` r > 0 also `<w>_lora_a` [in, r] and `<w>_lora_b` [r, out] of
  each. Used for dense layers, the dense baseline, and shared experts.
  """
  d_ff: int
  activation: str = 'relu'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora_rank: int = 0
  lora_alpha: float = 16.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
    return _ffn(self, x, (d, self.d_ff), (self.d_ff, d), init,
                '...D,DF->...F', '...F,FD->...D')


class RaggedExpertBank(_Bank):
  """The expert bank on expert-sorted rows, as grouped matmuls.

  Same params as `ExpertBank` (names, shapes, init), so a checkpoint works
  with either dispatcher. Uses `jax.lax.ragged_dot`: exact everywhere, a
  grouped-matmul kernel on GPU/TPU, a masked dense op on CPU.

  __call__: rows [N, D] sorted by expert, group_sizes [E] (rows per expert,
  sum <= N) -> [N, D]; rows past sum(group_sizes) come out zero.
  """

  @nn.compact
  def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    e, d, f = self.num_experts, x.shape[-1], self.d_ff
    group_sizes = group_sizes.astype(jnp.int32)
    grouped = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes)  # [N, .]
    return _ffn(self, x, (e, d, f), (e, f, d), expert_kernel_init(),
                grouped, grouped)


class BlockedExpertBank(_Bank):
  """The expert bank on block-padded expert-sorted rows (moejax.blocked).

  Same params as `ExpertBank` (names, shapes, init). Every block of b rows
  belongs to one expert and is multiplied by that expert's weights in a
  loop over the used blocks (`blocked.block_matmul`, custom VJP): no
  [G, E, C, D] buffers, no masked dense op; the dropless path on CPU.

  __call__: rows [P, D] (P = b * Bk), plan -> [P, D]; padding rows and
  blocks past plan.used_blocks come out zero.
  """

  @nn.compact
  def __call__(self, x: jax.Array, plan: blocked.BlockPlan) -> jax.Array:
    e, d, f = self.num_experts, x.shape[-1], self.d_ff
    wis, wo = _kernels(self, (e, d, f), (e, f, d), expert_kernel_init())
    cast = lambda w: jax.tree.map(lambda t: t.astype(self.dtype), w)
    return blocked.blocked_ffn(x.astype(self.dtype), cast(wis), cast(wo),
                               plan, _NONLINEARITY[self.activation])


class TokenExpertBank(_Bank):
  """The expert bank applied token by token: each token's K chosen experts'
  weights are gathered and applied to it (no buffers, no capacity slots).

  Same params as `ExpertBank` (names, shapes, init). It reads N*K expert
  weight sets, one (token, choice) pair at a time (`lax.map` over a
  dynamic index of the expert axis: measured ~5x faster on CPU than
  materialising the gathered [N, K, D, F] weights), so it is the fast path
  when few tokens meet many experts (decoding: N*K < E, where the buffer
  dispatchers run all E experts); for many tokens, or for training, the
  buffer dispatchers are faster.

  __call__: x [N, D], expert_index [N, K] -> [N, K, D], the output of
  expert expert_index[n, k] on token n.
  """

  @nn.compact
  def __call__(self, x: jax.Array, expert_index: jax.Array) -> jax.Array:
    e, d, f = self.num_experts, x.shape[-1], self.d_ff
    n, k = expert_index.shape
    idx = expert_index.reshape(n * k).astype(jnp.int32)

    def per_choice(rows, w):  # [N*K, in] x [E, in, out] -> [N*K, out]
      return jax.lax.map(
          lambda r: r[0] @ jax.lax.dynamic_index_in_dim(w, r[1], 0, False),
          (rows, idx))

    matmul_in = lambda a, w: per_choice(jnp.repeat(a, k, axis=0),
                                        w).reshape(n, k, -1)  # [N, K, F]
    matmul_out = lambda h, w: per_choice(h.reshape(n * k, -1),
                                         w).reshape(n, k, -1)  # [N, K, D]
    return _ffn(self, x, (e, d, f), (e, f, d), expert_kernel_init(),
                matmul_in, matmul_out)
