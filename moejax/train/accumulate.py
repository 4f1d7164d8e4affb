"""Gradient accumulation: one training step's batch in M micro-batches.

Axis letters: M micro-batches, B batch, L sequence length (inputs).

`train.grad_accum_steps = M` computes the update of a [B, L + 1] batch as
M forward/backward passes over micro-batches of B / M consecutive rows
(micro-batch i holds rows i·B/M .. (i+1)·B/M − 1, so with routing groups
of whole sequences its groups are the whole batch's groups i·G/M ..
(i+1)·G/M − 1) and sums their gradients: the memory of one micro-batch,
the update of the whole batch. The objective summed over micro-batches is
the whole batch's:

    loss = Σ_i nll_sum_i / N_targets + Σ_i (n_i / N) · extra_i
                                     + Σ_i (g_i / G) · aux_loss_weight·aux_loss_i

where extra_i = z_loss_weight·z_loss_i (+ reg_loss_i)(+ mod_loss_i), n_i / N
is micro-batch i's share of the batch's valid (non-padding) input tokens,
and g_i / G its share of the routing groups that hold a valid token
(`group_shares`) under the 'group' balance-loss scope (n_i / N under
'batch'). Every term is exact: the LM loss; the router z-loss and the
'batch' balance loss (means over valid tokens); the 'group' balance loss (a
mean over the groups that hold a valid token, which with padding are not
spread over the micro-batches like the valid tokens are). One exception:
a Mixture-of-Depths block's MoE with groups of a token count that cut its
rows of selected tokens (`group_size` dividing Lc) has empty groups that
depend on the selection; there the tokens' share weighs its groups.

Whole-batch routing statistics. The 'batch' balance loss (Qiu et al.
2025) needs the expert frequencies f of the whole step's batch, the
loss-free bias update and ReMoE's L1 controller (and its balanced
penalty) need the whole batch's counts; these are known only
after every micro-batch has been routed, but the first micro-batch's
backward pass already needs f. So, when a router asks for them, the step
first runs a forward-only counting pass over the M micro-batches (same
params, same router RNG: the same routing decisions), sums the counts, and
hands them to every micro-batch's forward pass (`routing.STEP_COUNTS`):
f is then the whole batch's and P the micro-batch's, and the bias is
updated once from the whole batch's counts — the step equals the
unaccumulated one up to float rounding, at the cost of one more forward
pass. Router noise (jitter, the 'random' second-expert policy) draws from
fold_in(step key, i) in micro-batch i, so with noise the draws differ from
the unaccumulated step's (same distribution). The step's new model state
is the last micro-batch's: every micro-batch starts from the step's state
and moejax's routers update it from the step's counts, so all agree (the
loss-free bias from the step's choice counts, ReMoE's L1 controller from
the step's density of active gates). A stateful module of your own that
updates from its own call would keep only the last micro-batch's update.

Metrics: sums ('nll_sum', 'tokens', 'correct') add up; every other entry
(routing metrics, per-layer loads) is the mean over micro-batches weighted
by their valid-token share; 'loss' and 'lm_loss' are the whole batch's.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import grouping
from moejax import routing
from moejax import sharding

SUMMED_METRICS = ('nll_sum', 'tokens', 'correct')


def micro_batches(x: jax.Array, m: int,
                  mesh: Optional[jax.sharding.Mesh] = None) -> jax.Array:
  """[B, ...] -> [M, B / M, ...]: micro-batch i = rows i·B/M .. (i+1)·B/M − 1.

  On a mesh each micro-batch is split over the batch axes (as a whole
  batch is).

  Raises:
    ValueError if M does not divide B.
  """
  b = x.shape[0]
  if m < 1 or b % m:
    raise ValueError(f'grad_accum_steps={m} must be an int >= 1 dividing the '
                     f'batch size {b}.')
  out = x.reshape(m, b // m, *x.shape[1:])
  if mesh is not None:
    spec = P(None, sharding.batch_axes(mesh))
    out = jax.lax.with_sharding_constraint(out, NamedSharding(mesh, spec))
  return out


def _sum_sown(tree: Any) -> Any:
  """Sown values (tuples, one entry per call) -> their sums, as a tree."""
  if isinstance(tree, tuple):
    total = tree[0]
    for value in tree[1:]:
      total = total + value
    return total
  return {k: _sum_sown(v) for k, v in tree.items()}


def step_counts(count_fn: Callable[[jax.Array, jax.Array], Any],
                tokens: jax.Array, rngs: jax.Array) -> Optional[dict]:
  """The routers' counts summed over the micro-batches, or None.

  Args:
    count_fn: (tokens [B/M, L + 1], rng) -> the `routing.SOWN_COUNTS`
      collection of a forward pass (tuples of counts), {} if no router
      sows.
    tokens: [M, B/M, L + 1] int32.
    rngs: [M] router keys.

  Returns:
    None when no router asks for step counts, else the tree of summed
    counts to pass as the `routing.STEP_COUNTS` collection.
  """
  one = lambda t, r: _sum_sown(count_fn(t, r))
  if not jax.tree.leaves(jax.eval_shape(one, tokens[0], rngs[0])):
    return None
  per_micro = jax.lax.scan(lambda c, xs: (c, one(*xs)), None,
                           (tokens, rngs))[1]
  return jax.tree.map(lambda x: jax.lax.stop_gradient(x.sum(0)), per_micro)


def group_shares(valid: jax.Array, moe: Optional[dict]) -> jax.Array:
  """[M] each micro-batch's share of the step's non-empty routing groups.

  Args:
    valid: [M, B/M, L] bool, False at padding inputs.
    moe: the model's MoeLayer kwargs (group_size, group_sequences,
      group_order, pad_to_group; absent = MoeLayer's defaults), or None.

  Returns:
    [M] float32 summing to 1: groups of micro-batch i that hold a valid
    token / those of all micro-batches. Example: per-sequence groups, rows
    (3 valid, 0 valid | 2 valid, 5 valid) in M = 2 micro-batches -> (1/3,
    2/3), where the valid tokens' shares are (3/10, 7/10).
  """
  moe = moe or {}
  b, l = valid.shape[-2:]
  s = grouping.group_tokens(moe.get('group_size'), moe.get('group_sequences'),
                            l, b)
  order = moe.get('group_order', 'sequence')
  pad = moe.get('pad_to_group', False)

  def nonempty(v):  # [B/M, L] -> groups holding a valid token
    _, vg = grouping.to_groups(v[..., None], v, s, order, pad)
    return jnp.sum(jnp.any(vg, axis=-1).astype(jnp.float32))

  counts = jax.vmap(nonempty)(valid)
  return counts / jnp.maximum(counts.sum(), 1.0)


def combine_metrics(stacked: dict, shares: jax.Array,
                    aux_shares: Optional[jax.Array] = None) -> dict:
  """[M, ...] per-micro-batch metrics -> the step's (see module doc);
  'aux_loss' is weighted by `aux_shares` (default `shares`)."""
  out = {}
  for key, value in stacked.items():
    if key in SUMMED_METRICS:
      out[key] = value.sum(0)
    else:
      weights = aux_shares if (key == 'aux_loss' and
                               aux_shares is not None) else shares
      out[key] = jnp.tensordot(weights, value.astype(jnp.float32), axes=1)
  return out
