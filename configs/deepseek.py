"""DeepSeek-V3-style MoE decoder LM on the synthetic mixture.

Sigmoid router scores; top-K over scores + a loss-free balancing bias
(updated after every step, no balance loss: aux weight 0); combine weights
are the unbiased scores renormalised over the K chosen; group-limited
selection; fine-grained experts (granularity 2: 2E experts of width F/2,
2K chosen) plus one always-on shared expert of width F/2.

Run (from the repository root):

    python -m experiments.train --config configs/deepseek.py:tiny \
        --workdir runs/deepseek_tiny

Variants `tiny` (default) and `small` (sizes in configs/base.py). The
capacity factor stays 1.25 / 2.0 so the CPU runs stay fast; DeepSeek-V3
itself is dropless: add `--config.model.moe.capacity_factor=None
--config.model.moe.eval_capacity_factor=None` (or dispatcher='ragged' on
GPU/TPU). The bias speed gamma is 0.01 (DeepSeek-V3: 0.001 over 14.8T
tokens), so that a run of a few hundred steps can balance.
"""

from configs import base


def get_config(arg=None):
  """DeepSeek-style config: sigmoid + bias + groups + fine-grained + shared.

  Args:
    arg: size variant 'tiny' | 'small' (None -> 'tiny').

  Returns:
    ml_collections.ConfigDict.
  """
  return base.sized_config(arg, dict(
      top_k=1, granularity=2,  # 2E experts of width F/2, 2 chosen
      score_fn='sigmoid', renormalize=True, routed_scaling=1.0,
      bias_update_rate=0.01,
      num_groups=2, topk_groups=1,  # the 2 chosen come from 1 of 2 groups
      num_shared_experts=1,  # width F/2, on every token
      capacity_factor=1.25, eval_capacity_factor=2.0, aux_loss_weight=0.0,
      # GShard's choice-major slot order (all 1st choices before any 2nd)
      # with a capacity lets a 2nd choice's slot depend on later tokens'
      # 1st choices; kept, so accepted explicitly (priority='token' is
      # the causal order).
      allow_noncausal_routing=True))
