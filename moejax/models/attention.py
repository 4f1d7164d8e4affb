"""Self-attention for the decoder and encoder: multi-head / grouped-query
attention (GQA) and DeepSeek's multi-head latent attention (MLA), with an
optional KV cache for decoding.

Axis letters: B batch, L query length, M key length (L, or the cache length
when decoding), D model width, H query heads, KV key/value heads (H for
plain multi-head attention), Dh head width, Dn / Dr the no-RoPE / RoPE part
of an MLA query-key head, Dv an MLA value head, Rq / Rkv the MLA low ranks.

Param tree of `SelfAttention` (names the checkpoint converters rely on):

    query        [D, H, Dh]      key, value  [D, KV, Dh]      out  [H, Dh, D]
    query_bias   [H, Dh]         key_bias, value_bias [KV, Dh]    (bias=True)
    query_norm/scale, key_norm/scale  [Dh] (qk_norm='head') or
                                      [H*Dh] / [KV*Dh] (qk_norm='full')

Param tree of `LatentAttention` (MLA, DeepSeek-V2/V3):

    q_a [D, Rq], q_a_norm/scale [Rq], q_b [Rq, H, Dn+Dr]   (q_lora_rank set)
    query [D, H, Dn+Dr]                                    (q_lora_rank None)
    kv_a [D, Rkv+Dr], kv_a_norm/scale [Rkv], kv_b [Rkv, H, Dn+Dv]
    out  [H, Dv, D]

Scores and softmax are float32 in both. The cache (collection 'cache') holds
the keys and values after RoPE, `key` / `value` [B, M, KV, Dh] (MLA: the
expanded per-head keys and values, not the compressed latent), and `index`,
the number of positions written.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

QK_NORMS = ('none', 'head', 'full')
ATTENTION_KINDS = ('mha', 'mla')


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
  """How a block attends (hashable, so it can be a module attribute).

  Attributes:
    kind: 'mha' (multi-head / grouped-query) | 'mla' (latent, DeepSeek).
    num_kv_heads: KV heads for 'mha' (None = H; must divide H).
    head_dim: Dh for 'mha' (None = D / H).
    qk_norm: 'none' | 'head' (RMSNorm over each head's Dh: Qwen3) | 'full'
      (RMSNorm over the whole H*Dh projection: OLMoE).
    bias: q, k, v projection biases (Qwen2).
    norm_eps: epsilon of the q/k (and MLA latent) RMSNorms.
    rope_base: RoPE frequency base (rope_theta).
    rope_interleave: pair features (2j, 2j+1) instead of (j, j + Dh/2)
      (DeepSeek's checkpoints; the pairing, not the output order, sets the
      scores).
    q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim,
      v_head_dim: MLA's Rq (None = a full-rank query), Rkv, Dn, Dr, Dv.
    sliding_window: keys a query may see (None = all); only the case
      window >= L is supported (a longer sequence is refused).
  """
  kind: str = 'mha'
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  qk_norm: str = 'none'
  bias: bool = False
  norm_eps: float = 1e-6
  rope_base: float = 10000.0
  rope_interleave: bool = False
  q_lora_rank: Optional[int] = None
  kv_lora_rank: int = 0
  qk_nope_head_dim: int = 0
  qk_rope_head_dim: int = 0
  v_head_dim: int = 0
  sliding_window: Optional[int] = None

  def validate(self, d_model: int, num_heads: int) -> None:
    """Raises ValueError naming the bad option and the allowed values."""
    if self.kind not in ATTENTION_KINDS:
      raise ValueError(f'attention={self.kind!r} is not supported; allowed '
                       f'values: {", ".join(map(repr, ATTENTION_KINDS))}.')
    if self.qk_norm not in QK_NORMS:
      raise ValueError(f'qk_norm={self.qk_norm!r} is not supported; allowed '
                       f'values: {", ".join(map(repr, QK_NORMS))}.')
    if not self.norm_eps > 0:
      raise ValueError(f'norm_eps must be > 0, got {self.norm_eps!r}.')
    if not self.rope_base > 0:
      raise ValueError(f'rope_base must be > 0, got {self.rope_base!r}.')
    if self.sliding_window is not None:
      _check_int('sliding_window', self.sliding_window, 1)
    if self.kind == 'mla':
      self._validate_mla()
      return
    kv = self.num_kv_heads or num_heads
    _check_int('num_kv_heads', kv, 1)
    if num_heads % kv:
      raise ValueError(f'num_kv_heads={kv} must divide num_heads='
                       f'{num_heads} (each KV head serves H / KV query '
                       'heads).')
    if self.head_dim is None and d_model % num_heads:
      raise ValueError(f'num_heads={num_heads} must divide d_model='
                       f'{d_model} (or set head_dim).')
    dh = self.head_dim or d_model // num_heads
    _check_int('head_dim', dh, 2)
    if dh % 2:
      raise ValueError(f'head_dim={dh} must be even for RoPE.')

  def _validate_mla(self) -> None:
    for name in ('kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim',
                 'v_head_dim'):
      _check_int(name, getattr(self, name), 1)
    if self.q_lora_rank is not None:
      _check_int('q_lora_rank', self.q_lora_rank, 1)
    if self.qk_rope_head_dim % 2:
      raise ValueError(f'qk_rope_head_dim={self.qk_rope_head_dim} must be '
                       'even for RoPE.')
    for name, value in (('num_kv_heads', self.num_kv_heads),
                        ('head_dim', self.head_dim), ('bias', self.bias),
                        ('qk_norm', self.qk_norm)):
      if value not in (None, False, 'none'):
        raise ValueError(f"{name}={value!r} applies to attention='mha' "
                         "only; with attention='mla' leave it unset.")


def _check_int(name: str, value, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f'{name} must be an int >= {minimum}, got {value!r}.')


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0,
               interleave: bool = False) -> jax.Array:
  """Rotary position embedding.

  Default (rotate-half / GPT-NeoX pairing): feature j < Dh/2 is paired with
  feature j + Dh/2. `interleave=True`: feature 2j with 2j+1 (GPT-J, and
  DeepSeek's checkpoints); the output then holds the rotated pairs as
  [all first members, all second members], which leaves every q.k score
  the same as rotating in place. Pair j turns by position * base^(-2j/Dh).
  Rotations preserve norms, and <rope(q, i), rope(k, j)> depends on i - j
  only. Computed in float32.

  Args:
    x: [B, L, H, Dh] queries or keys, Dh even.
    positions: [L] or [B, L] integer (or float) positions.
    base: the frequency base (10000 in RoFormer).
    interleave: the (2j, 2j+1) pairing.

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
  if interleave:
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
  else:
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


def matrix_init(num_in_axes: int) -> nn.initializers.Initializer:
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


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
           dtype: Any) -> jax.Array:
  """Softmax attention, scores and softmax in float32.

  Args:
    q: [B, L, H, Dq] queries (after RoPE).
    k: [B, M, KV, Dq] keys; KV divides H, query head i reads KV head
      i // (H / KV).
    v: [B, M, KV, Dv] values.
    mask: [B or 1, 1, L, M] bool, True where a query may see a key.
    dtype: compute dtype of the value mixing.

  Returns:
    [B, L, H, Dv]; a query with no allowed key gets zeros.
  """
  rep = q.shape[2] // k.shape[2]
  if rep > 1:
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  scores = jnp.einsum('BLHK,BMHK->BHLM', q, k,
                      preferred_element_type=jnp.float32)
  scores = scores.astype(jnp.float32) / jnp.sqrt(jnp.float32(q.shape[-1]))
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)
  return jnp.einsum('BHLM,BMHK->BLHK', probs.astype(dtype), v.astype(dtype))


