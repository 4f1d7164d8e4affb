"""A decoder-only Transformer language model with optional MoE FFN layers.

Axis letters: B batch, L sequence length, D model width, H heads, Dh head
width (D / H), F FFN hidden width, E experts, K chosen experts, V vocab.

Block i (pre-norm):
    x = x + attn(attn_norm(x))      causal self-attention with RoPE:
                                    multi-head / grouped-query, or MLA
                                    (moejax.models.attention)
    x = x + ffn(ffn_norm(x))        DenseFfn, or MoeLayer(causal=True)
Block i has an MoE FFN iff MoE is on and i is in
`moe_layer_indices(num_layers, moe_every, first_dense_layers,
dense_layers)`; its dense FFN is `dense_d_ff` wide (default F).

Param tree of a TransformerLM (shapes for activation 'relu' | 'gelu'):

    embed/embedding              [V, D]
    block_{i}/attn_norm/scale    [D]
    block_{i}/attn/query         [D, H, Dh]
    block_{i}/attn/key           [D, KV, Dh]   (KV = num_kv_heads, default H)
    block_{i}/attn/value         [D, KV, Dh]
    block_{i}/attn/out           [H, Dh, D]
    (+ attn/query_bias etc. with attn_bias, attn/query_norm, key_norm with
    qk_norm, and MLA's tree with attention='mla': moejax.models.attention)
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
    LoRA (lora_rank r > 0): `<w>_lora_a` [.., in, r] and `<w>_lora_b`
    [.., r, out] beside each FFN kernel <w> of the targets in lora_targets:
    'experts' (ffn/experts/), 'shared' (ffn/shared/), 'dense' (a dense
    block's ffn/); see moejax.lora.

Gated activations ('swiglu' | 'geglu') replace `wi` by `wi_0` and `wi_1` of
the same shape. With tied embeddings the logits are
`final_norm(x) @ embedding.T / sqrt(D)` (the 1/sqrt(D) keeps unit-variance
embeddings from giving logits of scale sqrt(D) at init, as in T5/Mesh TF).

Decoding: `decode=True` runs the next positions against a KV cache
(collection 'cache'); `moejax.generate` drives it.

Mixture-of-Depths (`mod`): block i with (i + 1) % mod.every == 0 is a
`moejax.models.mod.ModBlock`: the same block (and param names) plus
`mod_router` (and `mod_predictor`), run on the top capacity fraction of
each sequence's tokens only; the others skip it.

RNG streams: 'router' only, and only for MoE layers with `jitter_eps > 0` or
`second_expert_policy='random'` when `deterministic=False`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from moejax import lora as lora_lib
from moejax.experts import DenseFfn
from moejax.layers import MoeLayer
from moejax.models.attention import AttentionOptions
from moejax.models.attention import LatentAttention
from moejax.models.attention import SelfAttention
from moejax.models.attention import apply_rope  # pylint: disable=unused-import
from moejax.models.attention import attention_mask  # pylint: disable=unused-import

# The attention module's former name (it was causal-only at first).
CausalSelfAttention = SelfAttention

# MoeLayer arguments the model sets itself; a `moe` mapping may not hold them.
RESERVED_MOE_KEYS = ('d_ff', 'activation', 'dtype', 'param_dtype', 'causal',
                     'lora_rank', 'lora_alpha', 'lora_targets')
# Per-layer aux entries averaged over the MoE layers into the model's aux.
MEAN_AUX_KEYS = ('aux_loss', 'z_loss', 'drop_fraction', 'max_violation')
# Entries only some routers report ('relu': reg_loss; 'relu' and null
# experts: active_experts), averaged over the layers that report them and
# absent from the model's aux when none does.
OPTIONAL_MEAN_AUX_KEYS = ('reg_loss', 'active_experts')
# The keys of TransformerLM.mla (DeepSeek multi-head latent attention).
MLA_KEYS = ('q_lora_rank', 'kv_lora_rank', 'qk_nope_head_dim',
            'qk_rope_head_dim', 'v_head_dim')


def _check_int(name: str, value, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f'{name} must be an int >= {minimum}, got {value!r}.')


def _mod_lib():
  """moejax.models.mod, imported on use (it imports this module)."""
  from moejax.models import mod  # pylint: disable=g-import-not-at-top
  return mod


def moe_layer_indices(num_layers: int, moe_every: int = 1,
                      first_dense_layers: int = 0,
                      dense_layers: Sequence[int] = ()) -> tuple[int, ...]:
  """Which blocks get an MoE FFN (when MoE is on at all).

  Block i (0-based) is MoE iff i >= first_dense_layers,
  (i + 1 - first_dense_layers) % moe_every == 0 and i is not in
  `dense_layers`, so moe_every=2 gives 1, 3, 5, ... (GShard / Switch "every
  other layer"; Qwen2-MoE's decoder_sparse_step), first_dense_layers is
  DeepSeek's first_k_dense_replace and dense_layers Qwen-MoE's
  mlp_only_layers.

  Args:
    num_layers: number of blocks (>= 0).
    moe_every: one MoE block in every `moe_every` (>= 1).
    first_dense_layers: leading blocks that are always dense (>= 0).
    dense_layers: further blocks that are always dense (indices in
      [0, num_layers)).

  Returns:
    Sorted tuple of block indices. Example: (6, 2, 1) -> (2, 4).
  """
  _check_int('num_layers', num_layers, 0)
  _check_int('moe_every', moe_every, 1)
  _check_int('first_dense_layers', first_dense_layers, 0)
  for i in dense_layers:
    if isinstance(i, bool) or not isinstance(i, int) or not (
        0 <= i < num_layers):
      raise ValueError(f'dense_layers holds {i!r}; allowed values: block '
                       f'indices in [0, {num_layers}).')
  return tuple(i for i in range(first_dense_layers, num_layers)
               if (i + 1 - first_dense_layers) % moe_every == 0 and
               i not in dense_layers)


class Block(nn.Module):
  """One pre-norm block: attention then a dense or MoE FFN.

  Attributes:
    num_heads: H.
    d_ff: F (each expert's width for MoE; the dense FFN's width otherwise).
    activation: FFN activation.
    moe: MoeLayer keyword args (hashable mapping) or None for a dense FFN.
    rope_base: RoPE base (used when `attention` is None).
    dtype: compute dtype.
    param_dtype: parameter dtype.
    causal: causal attention and MoeLayer(causal=True) (decoder); False for
      the encoder.
    attention: AttentionOptions (None: plain multi-head attention with
      `rope_base`).
    norm_eps: epsilon of the block's two RMSNorms.
    lora_rank: LoRA rank r of the FFNs in `lora_targets` (0 = none).
    lora_alpha: the adapters' scale is lora_alpha / r.
    lora_targets: 'dense' (a dense block's FFN), 'experts', 'shared' (an
      MoE block's routed and shared experts).
  """
  num_heads: int
  d_ff: int
  activation: str = 'gelu'
  moe: Optional[Mapping] = None
  rope_base: float = 10000.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  causal: bool = True
  attention: Optional[AttentionOptions] = None
  norm_eps: float = 1e-6
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple = ()

  def _attention(self) -> nn.Module:
    options = self.attention or AttentionOptions(rope_base=self.rope_base)
    kind = LatentAttention if options.kind == 'mla' else SelfAttention
    return kind(self.num_heads, options, self.dtype, self.param_dtype,
                self.causal, name='attn')

  @nn.compact
  def __call__(self, x: jax.Array, padding_mask: Optional[jax.Array] = None,
               deterministic: bool = True, decode: bool = False):
    """Applies the block.

    Args:
      x: [B, L, D] residual stream.
      padding_mask: optional [B, L] bool, True = padding.
      deterministic: eval mode (passed to the MoeLayer).
      decode: attend through the KV cache (see `SelfAttention`).

    Returns:
      x [B, L, D] and the MoeLayer aux dict (None for a dense block).
    """
    x, y, aux = self.updates(x, padding_mask, deterministic, decode)
    return x + y.astype(x.dtype), aux

  def updates(self, x: jax.Array, padding_mask: Optional[jax.Array],
              deterministic: bool, decode: bool,
              positions: Optional[jax.Array] = None,
              key_mask: Optional[jax.Array] = None,
              route_mask: Optional[jax.Array] = None):
    """The block's attention step and FFN output (inside a compact method).

    Args:
      x: [B, L, D] residual stream.
      padding_mask: optional [B, L] bool, True = padding (never a key).
      deterministic: eval mode (passed to the MoeLayer).
      decode: attend through the KV cache.
      positions: optional [B, L] RoPE positions (see `SelfAttention`).
      key_mask: optional [B, M] bool, True = may be a key.
      route_mask: optional [B, L] bool, True = not routed by the MoeLayer
        (default: padding_mask).

    Returns:
      x + a [B, L, D] (a the attention output), y [B, L, D] the FFN
      output on it (the block's output is x + a + y), and the MoeLayer aux
      dict (None for a dense FFN).
    """
    norm = lambda name: nn.RMSNorm(epsilon=self.norm_eps, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name=name)
    h = norm('attn_norm')(x)
    x = x + self._attention()(h, padding_mask, decode, positions=positions,
                              key_mask=key_mask)
    h = norm('ffn_norm')(x)
    if self.moe is None:
      rank = self.lora_rank if 'dense' in self.lora_targets else 0
      y = DenseFfn(self.d_ff, self.activation, self.dtype, self.param_dtype,
                   lora_rank=rank, lora_alpha=self.lora_alpha,
                   name='ffn')(h)
      return x, y, None
    targets = tuple(t for t in self.lora_targets if t != 'dense')
    y, aux = MoeLayer(**self.moe, d_ff=self.d_ff, activation=self.activation,
                      causal=self.causal, dtype=self.dtype,
                      param_dtype=self.param_dtype, lora_rank=self.lora_rank,
                      lora_alpha=self.lora_alpha, lora_targets=targets,
                      name='ffn')(
                          h, padding_mask=(padding_mask if route_mask is None
                                           else route_mask),
                          deterministic=deterministic)
    return x, y, aux


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
    num_heads: H; must divide D unless `head_dim` is set; heads even (RoPE).
    d_ff: F, each expert's width (and the dense FFN width unless
      `dense_d_ff` is set).
    vocab_size: V (256: bytes; any size).
    activation: 'relu' | 'gelu' | 'swiglu' | 'geglu'.
    moe: keyword args for MoeLayer (all but d_ff, activation, dtype,
      param_dtype, causal and the lora_* options); None or num_experts == 0
      means all dense.
      Stored as a FrozenDict so the module stays hashable.
    moe_every: one MoE block in every `moe_every` (see moe_layer_indices).
    first_dense_layers: leading blocks that are always dense.
    dense_layers: further always-dense blocks (Qwen-MoE mlp_only_layers).
    dense_d_ff: width of the dense FFN blocks (None = d_ff); DeepSeek and
      Qwen-MoE give dense blocks a wider FFN than an expert.
    tie_embeddings: output logits through the input embedding (scaled by
      1/sqrt(D)); False: a separate `head/kernel` [D, V], unscaled.
    rope_base: RoPE frequency base (rope_theta).
    rope_interleave: RoPE pairs features (2j, 2j+1) (DeepSeek checkpoints).
    norm_eps: epsilon of every RMSNorm (HF rms_norm_eps).
    num_kv_heads: grouped-query attention's KV heads (None = num_heads).
    head_dim: Dh (None = d_model / num_heads).
    qk_norm: 'none' | 'head' (Qwen3) | 'full' (OLMoE).
    attn_bias: q, k, v projection biases (Qwen2).
    attention: 'mha' | 'mla' (DeepSeek multi-head latent attention).
    mla: with attention='mla', {'q_lora_rank': int or None, 'kv_lora_rank',
      'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim'}.
    sliding_window: None, or a window >= every sequence length used
      (Mixtral's configs); longer sequences are refused.
    dtype: compute dtype (logits are always float32).
    param_dtype: parameter dtype (the routers are always float32).
    lora_rank: r of the LoRA adapters (moejax.lora) on the FFNs in
      `lora_targets`; 0 = none (params and logits exactly as without).
    lora_alpha: the adapters' scale is lora_alpha / r (LoRA paper).
    lora_targets: 'experts' (routed expert banks), 'shared' (shared
      experts), 'dense' (the dense FFN blocks).
    mod: Mixture-of-Depths blocks (moejax.models.mod.ModOptions or a
      mapping of its fields: every, capacity, predictor, predictor_hidden,
      aux_weight, decisions); None = none (params and logits exactly as
      without). An MoD block keeps its dense or MoE FFN (MoDE).
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
  dense_layers: Sequence[int] = ()
  dense_d_ff: Optional[int] = None
  tie_embeddings: bool = True
  rope_base: float = 10000.0
  rope_interleave: bool = False
  norm_eps: float = 1e-6
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  qk_norm: str = 'none'
  attn_bias: bool = False
  attention: str = 'mha'
  mla: Optional[Mapping] = None
  sliding_window: Optional[int] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple = ('experts',)
  mod: Optional[Any] = None
  # Read by the train step (moejax.train.step): next-token cross-entropy.
  task = 'lm'

  def __post_init__(self):
    for name, minimum in (('vocab_size', 1), ('num_layers', 0),
                          ('d_model', 1), ('num_heads', 1), ('d_ff', 1)):
      _check_int(name, getattr(self, name), minimum)
    if self.dense_d_ff is not None:
      _check_int('dense_d_ff', self.dense_d_ff, 1)
    if self.attention == 'mha' and self.head_dim is None:
      if self.d_model % self.num_heads:
        raise ValueError(f'num_heads={self.num_heads} must divide '
                         f'd_model={self.d_model}.')
      if (self.d_model // self.num_heads) % 2:
        raise ValueError(f'd_model / num_heads = {self.d_model} / '
                         f'{self.num_heads} must be even for RoPE.')
    object.__setattr__(self, 'dense_layers', tuple(self.dense_layers))
    lora_lib.check_lora_options(self.lora_rank, self.lora_alpha,
                                self.lora_targets, lora_lib.MODEL_TARGETS)
    object.__setattr__(self, 'lora_targets', tuple(self.lora_targets))
    moe_layer_indices(self.num_layers, self.moe_every,
                      self.first_dense_layers, self.dense_layers)
    self.attention_options.validate(self.d_model, self.num_heads)
    object.__setattr__(self, 'moe', freeze_moe(self.moe, self.d_ff))
    if self.mla is not None:
      object.__setattr__(self, 'mla', FrozenDict(self.mla))
    if self.mod is not None:
      object.__setattr__(self, 'mod', _mod_lib().freeze_mod(self.mod))
    super().__post_init__()

  @property
  def attention_options(self) -> AttentionOptions:
    """The blocks' AttentionOptions, from the attention attributes."""
    mla = dict(self.mla or {})
    unknown = sorted(set(mla) - set(MLA_KEYS))
    if unknown:
      raise ValueError(f'mla holds unknown keys {unknown}; allowed keys: '
                       f'{", ".join(MLA_KEYS)}.')
    if self.attention != 'mla' and mla:
      raise ValueError("mla is set but attention='mha'; allowed: "
                       "attention='mla' with mla, or mla=None.")
    if self.attention == 'mla':
      missing = sorted(set(MLA_KEYS) - set(mla))
      if missing:
        raise ValueError(f"attention='mla' needs mla[{missing[0]!r}] "
                         f'(keys: {", ".join(MLA_KEYS)}).')
    return AttentionOptions(
        kind=self.attention, num_kv_heads=self.num_kv_heads,
        head_dim=self.head_dim, qk_norm=self.qk_norm, bias=self.attn_bias,
        norm_eps=self.norm_eps, rope_base=self.rope_base,
        rope_interleave=self.rope_interleave,
        sliding_window=self.sliding_window, **mla)

  @property
  def moe_layers(self) -> tuple[int, ...]:
    """Indices of the MoE blocks; () when MoE is off."""
    if self.moe is None:
      return ()
    return moe_layer_indices(self.num_layers, self.moe_every,
                             self.first_dense_layers, self.dense_layers)

  def _logits(self, embed: nn.Embed, x: jax.Array) -> jax.Array:
    """Final-normed x [B, L, D] -> float32 logits [B, L, V]."""
    if self.tie_embeddings:
      logits = embed.attend(x) / jnp.sqrt(jnp.float32(self.d_model))
    else:
      logits = nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name='head')(x)
    return logits.astype(jnp.float32)

  def _block(self, i: int, moe_layers) -> Block:
    moe = self.moe if i in moe_layers else None
    d_ff = self.d_ff if moe is not None else (self.dense_d_ff or self.d_ff)
    kind, extra = Block, {}
    if self.mod is not None and i in self.mod.layers(self.num_layers):
      kind, extra = _mod_lib().ModBlock, {'mod': self.mod}
    return kind(self.num_heads, d_ff, self.activation, moe, self.rope_base,
                self.dtype, self.param_dtype,
                attention=self.attention_options, norm_eps=self.norm_eps,
                lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
                lora_targets=self.lora_targets, name=f'block_{i}', **extra)

  @nn.compact
  def __call__(self, tokens: jax.Array,
               padding_mask: Optional[jax.Array] = None,
               deterministic: bool = True, decode: bool = False):
    """Runs the model.

    Args:
      tokens: [B, L] int32 token ids in [0, V).
      padding_mask: optional [B, L] bool, True = padding: never an attention
        key and never routed (no expert capacity, not in any MoE metric).
      deterministic: eval mode for the MoE layers (eval capacity factor, no
        router jitter).
      decode: attend through the KV cache (collection 'cache', mutable):
        tokens are the next L positions after the cached ones. The cache is
        created by `model.init(..., decode=True)` with tokens [B, M] of the
        cache length M (see `moejax.generate`).

    Returns:
      logits [B, L, V] float32, and aux: {'layers': {'block_i': MoeLayer
      aux dict} for the MoE blocks, plus 'aux_loss', 'z_loss',
      'drop_fraction', 'max_violation', float32 scalars averaged over the MoE
      blocks (0.0 if there are none)}; with MoD blocks also 'mod_layers',
      'mod_bce', 'mod_accuracy', 'mod_fraction' and 'mod_loss' (see
      `moejax.models.mod.summarize_mod_aux`).
    """
    embed = nn.Embed(self.vocab_size, self.d_model,
                     embedding_init=nn.initializers.normal(stddev=1.0),
                     dtype=self.dtype, param_dtype=self.param_dtype,
                     name='embed')
    x = embed(tokens.astype(jnp.int32))  # [B, L, D]
    moe_layers = set(self.moe_layers)
    layer_aux, mod_aux = {}, {}
    for i in range(self.num_layers):
      x, aux, *mod = self._block(i, moe_layers)(x, padding_mask,
                                                deterministic, decode)
      if aux is not None:
        layer_aux[f'block_{i}'] = aux
      if mod:  # an MoD block's (moejax.models.mod) metrics
        mod_aux[f'block_{i}'] = mod[0]
    x = nn.RMSNorm(epsilon=self.norm_eps, dtype=self.dtype,
                   param_dtype=self.param_dtype, name='final_norm')(x)
    out = summarize_aux(layer_aux)
    if mod_aux:
      out.update(_mod_lib().summarize_mod_aux(mod_aux, self.mod.aux_weight))
    return self._logits(embed, x), out


def summarize_aux(layer_aux: Mapping[str, Mapping[str, jax.Array]]) -> dict:
  """Averages the per-layer MoE aux entries into the model's aux dict.

  Args:
    layer_aux: {block_name: MoeLayer aux dict}, possibly empty.

  Returns:
    {'layers': dict(layer_aux), and for each of aux_loss, z_loss,
    drop_fraction, max_violation the float32 scalar mean over layers
    (0.0 with no layers); each `OPTIONAL_MEAN_AUX_KEYS` entry some layer
    reports: its mean over those layers}.
  """
  out = {'layers': dict(layer_aux)}
  for key in MEAN_AUX_KEYS:
    values = [jnp.asarray(a[key], jnp.float32) for a in layer_aux.values()]
    out[key] = (jnp.mean(jnp.stack(values)) if values
                else jnp.zeros((), jnp.float32))
  for key in OPTIONAL_MEAN_AUX_KEYS:
    values = [jnp.asarray(a[key], jnp.float32) for a in layer_aux.values()
              if key in a]
    if values:
      out[key] = jnp.mean(jnp.stack(values))
  return out
