"""Feed-forward experts: a bank of E FFNs with stacked weights, and a dense FFN.

Axis letters: G groups, E experts, C capacity, D model width, F hidden width,
N = G*C slots of one expert.

Activations: 'relu' and 'gelu' (one input projection `wi`), and the gated
'swiglu' / 'geglu' (gate projection `wi_0` through the nonlinearity, times
the linear projection `wi_1`). No biases, so an empty (all-zero) slot maps
to zero.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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


class ExpertBank(nn.Module):
  """E independent FFNs applied to their own buffers.

  Params: `wi` [E, D, F] (or `wi_0`, `wi_1` [E, D, F] when gated) and
  `wo` [E, F, D], stored in `param_dtype`, computed in `dtype`.

  __call__: buffers [G, E, C, D] -> [G, E, C, D].
  """
  num_experts: int
  d_ff: int
  activation: str = 'relu'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    check_activation(self.activation)
    g, e, c, d = x.shape
    f = self.d_ff
    # Expert-major [E, G*C, D]: one plain GEMM per expert. Contracting the
    # [G, E, C, D] layout directly made XLA transpose operands and outputs
    # (measured on CPU: up to 1.7x slower at E=256; experiments/benchmark.py).
    x = x.astype(self.dtype).transpose(1, 0, 2, 3).reshape(e, g * c, d)
    hidden = []
    for name in _input_names(self.activation):
      w = self.param(name, expert_kernel_init(), (e, d, f), self.param_dtype)
      hidden.append(jnp.einsum('END,EDF->ENF', x, w.astype(self.dtype)))
    h = _NONLINEARITY[self.activation](hidden[0])  # [E, G*C, F]
    if len(hidden) == 2:
      h = h * hidden[1]
    wo = self.param('wo', expert_kernel_init(), (e, f, d), self.param_dtype)
    y = jnp.einsum('ENF,EFD->END', h, wo.astype(self.dtype))  # [E, G*C, D]
    return y.reshape(e, g, c, d).transpose(1, 0, 2, 3)  # [G, E, C, D]


class DenseFfn(nn.Module):
  """One FFN on every token: x [..., D] -> [..., D].

  Params: `wi` [D, F] (or `wi_0`, `wi_1` when gated) and `wo` [F, D]. Used
  for dense layers, the dense baseline, and shared experts.
  """
  d_ff: int
  activation: str = 'relu'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    check_activation(self.activation)
    d = x.shape[-1]
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
    x = x.astype(self.dtype)
    hidden = []
    for name in _input_names(self.activation):
      w = self.param(name, init, (d, self.d_ff), self.param_dtype)
      hidden.append(x @ w.astype(self.dtype))
    h = _NONLINEARITY[self.activation](hidden[0])
    if len(hidden) == 2:
      h = h * hidden[1]
    wo = self.param('wo', init, (self.d_ff, d), self.param_dtype)
    return h @ wo.astype(self.dtype)