class _AttentionBase(nn.Module):
  """What both attentions share: the mask, the KV cache and the output."""
  num_heads: int
  options: AttentionOptions = AttentionOptions()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  causal: bool = True

  def _check_window(self, length: int) -> None:
    window = self.options.sliding_window
    if window is not None and length > window:
      raise ValueError(
          f'sliding_window={window} is shorter than the {length} positions '
          'attended here; sliding-window attention is not implemented, so '
          f'allowed: sequences (prompt + generated) of at most {window} '
          'tokens.')

  def _norm(self, name: str) -> nn.Module:
    return nn.RMSNorm(epsilon=self.options.norm_eps, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=name)

  def _positions(self, length: int, decode: bool,
                 positions: Optional[jax.Array] = None) -> jax.Array:
    """[L] positions of this call's queries: 0..L-1, or after the cached
    ones when decoding; `positions` ([B, L], e.g. a Mixture-of-Depths
    block's selected tokens) when given."""
    if positions is not None:
      return positions
    positions = jnp.arange(length)
    if decode and self.has_variable('cache', 'index'):
      positions = positions + self.get_variable('cache', 'index')
    return positions

  def _keys_values(self, k, v, padding_mask, decode: bool):
    """Keys, values and mask for this call's queries.

    Without `decode`: keys = k (positions 0..L-1), mask causal/padding.
    With `decode`: writes k, v [B, L, KV, .] (after RoPE) into the cache at
    `index` and returns the whole cache, each query seeing the cached
    positions up to its own. The first call (inside `model.init`) only
    creates the cache, of this call's length M.

    Returns:
      (k [B, M, KV, Dq], v [B, M, KV, Dv], mask [B|1, 1, L, M] bool).
    """
    l = k.shape[1]
    if not decode:
      self._check_window(l)
      return k, v, attention_mask(l, padding_mask, self.causal)
    if padding_mask is not None or not self.causal:
      raise ValueError('decode=True supports causal attention without a '
                       'padding_mask (equal-length prompts) only.')
    initialized = self.has_variable('cache', 'key')
    ck = self.variable('cache', 'key', jnp.zeros, k.shape, k.dtype)
    cv = self.variable('cache', 'value', jnp.zeros, v.shape, v.dtype)
    index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
    if not initialized:
      self._check_window(l)
      return k, v, attention_mask(l, None, True)
    m = ck.value.shape[1]
    self._check_window(m)
    if l > m:
      raise ValueError(f'decode=True got {l} positions for a KV cache of '
                       f'{m}; allowed: at most {m} per call (and in all: '
                       'positions past the cache are not checked inside '
                       'jit, so size the cache for prompt + new tokens).')
    start = index.value
    ck.value = jax.lax.dynamic_update_slice(
        ck.value, k.astype(ck.value.dtype), (0, start, 0, 0))
    cv.value = jax.lax.dynamic_update_slice(
        cv.value, v.astype(cv.value.dtype), (0, start, 0, 0))
    index.value = start + l
    positions = start + jnp.arange(l)  # [L]
    mask = jnp.arange(m)[None, :] <= positions[:, None]  # [L, M]
    return ck.value, cv.value, mask[None, None]

  def _out(self, mixed: jax.Array, d: int) -> jax.Array:
    """[B, L, H, Dv] -> [B, L, D] through `out` [H, Dv, D]."""
    _, _, h, dv = mixed.shape
    out = self.param('out', matrix_init(2), (h, dv, d), self.param_dtype)
    return jnp.einsum('BLHK,HKD->BLD', mixed, out.astype(self.dtype))


