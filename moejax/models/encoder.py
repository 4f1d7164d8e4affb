"""A bidirectional Transformer encoder that classifies whole sequences.

Axis letters: B batch, L sequence length, D model width, F FFN width,
E experts, N classes.

It exists to run the non-causal routers (expert choice, Soft MoE, 'score'
priority) end to end: the decoder LM refuses them, because they let a
token's routing depend on later tokens. Task: predict each synthetic
mixture example's domain id from its tokens.

    x = embed(tokens)                                  [B, L, D]
    x = Block(causal=False)(x)  for each block          [B, L, D]
    pooled = mean over real tokens of final_norm(x)    [B, D]
    logits = pooled @ head                             [B, N] float32

Param tree: embed/embedding [V, D], block_{i}/... exactly as in
`TransformerLM` (MoE blocks: block_{i}/ffn/router, .../experts), final_norm,
head/kernel [D, N], head/bias [N]. aux: as `TransformerLM` (`summarize_aux`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.models import transformer


class EncoderClassifier(nn.Module):
  """Bidirectional encoder + mean pooling + linear head.

  Attributes:
    num_layers, d_model, num_heads, d_ff, vocab_size, activation, moe,
      moe_every, first_dense_layers, rope_base, dtype, param_dtype: as in
      `TransformerLM` (but every router is allowed: the model is not causal).
    num_classes: N.
  """
  num_layers: int
  d_model: int
  num_heads: int
  d_ff: int
  num_classes: int = 8
  vocab_size: int = 256
  activation: str = 'gelu'
  moe: Optional[Mapping] = None
  moe_every: int = 1
  first_dense_layers: int = 0
  rope_base: float = 10000.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # Read by the parameter / FLOP accounting: no tied output projection.
  tie_embeddings: bool = False
  # Read by the train step (moejax.train.step): cross-entropy on labels [B].
  task = 'classify'

  def __post_init__(self):
    for name, minimum in (('vocab_size', 1), ('num_layers', 0),
                          ('d_model', 1), ('num_heads', 1), ('d_ff', 1),
                          ('num_classes', 2)):
      # pylint: disable-next=protected-access
      transformer._check_int(name, getattr(self, name), minimum)
    if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
      raise ValueError(f'num_heads={self.num_heads} must divide '
                       f'd_model={self.d_model} into even head widths.')
    transformer.moe_layer_indices(self.num_layers, self.moe_every,
                                  self.first_dense_layers)
    object.__setattr__(self, 'moe', transformer.freeze_moe(
        self.moe, self.d_ff, causal=False))
    super().__post_init__()

  @property
  def moe_layers(self) -> tuple[int, ...]:
    """Indices of the MoE blocks; () when MoE is off."""
    if self.moe is None:
      return ()
    return transformer.moe_layer_indices(self.num_layers, self.moe_every,
                                         self.first_dense_layers)

  @nn.compact
  def __call__(self, tokens: jax.Array,
               padding_mask: Optional[jax.Array] = None,
               deterministic: bool = True):
    """Classifies sequences.

    Args:
      tokens: [B, L] int32 ids in [0, V).
      padding_mask: optional [B, L] bool, True = padding (not attended,
        not routed, not pooled).
      deterministic: eval mode for the MoE layers.

    Returns:
      logits [B, N] float32 and the aux dict of `summarize_aux`.
    """
    x = nn.Embed(self.vocab_size, self.d_model,
                 embedding_init=nn.initializers.normal(stddev=1.0),
                 dtype=self.dtype, param_dtype=self.param_dtype,
                 name='embed')(tokens.astype(jnp.int32))  # [B, L, D]
    moe_layers = set(self.moe_layers)
    layer_aux = {}
    for i in range(self.num_layers):
      x, aux = transformer.Block(
          self.num_heads, self.d_ff, self.activation,
          self.moe if i in moe_layers else None, self.rope_base, self.dtype,
          self.param_dtype, causal=False, name=f'block_{i}')(
              x, padding_mask, deterministic)
      if aux is not None:
        layer_aux[f'block_{i}'] = aux
    x = nn.RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                   name='final_norm')(x).astype(jnp.float32)
    real = jnp.ones(x.shape[:2], jnp.float32)
    if padding_mask is not None:
      real = 1.0 - padding_mask.astype(jnp.float32)
    pooled = jnp.einsum('BLD,BL->BD', x, real) / jnp.maximum(
        real.sum(-1, keepdims=True), 1.0)  # [B, D]
    logits = nn.Dense(self.num_classes, use_bias=True, dtype=jnp.float32,
                      param_dtype=self.param_dtype, name='head')(pooled)
    return logits.astype(jnp.float32), transformer.summarize_aux(layer_aux)
