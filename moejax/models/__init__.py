"""moejax models: a decoder-only Transformer LM, a bidirectional encoder
classifier, and their cost accounting.

Public API:
  EncoderClassifier                                (moejax.models.encoder)
  TransformerLM, Block, CausalSelfAttention,
  moe_layer_indices, apply_rope, attention_mask   (moejax.models.transformer)
  count_params, param_breakdown, param_shapes,
  flops_per_token, summary                         (moejax.models.flops)
  ModBlock, ModOptions                             (moejax.models.mod)
"""

from moejax.models.encoder import EncoderClassifier
from moejax.models.flops import count_params
from moejax.models.flops import flops_per_token
from moejax.models.flops import param_breakdown
from moejax.models.flops import param_shapes
from moejax.models.flops import summary
from moejax.models.mod import ModBlock
from moejax.models.mod import ModOptions
from moejax.models.transformer import Block
from moejax.models.transformer import CausalSelfAttention
from moejax.models.transformer import TransformerLM
from moejax.models.transformer import apply_rope
from moejax.models.transformer import attention_mask
from moejax.models.transformer import moe_layer_indices

__all__ = [
    'Block', 'CausalSelfAttention', 'EncoderClassifier', 'TransformerLM', 'apply_rope',
    'ModBlock', 'ModOptions', 'attention_mask', 'count_params',
    'flops_per_token', 'moe_layer_indices',
    'param_breakdown', 'param_shapes', 'summary',
]