class SelfAttention(_AttentionBase):
  """Multi-head / grouped-query self-attention with RoPE on q and k.

  Optional per-family parts (`options`): q/k/v biases, q/k RMSNorm per head
  or over the whole projection, KV heads fewer than query heads, a head
  width other than D / H. Causal unless `causal=False` (the encoder).

  Attributes:
    num_heads: H.
    options: AttentionOptions (kind 'mha').
    dtype: compute dtype of the projections and the value mixing.
    param_dtype: storage dtype of the kernels.
    causal: mask future keys (False: bidirectional, for encoders).
  """

  def _project(self, x, name: str, heads: int, dh: int) -> jax.Array:
    """[B, L, D] -> [B, L, heads, Dh] (+ bias)."""
    w = self.param(name, matrix_init(1), (x.shape[-1], heads, dh),
                   self.param_dtype)
    y = jnp.einsum('BLD,DHK->BLHK', x, w.astype(self.dtype))
    if self.options.bias:
      bias = self.param(f'{name}_bias', nn.initializers.zeros, (heads, dh),
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y

  def _qk_norm(self, y: jax.Array, name: str) -> jax.Array:
    """Per-head ('head') or whole-projection ('full') RMSNorm of q or k."""
    if self.options.qk_norm == 'none':
      return y
    if self.options.qk_norm == 'head':
      return self._norm(name)(y)
    b, l, h, dh = y.shape
    return self._norm(name)(y.reshape(b, l, h * dh)).reshape(b, l, h, dh)

  @nn.compact
  def __call__(self, x: jax.Array, padding_mask: Optional[jax.Array] = None,
               decode: bool = False, positions: Optional[jax.Array] = None,
               key_mask: Optional[jax.Array] = None) -> jax.Array:
    """Attends.

    Args:
      x: [B, L, D].
      padding_mask: optional [B, L] bool, True = padding (never a key).
      decode: use and extend the KV cache (collection 'cache').
      positions: optional [B, L] RoPE positions of the L tokens (default
        0..L-1, or after the cache); the mask stays causal in the L order.
      key_mask: optional [B, M] bool, True = may be a key (M = L, or the
        cache length when decoding); ANDed into the mask.

    Returns:
      [B, L, D] in `dtype`.
    """
    d = x.shape[-1]
    h = self.num_heads
    kvh = self.options.num_kv_heads or h
    dh = self.options.head_dim or d // h
    x = x.astype(self.dtype)
    q = self._qk_norm(self._project(x, 'query', h, dh), 'query_norm')
    k = self._qk_norm(self._project(x, 'key', kvh, dh), 'key_norm')
    v = self._project(x, 'value', kvh, dh)
    positions = self._positions(x.shape[1], decode, positions)
    rope = lambda t: apply_rope(t, positions, self.options.rope_base,
                                self.options.rope_interleave)
    q, k = rope(q), rope(k)
    k, v, mask = self._keys_values(k, v, padding_mask, decode)
    if key_mask is not None:
      mask = mask & key_mask[:, None, None, :]
    return self._out(attend(q, k, v, mask, self.dtype), d)


class LatentAttention(_AttentionBase):
  """DeepSeek multi-head latent attention (MLA).

  q = (x W_qa -> RMSNorm -> W_qb) or x W_q, split per head into a no-RoPE
  part [Dn] and a RoPE part [Dr]; x W_kva splits into a latent [Rkv] and one
  shared RoPE key [Dr]; RMSNorm(latent) W_kvb gives per-head k_nope [Dn] and
  v [Dv]. Keys are [k_nope, rope(k_pe)], queries [q_nope, rope(q_pe)];
  scores scale 1 / sqrt(Dn + Dr).

  Attributes: as `SelfAttention` (options.kind 'mla').
  """

  def _kernel(self, name: str, shape) -> jax.Array:
    w = self.param(name, matrix_init(1), shape, self.param_dtype)
    return w.astype(self.dtype)

  def _query(self, x: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, L, H, Dn + Dr]."""
    o, h = self.options, self.num_heads
    dq = o.qk_nope_head_dim + o.qk_rope_head_dim
    if o.q_lora_rank is None:
      return jnp.einsum('BLD,DHK->BLHK', x,
                        self._kernel('query', (x.shape[-1], h, dq)))
    low = x @ self._kernel('q_a', (x.shape[-1], o.q_lora_rank))
    low = self._norm('q_a_norm')(low)
    return jnp.einsum('BLR,RHK->BLHK', low,
                      self._kernel('q_b', (o.q_lora_rank, h, dq)))

  def _keys(self, x: jax.Array):
    """[B, L, D] -> k_nope [B, L, H, Dn], k_pe [B, L, 1, Dr], v [B, L, H, Dv]."""
    o, h = self.options, self.num_heads
    kv = x @ self._kernel('kv_a', (x.shape[-1],
                                   o.kv_lora_rank + o.qk_rope_head_dim))
    latent, k_pe = kv[..., :o.kv_lora_rank], kv[..., o.kv_lora_rank:]
    latent = self._norm('kv_a_norm')(latent)
    kv = jnp.einsum('BLR,RHK->BLHK', latent, self._kernel(
        'kv_b', (o.kv_lora_rank, h, o.qk_nope_head_dim + o.v_head_dim)))
    return (kv[..., :o.qk_nope_head_dim], k_pe[:, :, None, :],
            kv[..., o.qk_nope_head_dim:])

  @nn.compact
  def __call__(self, x: jax.Array, padding_mask: Optional[jax.Array] = None,
               decode: bool = False, positions: Optional[jax.Array] = None,
               key_mask: Optional[jax.Array] = None) -> jax.Array:
    """Attends; same contract as `SelfAttention.__call__`."""
    o = self.options
    d = x.shape[-1]
    x = x.astype(self.dtype)
    q = self._query(x)
    q_nope, q_pe = q[..., :o.qk_nope_head_dim], q[..., o.qk_nope_head_dim:]
    k_nope, k_pe, v = self._keys(x)
    positions = self._positions(x.shape[1], decode, positions)
    rope = lambda t: apply_rope(t, positions, o.rope_base, o.rope_interleave)
    q = jnp.concatenate([q_nope, rope(q_pe)], axis=-1)
    k_pe = jnp.broadcast_to(rope(k_pe), k_nope.shape[:3] + (k_pe.shape[-1],))
    k = jnp.concatenate([k_nope, k_pe], axis=-1)  # [B, L, H, Dn + Dr]
    k, v, mask = self._keys_values(k, v, padding_mask, decode)
    if key_mask is not None:
      mask = mask & key_mask[:, None, None, :]
    return self._out(attend(q, k, v, mask, self.dtype), d)
