"""Expert-choice routing (Zhou et al. 2022) in an encoder that classifies
each synthetic-mixture example's domain.

Expert choice lets a token's routing depend on later tokens, so the causal
LM refuses it; this config trains the bidirectional `EncoderClassifier`
(`model.task='classify'`) instead. Each expert takes its top C = cf * S / E
tokens per sequence; cf = 2 is Zhou et al.'s EC-CF2 (on average two experts
per token). No balance loss (expert choice is balanced by construction).

Run (from the repository root):

    python -m experiments.train --config configs/expert_choice.py:tiny \
        --workdir runs/expert_choice_tiny

Variants `tiny` (default) and `small` (sizes in configs/base.py). Eval
reports the classification loss and `eval/accuracy` (chance: 1 / 8).
"""

from configs import base


def get_config(arg=None):
  """Expert-choice encoder classifier config (cf 2 train and eval).

  Args:
    arg: size variant 'tiny' | 'small' (None -> 'tiny').

  Returns:
    ml_collections.ConfigDict.
  """
  c = base.sized_config(arg, dict(
      router='expert_choice', capacity_factor=2.0, eval_capacity_factor=2.0,
      aux_loss_weight=0.0))
  c.model.task = 'classify'
  return c
