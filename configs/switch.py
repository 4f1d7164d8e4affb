"""Switch Transformer (top-1 routing, Fedus et al. 2021), synthetic mixture.

Run (from the repository root):

    python -m experiments.train --config configs/switch.py:tiny \
        --workdir runs/switch_tiny

Variants `tiny` (default) and `small`; any key can be overridden, e.g.
`--config.train.steps=50`. Measured on 2 CPU cores shared with other jobs
(sizes in configs/base.py; re-runs with the same JAX version reproduce the
losses exactly):
  tiny   300 steps, ~30 s wall on 2 CPU cores (first run also builds
         the dataset, ~5 s); final eval loss 4.16 nats/token, excess
         over the Bayes floor (~1.52) 2.64 (one group per sequence: 4.20
         / 2.68).
  small  1000 steps, ~4-6 min; eval loss 2.27, excess 0.78 (one group
         per sequence: 2.33 / 0.84; dense: 2.46 / 0.97).
"""

from configs import base

# Switch / GShard's routing groups of many documents: one group holds every
# sequence of the batch (group_sequences=-1, k = train.batch_size), in
# position-major order (causal-safe; moejax/grouping.py). A grad-accumulated
# or data-parallel run needs a k that fits a micro-batch / a batch shard
# (the config check names it), or None: one group per sequence.
SWITCH_GROUPS = dict(group_sequences=-1, group_order='position')


def get_config(arg=None):
  """Switch config: top-1, capacity factor 1.25 train / 2.0 eval, aux 0.01,
  one routing group of the whole batch (SWITCH_GROUPS).

  Args:
    arg: size variant 'tiny' | 'small' (None -> 'tiny').

  Returns:
    ml_collections.ConfigDict.
  """
  return base.sized_config(arg, dict(
      top_k=1, capacity_factor=1.25, eval_capacity_factor=2.0,
      second_expert_policy='all', aux_loss_weight=0.01, **SWITCH_GROUPS))


