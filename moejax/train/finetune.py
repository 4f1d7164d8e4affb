"""Fine-tuning an MoE: which params train, as optax masks.

Axis letters: E experts, D model width, F expert hidden width, k experts
an ESFT layer trains.

A `FinetunePlan` says which param leaves train; `make_optimizer(...,
plan=plan)` (moejax.train.optim) then builds

    chain(zero_frozen(plan),            frozen grads -> 0 (so they do not
                                        count in the clipping norm)
          clip_by_global_norm,
          multi_transform({'train':  adamw,
                           'frozen': set_to_zero,   no state, no update
                           'rows':   select_rows(adamw, plan.expert_rows)},
                          labels))

so a frozen leaf has no optimizer state and gets an update of exact zeros
(it stays bitwise unchanged), and an ESFT expert bank keeps AdamW state for
its trained experts' rows only ([k, D, F] instead of [E, D, F]).

Labels, by param path ('block_1/ffn/experts/wi', '/'-joined), in order:
  * ESFT (`expert_rows`, {MoE layer path: expert ids}): the expert-bank
    leaves of those layers are 'rows'; every other leaf is 'frozen'
    (Wang et al. 2024, "Let the expert stick to his last": only the
    experts a task routes most of its tokens to train).
  * LoRA (`lora_only`): only the adapter leaves (`*_lora_a`, `*_lora_b`)
    train; their base kernels and everything else are frozen.
  * Otherwise every leaf trains, except
  * `freeze_router`: every router param (paths with a 'router' part), and
  * `freeze`: the leaves whose path fully matches one of the regular
    expressions (`re.fullmatch`, e.g. 'block_0/.*' or '.*/attn/.*').
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax import sharding
from moejax.lora import LORA_SUFFIXES

TRAIN, FROZEN, ROWS = 'train', 'frozen', 'rows'


@dataclasses.dataclass(frozen=True)
class FinetunePlan:
  """Which params train (see the module docstring).

  Attributes:
    freeze: regular expressions over '/'-joined param paths; a leaf whose
      path fully matches one is frozen.
    freeze_router: freeze every router param.
    lora_only: only LoRA adapter leaves train.
    expert_rows: ESFT: {MoE layer path, e.g. 'block_1/ffn': sorted expert
      ids}; only these rows of those layers' expert banks train.
  """
  freeze: tuple = ()
  freeze_router: bool = False
  lora_only: bool = False
  expert_rows: Optional[Mapping[str, tuple]] = None

  @property
  def trains_everything(self) -> bool:
    """True when the plan freezes nothing (plain training)."""
    return not (self.freeze or self.freeze_router or self.lora_only or
                self.expert_rows is not None)


def path_name(path) -> str:
  """'block_1/ffn/experts/wi' of a jax key path (dict keys / attributes)."""
  return '/'.join(sharding.path_names(path))


def is_lora(name: str) -> bool:
  """Whether a param path names a LoRA adapter factor."""
  return name.endswith(LORA_SUFFIXES)


def _bank_layer(name: str) -> Optional[str]:
  """'block_1/ffn' for 'block_1/ffn/experts/wi' (an expert-bank leaf)."""
  head, sep, _ = name.rpartition('/experts/')
  return head if sep else None


def label(name: str, plan: FinetunePlan) -> str:
  """The label (TRAIN | FROZEN | ROWS) of the param at path `name`."""
  if plan.expert_rows is not None:
    return ROWS if _bank_layer(name) in plan.expert_rows else FROZEN
  if plan.lora_only and not is_lora(name):
    return FROZEN
  if plan.freeze_router and 'router' in name.split('/'):
    return FROZEN
  if any(re.fullmatch(p, name) for p in plan.freeze):
    return FROZEN
  return TRAIN


def param_labels(params: Any, plan: FinetunePlan) -> Any:
  """A tree like `params` of each leaf's label (see `label`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: label(path_name(path), plan), params)


