"""Dense baseline with the active FLOPs per token of configs/switch.py.

Every FFN has width d_ff, the width of ONE Switch expert, so a dense token
costs what a top-1 Switch token costs (up to the tiny router matmul), while
Switch holds E times the FFN parameters.

Run (from the repository root):

    python -m experiments.train --config configs/dense.py:tiny \
        --workdir runs/dense_tiny

Variants `tiny` (default) and `small`. Measured on 2 CPU cores shared with
other jobs (re-runs with the same JAX version reproduce the losses exactly):
  tiny   300 steps, ~25 s wall on 2 CPU cores; final eval loss 4.19
         nats/token, excess over the Bayes floor (~1.52) 2.67.
  small  1000 steps, ~4-5 min; eval loss 2.46, excess 0.97 (switch
         2.27 / 0.78, gshard 2.15 / 0.65; with one routing group per
         sequence 2.33 / 0.84 and 2.21 / 0.72).
"""

from configs import base


def get_config(arg=None):
  """Dense config: model.moe.num_experts = 0, everything else as switch.

  Args:
    arg: size variant 'tiny' | 'small' (None -> 'tiny').

  Returns:
    ml_collections.ConfigDict.
  """
  return base.sized_config(arg, dict(num_experts=0))


def get_sweeps(arg=None):
  """Named sweeps of this config for `python -m experiments.sweep`.

      python -m experiments.sweep --config configs/dense.py:small \
          --sweep seeds --workdir runs/sweeps/dense_small_seeds

  Sweeps:
    seeds   the config unchanged at seeds 0, 1, 2 (no dense baseline is
            added: this is it).
    width   d_ff x {1, 2, 4, 8}: dense models with the FFN parameters of
            1, 2, 4, 8 Switch experts (and as many times the FLOPs).

  Args:
    arg: the size variant ('tiny' | 'small').

  Returns:
    {sweep name: [{dotted key: value}, ...]}.
  """
  d_ff = get_config(arg).model.d_ff
  return {
      'seeds': [{'seed': s} for s in (0, 1, 2)],
      'width': [{'model.d_ff': d_ff * m} for m in (1, 2, 4, 8)],
  }