def get_sweeps(arg=None):
  """Named sweeps of this config for `python -m experiments.sweep`.

  Each sweep is a list of points; a point maps dotted config keys to values
  (applied on top of `get_config(arg)` and any --config overrides). Run one
  with, e.g.,

      python -m experiments.sweep --config configs/switch.py:small \
          --sweep experts --seeds 2 --workdir runs/sweeps/switch_small_experts

  Sweeps:
    experts     num_experts in {1, 2, 4, 8, 16, 32}; top-1 with expert width
                d_ff, so active FLOPs per token stay those of the dense
                baseline (up to the D x E router) while params grow with E.
    topk        top_k in {1, 2, 4} (E = 8): active expert FLOPs grow with K.
    topk_flops  top_k = K with d_ff = F / K, K in {1, 2, 4}: the same active
                FFN FLOPs per token at every K.
    priority    top-2 with GShard's choice-major slot order (every 1st
                choice before any 2nd; a 2nd choice's slot depends on later
                tokens' 1st choices, accepted with allow_noncausal_routing)
                against priority='token' (a token's 2 choices together, in
                position order: causal): what the leak is worth.
    capacity    capacity factor in {0.5, 1.0, 1.25, 2.0, None (dropless)},
                the same for training and eval, so the eval drop fraction
                and loss reflect it, with the config's routing groups (the
                README's per-sequence table adds
                --config.model.moe.group_sequences=None
                --config.model.moe.group_order=sequence).
    capacity_groups  the same capacity factors with Switch / GShard's
                groups of many documents named in every point, whatever
                the config's default: one group holds the whole batch
                (group_sequences=-1), ordered position-major
                (group_order='position', causal-safe; moejax/grouping.py).
                No dropless point: without drops the grouping changes only
                the per-group balance loss.
    balance     aux_loss_weight in {0, 1e-4, 1e-3, 1e-2, 1e-1, 1}: 1 is
                past the published range, to show what too much costs.
    seeds       the config unchanged at seeds 0, 1, 2.
    conditional conditional computation beyond top-1 at the buffers and
                active expert FLOPs of Switch top-1 (each point labelled):
                top-1; top-2 with experts of width d_ff/2; ReMoE (ReLU
                gates, adaptive L1 towards 1 active expert, load-balancing
                L1, no Switch loss); top-2 of 8 real + 8 null experts
                (balanced: 1 real expert per token; cf halved for K = 2);
                MoDE (top-1 MoE + Mixture-of-Depths every other block at
                12.5% of tokens: fewer FLOPs, not matched).
    router      the causal LM's token-choice routers at top-2 and equal
                active FLOPs: softmax (GShard-like, aux 0.01), sigmoid +
                loss-free balancing bias (DeepSeek-V3, aux 0), and the same
                with group-limited selection and fine-grained + shared
                experts (2 routed of width F/2 plus a shared 2 x F/2).
                Expert choice and Soft MoE are non-causal: see
                configs/expert_choice.py and configs/soft_moe.py (encoder
                classifiers).

  Args:
    arg: the size variant, as for get_config ('tiny' | 'small').

  Returns:
    {sweep name: [{dotted key: value}, ...]}.
  """
  config = get_config(arg)
  d_ff = config.model.d_ff
  moe = 'model.moe.'
  cfs = (0.5, 1.0, 1.25, 2.0, None)
  return {
      'experts': [{moe + 'num_experts': e} for e in (1, 2, 4, 8, 16, 32)],
      'topk': [{moe + 'top_k': k, **_choice_order(k)} for k in (1, 2, 4)],
      'topk_flops': [{moe + 'top_k': k, 'model.d_ff': d_ff // k,
                      **_choice_order(k)} for k in (1, 2, 4)],
      'priority': [{moe + 'top_k': 2, moe + 'priority': 'choice',
                    **_choice_order(2)},
                   {moe + 'top_k': 2, moe + 'priority': 'token'}],
      'capacity': [{moe + 'capacity_factor': cf,
                    moe + 'eval_capacity_factor': cf} for cf in cfs],
      'capacity_groups': [{moe + 'capacity_factor': cf,
                           moe + 'eval_capacity_factor': cf,
                           moe + 'group_sequences': -1,
                           moe + 'group_order': 'position'}
                          for cf in cfs[:-1]],
      'balance': [{moe + 'aux_loss_weight': w}
                  for w in (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)],
      'seeds': [{'seed': s} for s in (0, 1, 2)],
      'conditional': _conditional(config),
      'router': [
          {moe + 'top_k': 2, **_choice_order(2)},
          {moe + 'top_k': 2, **_choice_order(2), moe + 'score_fn': 'sigmoid',
           moe + 'renormalize': True, moe + 'bias_update_rate': 0.01,
           moe + 'aux_loss_weight': 0.0},
          {moe + 'top_k': 1, moe + 'granularity': 2, **_choice_order(2),
           moe + 'score_fn': 'sigmoid', moe + 'renormalize': True,
           moe + 'bias_update_rate': 0.01, moe + 'num_groups': 2,
           moe + 'topk_groups': 1,
           # 2 routed experts of F/2 + a shared FFN of 2 * F/2: 2F, as top-2
           moe + 'num_shared_experts': 2, moe + 'aux_loss_weight': 0.0},
      ],
  }


def _choice_order(choices):
  """{allow_noncausal_routing: True} for a point with >= 2 choices per token
  and a capacity: it keeps Switch/GShard's choice-major slot order (every
  1st choice before any 2nd), where a 2nd choice's slot depends on later
  tokens' 1st choices (priority='token' is the causal order)."""
  return {'model.moe.allow_noncausal_routing': True} if choices > 1 else {}


def _conditional(config):
  """The `conditional` sweep's points (see get_sweeps)."""
  moe, label = 'model.moe.', '_label'
  experts = config.model.moe.num_experts
  return [
      {label: 'top-1'},
      {label: 'top-2-half-width', moe + 'top_k': 2, **_choice_order(2),
       'model.d_ff': config.model.d_ff // 2},
      {label: 'ReMoE', moe + 'router': 'relu',
       moe + 'relu_l1_balance': True, moe + 'aux_loss_weight': 0.0},
      {label: 'null-experts', moe + 'top_k': 2, **_choice_order(2),
       moe + 'num_null_experts': experts,
       moe + 'capacity_factor': config.model.moe.capacity_factor / 2,
       moe + 'eval_capacity_factor': (
           config.model.moe.eval_capacity_factor / 2)},
      {label: 'MoDE', 'model.mod.every': 2},
  ]