def check_plan(params: Any, plan: FinetunePlan) -> None:
  """Raises ValueError naming the `finetune` key that does not fit `params`.

  Checks: every `freeze` pattern compiles and matches some param; ESFT
  layers exist and their expert ids are in [0, E); LoRA needs adapters;
  at least one param trains.
  """
  names = [path_name(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  for pattern in plan.freeze:
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f'finetune.freeze: {pattern!r} is not a regular '
                       f'expression ({e}).') from e
    if not any(regex.fullmatch(n) for n in names):
      raise ValueError(
          f'finetune.freeze: {pattern!r} matches no param; allowed: regular '
          'expressions fully matching param paths such as '
          f'{", ".join(repr(n) for n in names[:3])}.')
  if plan.lora_only and not any(is_lora(n) for n in names):
    raise ValueError('finetune.lora_rank > 0 but the model has no LoRA '
                     'adapters (check finetune.lora_targets).')
  if plan.expert_rows is not None:
    _check_rows(params, plan.expert_rows)
  labels = jax.tree.leaves(param_labels(params, plan))
  if all(x == FROZEN for x in labels):
    raise ValueError('finetune: the settings freeze every param; allowed: '
                     'settings that leave some param to train.')


def _check_rows(params: Any,
                expert_rows: Mapping[str, Sequence[int]]) -> None:
  banks = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    layer = _bank_layer(path_name(path))
    if layer is not None:
      banks[layer] = leaf.shape[0]
  for layer, rows in expert_rows.items():
    if layer not in banks:
      raise ValueError(f'finetune.train_experts: no expert bank at {layer!r};'
                       f' allowed layers: {sorted(banks)}.')
    if not rows or any(not 0 <= r < banks[layer] for r in rows):
      raise ValueError(f'finetune.train_experts: layer {layer!r} rows '
                       f'{list(rows)} must be a non-empty subset of '
                       f'[0, {banks[layer]}).')


def zero_frozen(plan: FinetunePlan) -> optax.GradientTransformation:
  """Sets the gradients that do not train to zero (stateless).

  Frozen leaves become zeros, and so do the untrained rows of an ESFT
  expert bank, so that a following `clip_by_global_norm` measures only
  what trains.
  """

  def update(updates, state, params=None):
    del params

    def leaf(path, u):
      name = path_name(path)
      kind = label(name, plan)
      if kind == FROZEN:
        return jnp.zeros_like(u)
      if kind == ROWS:
        keep = np.zeros(u.shape[0], bool)
        keep[list(plan.expert_rows[_bank_layer(name)])] = True
        return jnp.where(keep.reshape((-1,) + (1,) * (u.ndim - 1)), u, 0)
      return u

    return jax.tree_util.tree_map_with_path(leaf, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      update)


def select_rows(inner: optax.GradientTransformation,
                expert_rows: Mapping[str, Sequence[int]]
                ) -> optax.GradientTransformation:
  """`inner` on the trained rows of expert-bank leaves only.

  Each leaf [E, ...] of the layer 'L' (path 'L/experts/...') is cut to its
  rows `expert_rows['L']` ([k, ...]) before `inner` sees it (so inner's
  state is [k, ...]), and inner's update is scattered back into zeros of
  [E, ...]: the other rows get exact zero updates.

  Args:
    inner: the transformation of the trained rows (e.g. AdamW).
    expert_rows: {MoE layer path: expert ids}.

  Returns:
    An optax GradientTransformation (use it under `optax.multi_transform`,
    whose masked leaves, optax.MaskedNode, have no array leaves).
  """
  index = {layer: np.asarray(sorted(rows), np.int32)
           for layer, rows in expert_rows.items()}

  def rows_of(tree):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.take(x, index[_bank_layer(path_name(path))],
                                 axis=0), tree)

  def init(params):
    return inner.init(rows_of(params))

  def update(updates, state, params=None):
    small, state = inner.update(rows_of(updates), state,
                                None if params is None else rows_of(params))
    full = jax.tree_util.tree_map_with_path(
        lambda path, u, s: jnp.zeros_like(u).at[
            index[_bank_layer(path_name(path))]].set(s.astype(u.dtype)),
        updates, small)
    return full, state

  return optax.GradientTransformation(init, update)


def esft_select(counts: np.ndarray, fraction: float) -> tuple:
  """ESFT-Token: the fewest experts that hold `fraction` of the routed tokens.

  Experts are taken by decreasing count (ties: lower id first) until their
  share of all routed choices reaches `fraction`.

  Args:
    counts: [E] routed (token, choice) pairs per expert on the task data.
    fraction: target share in (0, 1].

  Returns:
    The chosen expert ids, sorted ascending (at least one).
  """
  counts = np.asarray(counts, np.float64)
  order = np.lexsort((np.arange(len(counts)), -counts))  # count desc, id asc
  total = counts.sum()
  if total <= 0:
    return tuple(range(len(counts)))
  share = np.cumsum(counts[order]) / total
  # Smallest n with share[n-1] >= fraction (a float tolerance for 1.0).
  n = int(np.searchsorted(share, fraction - 1e-12) + 1)
  return tuple(sorted(int(i) for i in order[:min(n, len(counts))]))


def trainable_count(params: Any, plan: Optional[FinetunePlan]) -> int:
  """Number of scalars that train under `plan` (None: all)."""
  if plan is None or plan.trains_everything:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  total = 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = path_name(path)
    kind = label(name, plan)
    if kind == TRAIN:
      total += int(np.prod(x.shape))
    elif kind == ROWS:
      rows = len(plan.expert_rows[_bank_layer(name)])
      total += rows * int(np.prod(x.shape[1:]))
  return total
