"""Soft MoE (Puigcerver et al. 2023) in an encoder that classifies each
synthetic-mixture example's domain.

Every slot is a softmax-weighted mix of the sequence's tokens, so the
causal LM refuses Soft MoE; this config trains the bidirectional
`EncoderClassifier` (`model.task='classify'`). Slots per expert are set so
that E * slots = L tokens per sequence: one expert application per token on
average, the compute of top-1.

Run (from the repository root):

    python -m experiments.train --config configs/soft_moe.py:tiny \
        --workdir runs/soft_moe_tiny

Variants `tiny` (default) and `small` (sizes in configs/base.py). Eval
reports the classification loss and `eval/accuracy` (chance: 1 / 8).
"""

from configs import base


def get_config(arg=None):
  """Soft MoE encoder classifier config.

  Args:
    arg: size variant 'tiny' | 'small' (None -> 'tiny').

  Returns:
    ml_collections.ConfigDict.
  """
  c = base.sized_config(arg, dict(router='soft_moe', aux_loss_weight=0.0))
  c.model.moe.slots_per_expert = c.data.seq_len // c.model.moe.num_experts
  c.model.task = 'classify'
  return c
