"""Mixture-of-Depths (Raposo et al. 2024): every other block processes only
the top 12.5% of each sequence's tokens (moejax.models.mod).

Block i is an MoD block iff (i + 1) % model.mod.every == 0 (every=2: blocks
1, 3, ...; the paper's alternation with full blocks). Its router picks the
ceil(0.125 * L) highest-scoring tokens of each sequence; they go through
attention (among themselves, causal) and the FFN, their update multiplied
by the router score; the others skip the block. An auxiliary MLP predictor
(stop-gradient input, BCE against the top-k choice, weight 0.01) learns the
causal decision generation uses; the train and eval logs report its
accuracy ('mod_accuracy') and BCE ('mod_bce'), and 'mod_fraction', the
fraction of tokens the MoD blocks processed.

Run (from the repository root):

    python -m experiments.train --config configs/mod.py:tiny \
        --workdir runs/mod_tiny

Variants: `tiny` (default) and `small` (dense FFNs, the dense baseline's
sizes: configs/dense.py), `tiny_mode` and `small_mode` (MoDE: the FFNs are
configs/switch.py's top-1 MoE layers). Measured on 2 CPU cores shared with
other jobs (eval loss in nats/token; predictor accuracy: the MLP's
decision vs the top-k choice, always-skip scores 0.875):
  tiny       300 steps, ~35 s wall; eval loss 4.314, excess 2.794,
             mod_accuracy 0.969 (dense tiny 4.194 / 2.675); training
             tokens/s 1.73 x dense tiny's.
  small      1000 steps, ~3 min; eval loss 2.663, excess 1.168,
             mod_accuracy 0.977 (dense small 2.46 / 0.97); 1.85 x dense
             small's tokens/s.
  tiny_mode  300 steps; eval loss 4.518 (switch tiny per sequence 4.20); 1.51 x dense.
The last eval line of `tiny`:
  step 300/300 eval loss 4.3136 ... mod_loss 0.0008 mod_bce 0.0801
  mod_accuracy 0.9692 mod_fraction 0.1250 excess_loss 2.7942
At equal steps MoD is behind dense (it spends about half the block
compute). Generation (`python -m experiments.generate --workdir
runs/mod_tiny --prompt_ids 1,2,3 --max_new_tokens 32`) uses the
predictor's causal decisions; `--config.model.mod.decisions=predictor`
trains / evaluates on the same decisions (tiny's checkpoint evaluated so:
eval loss 4.313, 11.5% of tokens processed).
"""

from configs import base

VARIANTS = ('tiny', 'small', 'tiny_mode', 'small_mode')


def get_config(arg=None):
  """MoD config: model.mod.every=2, capacity 0.125, MLP predictor.

  Args:
    arg: variant 'tiny' | 'small' | 'tiny_mode' | 'small_mode' (None ->
      'tiny').

  Returns:
    ml_collections.ConfigDict.
  """
  arg = arg or 'tiny'
  if arg not in VARIANTS:
    raise ValueError(f'config variant {arg!r} is not supported; allowed '
                     f'values: {", ".join(map(repr, VARIANTS))}.')
  size, _, ffn = arg.partition('_')
  if ffn == 'mode':  # configs/switch.py's MoE layers
    moe = dict(top_k=1, capacity_factor=1.25, eval_capacity_factor=2.0,
               second_expert_policy='all', aux_loss_weight=0.01)
  else:
    moe = dict(num_experts=0)
  c = base.sized_config(size, moe)
  c.model.mod.update(dict(
      every=2,  # every other block, as in the paper
      capacity=0.125,  # 12.5%: the paper's best compute/loss trade-off
      predictor='mlp', predictor_hidden=64, aux_weight=0.01,
      decisions='topk'))
  return c
