"""GShard (top-2 routing, Lepikhin et al. 2020) on the synthetic mixture.

Run (from the repository root):

    python -m experiments.train --config configs/gshard.py:tiny \
        --workdir runs/gshard_tiny

Variants `tiny` (default) and `small`; any key can be overridden, e.g.
`--config.train.steps=50`. Measured on 2 CPU cores shared with other jobs
(sizes in configs/base.py; re-runs with the same JAX version reproduce the
losses exactly):
  tiny   300 steps, ~30-40 s wall on 2 CPU cores; final eval loss 4.11
         nats/token, excess over the Bayes floor (~1.52) 2.59 (one group
         per sequence: the same to 2 digits).
  small  1000 steps, ~4-7 min; eval loss 2.15, excess 0.65 (one group
         per sequence: 2.21 / 0.72; dense: 2.46 / 0.97).
"""

from configs import base


def get_config(arg=None):
  """GShard config: top-2, random second-expert policy, cf 1.25 / 2.0.

  The second expert is kept with probability min(1, gate_2 / 0.2) during
  training (GShard's 'random' policy); at eval both experts are used.

  Args:
    arg: size variant 'tiny' | 'small' (None -> 'tiny').

  Returns:
    ml_collections.ConfigDict.
  """
  return base.sized_config(arg, dict(
      top_k=2, capacity_factor=1.25, eval_capacity_factor=2.0,
      second_expert_policy='random', aux_loss_weight=0.01,
      # GShard's choice-major slot order (all 1st choices before any 2nd)
      # with a capacity lets a 2nd choice's slot depend on later tokens'
      # 1st choices; kept, so accepted explicitly (priority='token' is
      # the causal order).
      allow_noncausal_routing=True,
      # One routing group of the whole batch, position-major (Switch's
      # many-document groups, configs/switch.py SWITCH_GROUPS).
      group_sequences=-1, group_order='position'))


def get_sweeps(arg=None):
  """Named sweeps of this config for `python -m experiments.sweep`.

  Points map dotted config keys to values (see configs/switch.py). E.g.

      python -m experiments.sweep --config configs/gshard.py:small \
          --sweep experts --seeds 2 --workdir runs/sweeps/gshard_small_experts

  Sweeps:
    experts   num_experts in {2, 4, 8, 16, 32} (top-2 needs E >= 2); active
              FLOPs stay those of two experts.
    capacity  capacity factor in {0.5, 1.0, 1.25, 2.0, None (dropless)},
              training and eval alike.
    balance   aux_loss_weight in {0, 1e-4, 1e-3, 1e-2, 1e-1, 1}.
    seeds     the config unchanged at seeds 0, 1, 2.

  Args:
    arg: the size variant ('tiny' | 'small').

  Returns:
    {sweep name: [{dotted key: value}, ...]}.
  """
  del arg  # the points do not depend on the size
  moe = 'model.moe.'
  return {
      'experts': [{moe + 'num_experts': e} for e in (2, 4, 8, 16, 32)],
      'capacity': [{moe + 'capacity_factor': cf,
                    moe + 'eval_capacity_factor': cf}
                   for cf in (0.5, 1.0, 1.25, 2.0, None)],
      'balance': [{moe + 'aux_loss_weight': w}
                  for w in (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)],
      'seeds': [{'seed': s} for s in (0, 1, 2)],
  }
