"""Sparse upcycling: the dense baseline's run, turned into an MoE.

Every expert of each MoE block starts as a copy of the trained dense
model's FFN of that block (Komatsuzaki et al. 2022); attention, norms and
embeddings are copied, the router starts fresh. Top-2 with renormalised
gates (sum 1) and a dropless eval, so the step-0 MoE computes exactly the
dense model's function (the run prints the check); the Switch model's
top-1 gate p < 1 would scale every FFN output down instead, and a top-1
renormalised gate is always 1 (no router gradient from the loss). Training
uses capacity factor 1.25 as Switch does.

Run (from the repository root), after the dense run it starts from:

    python -m experiments.train --config configs/dense.py:tiny \
        --workdir runs/dense_tiny
    python -m experiments.train --config configs/upcycle.py:tiny \
        --workdir runs/upcycled_tiny --init_from runs/dense_tiny

Variants `tiny` (default) and `small` (the sizes of configs/base.py; use
the dense run of the same size). Options: `init.upcycle_router='zero'`
(uniform routing at step 0), `init.upcycle_noise`, and
`init.drop_upcycle_ratio` (Drop-Upcycling, e.g. 0.5). The baseline
(upcycled vs MoE from scratch vs dense continued at equal extra steps):
`python -m experiments.finetune_baselines --part upcycle`.
"""

from configs import base


def get_config(arg=None):
  """Switch sizes, top-2 renormalised, init.upcycle=True.

  Args:
    arg: size variant 'tiny' | 'small' (None -> 'tiny').

  Returns:
    ml_collections.ConfigDict (init.from_workdir: set with --init_from).
  """
  c = base.sized_config(arg, dict(
      top_k=2, renormalize=True, capacity_factor=1.25,
      eval_capacity_factor=None, aux_loss_weight=0.01,
      # GShard's choice-major slot order (all 1st choices before any 2nd)
      # with a capacity lets a 2nd choice's slot depend on later tokens'
      # 1st choices; kept, so accepted explicitly (priority='token' is
      # the causal order).
      allow_noncausal_routing=True))
  c.init.upcycle = True
  return c
