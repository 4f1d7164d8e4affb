"""A decoder-only Transformer language model with optional MoE FFN layers.

Axis letters: B batch, L sequence length, D model width, H heads, Dh head
width (D / H), F FFN hidden width, E experts, K chosen experts, V vocab.

Block i (pre-norm):
    x = x + attn(attn_norm(x))      causal multi-head self-attention, RoPE
    x = x + ffn(ffn_norm(x))        DenseFfn, or MoeLayer(causal=True)
Block i has an MoE FFN iff MoE is on and i is in
`moe_layer_indices(num_layers, moe_every, first_dense_layers)`.

Param tree of a TransformerLM (shapes for activation 'relu' | 'gelu'):

    embed/embedding              [V, D]
    block_{i}/attn_norm/scale    [D]
    block_{i}/attn/query         [D, H, Dh]
    block_{i}/attn/key           [D, H, Dh]
    block_{i}/attn/value         [D, H, Dh]
    block_{i}/attn/out           [H, Dh, D]
    block_{i}/ffn_norm/scale     [D]
    dense block:
      block_{i}/ffn/wi           [D, F]
      block_{i}/ffn/wo           [F, D]
    MoE block:
      block_{i}/ffn/router/kernel   [D, E]  (float32 always)
      block_{i}/ffn/experts/wi      [E, D, F]
      block_{i}/ffn/experts/wo      [E, F, D]
    final_norm/scale             [D]
    head/kernel                  [D, V]  (only if tie_embeddings=False)

Gated activations ('swiglu' | 'geglu') replace `wi` by `wi_0` and `wi_1` of
the same shape. With tied embeddings the logits are
`final_norm(x) @ embedding.T / sqrt(D)` (the 1/sqrt(D) keeps unit-variance
embeddings from giving logits of scale sqrt(D) at init, as in T5/Mesh TF).

RNG streams: 'router' only, and only for MoE layers with `jitter_eps > 0` or
`second_expert_policy='random'` when `deterministic=False`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from moejax.experts import DenseFfn
from moejax.layers import MoeLayer

# MoeLayer arguments the model sets itself; a `moe` mapping may not hold them.
RESERVED_MOE_KEYS = ('d_ff', 'activation', 'dtype', 'param_dtype', 'causal')
# Per-layer aux entries averaged over the MoE layers into the model's aux.
MEAN_AUX_KEYS = ('aux_loss', 'z_loss', 'drop_fraction', 'max_violation')


def _check_int(name: str, value, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f'{name} must be an int >= {minimum}, got {value!r}.')


def moe_layer_indices(num_layers: int, moe_every: int = 1,
                      first_dense_layers: int = 0) -> tuple[int, ...]:
  """Which blocks get an MoE FFN (when MoE is on at all).

  Block i (0-based) is MoE iff i >= first_dense_layers and
  (i + 1 - first_dense_layers) % moe_every == 0, so moe_every=2 gives
  1, 3, 5, ... (GShard / Switch "every other layer").

  Args:
    num_layers: number of blocks (>= 0).
    moe_every: one MoE block in every `moe_every` (>= 1).
    first_dense_layers: leading blocks that are always dense (>= 0).

  Returns:
    Sorted tuple of block indices. Example: (6, 2, 1) -> (2, 4).
  """
  _check_int('num_layers', num_layers, 0)
  _check_int('moe_every', moe_every, 1)
  _check_int('first_dense_layers', first_dense_layers, 0)
  return tuple(i for i in range(first_dense_layers, num_layers)
               if (i + 1 - first_dense_layers) % moe_every == 0)


def apply_rope(x: jax.Array, positions: jax.Array,
               base: float = 10000.0) -> jax.Array:
  """Rotary position embedding (rotate-half / GPT-NeoX pairing).

  Feature j < Dh/2 is paired with feature j + Dh/2 and the pair is rotated
  by the angle position * base^(-2j/Dh). Rotations preserve norms, and
  <rope(q, i), rope(k, j)> depends on i - j only. Computed in float32.

  Args:
    x: [B, L, H, Dh] queries or keys, Dh even.
    positions: [L] or [B, L] integer (or float) positions.
    base: the frequency base (10000 in RoFormer).

  Returns:
    [B, L, H, Dh], same dtype as x.
  """
  dh = x.shape[-1]
  if dh % 2:
    raise ValueError(f'apply_rope needs an even head width, got {dh}.')
  half = dh // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / dh)
  pos = jnp.asarray(positions, jnp.float32)
  angle = pos[..., None] * inv_freq  # [L, Dh/2] or [B, L, Dh/2]
  if angle.ndim == 2:
    angle = angle[None]
  cos = jnp.cos(angle)[:, :, None, :]  # [B or 1, L, 1, Dh/2]
  sin = jnp.sin(angle)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention_mask(length: int,
                   padding_mask: Optional[jax.Array] = None,
                   causal: bool = True) -> jax.Array:
  """Which keys each query may attend to: causal (if asked), and not padding.

  Args:
    length: L.
    padding_mask: optional [B, L] bool, True = padding.
    causal: only keys j <= i (decoder); False: every real key (encoder).

  Returns:
    [B or 1, 1, L, L] bool, [b, 0, i, j] True iff (j <= i or not causal)
    and key j is real.
  """
  allowed = jnp.ones((length, length), bool)
  if causal:
    allowed = jnp.tril(allowed)
  allowed = allowed[None, None]
  if padding_mask is None:
    return allowed
  return allowed & ~padding_mask.astype(bool)[:, None, None, :]


def _matrix_init(num_in_axes: int) -> nn.initializers.Initializer:
  """Fan-in truncated normal for a kernel whose first `num_in_axes` axes are
  inputs, e.g. [D, H, Dh] (1) or [H, Dh, D] (2).

  Draws a 2-D [in, out] matrix and reshapes it: same distribution as
  variance_scaling with tuple axes, but XLA:CPU compiles 3-D threefry draws
  with small minor axes very slowly (seconds per kernel).
  """
  base = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')

  def init(key, shape, dtype=jnp.float32):
    fan_in = math.prod(shape[:num_in_axes])
    return base(key, (fan_in, math.prod(shape) // fan_in), dtype).reshape(
        shape)

  return init


class CausalSelfAttention(nn.Module):
  """Multi-head self-attention with RoPE on q and k, no biases; causal
  unless `causal=False` (the encoder).

  Params: `query`, `key`, `value` [D, H, Dh] and `out` [H, Dh, D].
  Scores and softmax are float32; a query with no allowed key (a padding
  position with only padding before it) outputs zeros.

  Attributes:
    num_heads: H (must divide D).
    rope_base: RoPE frequency base.
    dtype: compute dtype of the projections and the value mixing.
    param_dtype: storage dtype of the kernels.
    causal: mask future keys (False: bidirectional, for encoders).
  """
  num_heads: int
  rope_base: float = 10000.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x: jax.Array,
               padding_mask: Optional[jax.Array] = None) -> jax.Array:
    """Attends causally.

    Args:
      x: [B, L, D].
      padding_mask: optional [B, L] bool, True = padding (never a key).

    Returns:
      [B, L, D] in `dtype`.
    """
    _, l, d = x.shape
    h = self.num_heads
    dh = d // h
    in_init = _matrix_init(1)  # fan_in = D
    out_init = _matrix_init(2)  # fan_in = H * Dh
    x = x.astype(self.dtype)
    q, k, v = (jnp.einsum('BLD,DHK->BLHK', x, self.param(
        name, in_init, (d, h, dh), self.param_dtype).astype(self.dtype))
               for name in ('query', 'key', 'value'))
    positions = jnp.arange(l)
    q = apply_rope(q, positions, self.rope_base)
    k = apply_rope(k, positions, self.rope_base)
    scores = jnp.einsum('BLHK,BMHK->BHLM', q, k,
                        preferred_element_type=jnp.float32)
    scores = scores.astype(jnp.float32) / jnp.sqrt(jnp.float32(dh))
    mask = attention_mask(l, padding_mask, self.causal)  # [B|1, 1, L, L]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)
    mixed = jnp.einsum('BHLM,BMHK->BLHK', probs.astype(self.dtype), v)
    out = self.param('out', out_init, (h, dh, d), self.param_dtype)
    return jnp.einsum('BLHK,HKD->BLD', mixed, out.astype(self.dtype))


class Block(nn.Module):
  """One pre-norm block: attention then a dense or MoE FFN.

  Attributes:
    num_heads: H.
    d_ff: F (each expert's width for MoE).
    activation: FFN activation.
    moe: MoeLayer keyword args (hashable mapping) or None for a dense FFN.
    rope_base: RoPE base.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    causal: causal attention and MoeLayer(causal=True) (decoder); False for
      the encoder.
  """
  num_heads: int
  d_ff: int
  activation: str = 'gelu'
  moe: Optional[Mapping] = None
  rope_base: float = 10000.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, padding_mask: Optional[jax.Array] = None,
               deterministic: bool = True):
    """Applies the block.

    Args:
      x: [B, L, D] residual stream.
      padding_mask: optional [B, L] bool, True = padding.
      deterministic: eval mode (passed to the MoeLayer).

    Returns:
      x [B, L, D] and the MoeLayer aux dict (None for a dense block).
    """
    norm = lambda name: nn.RMSNorm(dtype=self.dtype,
                                   param_dtype=self.param_dtype, name=name)
    h = norm('attn_norm')(x)
    x = x + CausalSelfAttention(self.num_heads, self.rope_base, self.dtype,
                                self.param_dtype, self.causal,
                                name='attn')(h, padding_mask)
    h = norm('ffn_norm')(x)
    if self.moe is None:
      y = DenseFfn(self.d_ff, self.activation, self.dtype, self.param_dtype,
                   name='ffn')(h)
      return x + y.astype(x.dtype), None
    y, aux = MoeLayer(**self.moe, d_ff=self.d_ff, activation=self.activation,
                      causal=self.causal, dtype=self.dtype,
                      param_dtype=self.param_dtype, name='ffn')(
                          h, padding_mask=padding_mask,
                          deterministic=deterministic)
    return x + y.astype(x.dtype), aux


def freeze_moe(moe: Optional[Mapping], d_ff: int = 1,
               causal: bool = True) -> Optional[FrozenDict]:
  """Validates a `moe` mapping; returns it frozen, or None if MoE is off.

  Args:
    moe: MoeLayer keyword args, or None.
    d_ff: the model's F (checked against `granularity`).
    causal: the model is causal (non-causal routers are refused).

  Returns:
    The mapping as a FrozenDict, or None (no MoE, or num_experts == 0).
  """
  if moe is None:
    return None
  if not isinstance(moe, Mapping):
    raise ValueError(f'moe must be a mapping of MoeLayer args or None, got '
                     f'{moe!r}.')
  moe = FrozenDict(moe)
  if 'num_experts' not in moe:
    raise ValueError('moe must set num_experts (0 for a dense model).')
  if moe['num_experts'] == 0:
    return None
  reserved = sorted(set(moe) & set(RESERVED_MOE_KEYS))
  if reserved:
    raise ValueError(f'moe may not set {", ".join(reserved)}: the model '
                     'passes them to every MoeLayer.')
  try:  # Runs MoeLayer's own validation now, before anything compiles.
    MoeLayer(**moe, d_ff=d_ff, causal=causal, parent=None)
  except TypeError as e:
    raise ValueError(f'moe holds an unknown MoeLayer argument: {e}') from e
  return moe


class TransformerLM(nn.Module):
  """Decoder-only Transformer LM: tokens [B, L] -> (logits [B, L, V], aux).

  Attributes (the first four are required; pass all by keyword):
    num_layers: number of blocks.
    d_model: D.
    num_heads: H; must divide D, and D / H must be even (RoPE).
    d_ff: F, the dense FFN width and each expert's width.
    vocab_size: V (256: bytes).
    activation: 'relu' | 'gelu' | 'swiglu' | 'geglu'.
    moe: keyword args for MoeLayer (all but d_ff, activation, dtype,
      param_dtype, causal); None or num_experts == 0 means all dense.
      Stored as a FrozenDict so the module stays hashable.
    moe_every: one MoE block in every `moe_every` (see moe_layer_indices).
    first_dense_layers: leading blocks that are always dense.
    tie_embeddings: output logits through the input embedding.
    rope_base: RoPE frequency base.
    dtype: compute dtype (logits are always float32).
    param_dtype: parameter dtype (the routers are always float32).
  """
  num_layers: int
  d_model: int
  num_heads: int
  d_ff: int
  vocab_size: int = 256
  activation: str = 'gelu'
  moe: Optional[Mapping] = None
  moe_every: int = 1
  first_dense_layers: int = 0
  tie_embeddings: bool = True
  rope_base: float = 10000.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # Read by the train step (moejax.train.step): next-token cross-entropy.
  task = 'lm'

  def __post_init__(self):
    for name, minimum in (('vocab_size', 1), ('num_layers', 0),
                          ('d_model', 1), ('num_heads', 1), ('d_ff', 1)):
      _check_int(name, getattr(self, name), minimum)
    if self.d_model % self.num_heads:
      raise ValueError(f'num_heads={self.num_heads} must divide '
                       f'd_model={self.d_model}.')
    if (self.d_model // self.num_heads) % 2:
      raise ValueError(f'd_model / num_heads = {self.d_model} / '
                       f'{self.num_heads} must be even for RoPE.')
    moe_layer_indices(self.num_layers, self.moe_every,
                      self.first_dense_layers)  # validates the placement args
    object.__setattr__(self, 'moe', freeze_moe(self.moe, self.d_ff))
    super().__post_init__()

  @property
  def moe_layers(self) -> tuple[int, ...]:
    """Indices of the MoE blocks; () when MoE is off."""
    if self.moe is None:
      return ()
    return moe_layer_indices(self.num_layers, self.moe_every,
                             self.first_dense_layers)

  def _logits(self, embed: nn.Embed, x: jax.Array) -> jax.Array:
    """Final-normed x [B, L, D] -> float32 logits [B, L, V]."""
    if self.tie_embeddings:
      logits = embed.attend(x) / jnp.sqrt(jnp.float32(self.d_model))
    else:
      logits = nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name='head')(x)
    return logits.astype(jnp.float32)

  @nn.compact
  def __call__(self, tokens: jax.Array,
               padding_mask: Optional[jax.Array] = None,
               deterministic: bool = True):
    """Runs the model.

    Args:
      tokens: [B, L] int32 token ids in [0, V).
      padding_mask: optional [B, L] bool, True = padding: never an attention
        key and never routed (no expert capacity, not in any MoE metric).
      deterministic: eval mode for the MoE layers (eval capacity factor, no
        router jitter).

    Returns:
      logits [B, L, V] float32, and aux: {'layers': {'block_i': MoeLayer
      aux dict} for the MoE blocks, plus 'aux_loss', 'z_loss',
      'drop_fraction', 'max_violation', float32 scalars averaged over the MoE
      blocks (0.0 if there are none)}.
    """
    embed = nn.Embed(self.vocab_size, self.d_model,
                     embedding_init=nn.initializers.normal(stddev=1.0),
                     dtype=self.dtype, param_dtype=self.param_dtype,
                     name='embed')
    x = embed(tokens.astype(jnp.int32))  # [B, L, D]
    moe_layers = set(self.moe_layers)
    layer_aux = {}
    for i in range(self.num_layers):
      name = f'block_{i}'
      x, aux = Block(self.num_heads, self.d_ff, self.activation,
                     self.moe if i in moe_layers else None, self.rope_base,
                     self.dtype, self.param_dtype, name=name)(
                         x, padding_mask, deterministic)
      if aux is not None:
        layer_aux[name] = aux
    x = nn.RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                   name='final_norm')(x)
    return self._logits(embed, x), summarize_aux(layer_aux)


def summarize_aux(layer_aux: Mapping[str, Mapping[str, jax.Array]]) -> dict:
  """Averages the per-layer MoE aux entries into the model's aux dict.

  Args:
    layer_aux: {block_name: MoeLayer aux dict}, possibly empty.

  Returns:
    {'layers': dict(layer_aux), and for each of aux_loss, z_loss,
    drop_fraction, max_violation the float32 scalar mean over layers
    (0.0 with no layers)}.
  """
  out = {'layers': dict(layer_aux)}
  for key in MEAN_AUX_KEYS:
    values = [jnp.asarray(a[key], jnp.float32) for a in layer_aux.values()]
    out[key] = (jnp.mean(jnp.stack(values)) if values
                else jnp.zeros((), jnp.float32))
  return out
