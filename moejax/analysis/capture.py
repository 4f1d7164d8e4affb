"""Reading a model's routing decisions on eval data, and the per-layer
specialisation score (`moejax.analysis.info`) computed from them.

Axis letters: B batch (sequences), L sequence length, G groups, S tokens per
group, K experts chosen per token.

The routers' decisions are captured with flax `capture_intermediates` on the
MoeLayer submodules named 'router' (their `__call__` returns the decision
and its aux), so no layer needs a hook. Layer names are the top-level
submodule holding the router ('block_i' in a TransformerLM, as in
aux['layers'] and the 'moe/block_i/...' metrics).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax import grouping
from moejax.analysis.info import nmi_from_joint
from moejax.analysis.info import score_layer

ROUTER_NAME = 'router'  # the MoeLayer's router submodule (param router/kernel)
# An aux entry only expert-choice routers report (expert_choice.py).
EXPERT_CHOICE_KEY = 'tokens_by_0_experts'


def is_router(module: nn.Module, method_name: str) -> bool:
  """capture_intermediates filter: the __call__ of every MoeLayer router."""
  return method_name == '__call__' and module.name == ROUTER_NAME


def _as_variables(params: Any) -> Mapping[str, Any]:
  """A param tree -> {'params': tree}; a full variables dict is kept."""
  if isinstance(params, Mapping) and 'params' in params:
    return params
  return {'params': params}


def _router_decisions(intermediates: Any):
  """(layer name, path, router output tuple) per captured router, from a
  `capture_intermediates=is_router` 'intermediates' tree. A token- or
  expert-choice router's output is (RoutingDecision, aux)."""
  flat = jax.tree_util.tree_flatten_with_path(
      intermediates, is_leaf=lambda v: isinstance(v, tuple))[0]
  for path, value in flat:
    keys = tuple(str(getattr(k, 'key', k)) for k in path)
    if keys[-2:] != (ROUTER_NAME, '__call__'):
      continue  # e.g. the MoeLayer's sown 'dispatched' buffers
    yield (keys[0] if len(keys) > 2 else 'moe'), keys, value[0]


def on_tokens(a: jax.Array, model: nn.Module, b: int, l: int) -> jax.Array:
  """A router's [G, S, ...] array back on the tokens: [B, L, ...].

  Follows the layout of the model's MoE groups (`model.moe`'s group_size
  or group_sequences and group_order, `moejax.grouping`); a model without
  a `moe` mapping is read as one group per sequence.
  """
  moe = getattr(model, 'moe', None) or {}
  s = grouping.group_tokens(moe.get('group_size'),
                            moe.get('group_sequences'), l, b)
  return grouping.from_groups(a, b, l, s, moe.get('group_order', 'sequence'))


def _routes_a_subset(decision: Any, b: int, l: int) -> bool:
  """Whether a token-choice decision covers fewer than the B * L tokens: a
  Mixture-of-Depths block's MoE routes only the tokens the block selected,
  so it has no choice to map back onto every token (left out of the
  per-token statistics)."""
  return decision.expert_index[..., 0].size < b * l


def _top1(decision: Any, model: nn.Module, b: int, l: int) -> jax.Array:
  """A token-choice decision's first choice per token: [B, L] int32."""
  return on_tokens(decision.expert_index[..., 0], model, b, l).astype(
      jnp.int32)


def _apply_captured(model: nn.Module, variables: Any, inputs: jax.Array,
                    padding_mask: Optional[jax.Array]):
  """Eval-mode forward pass with every router's output captured.

  Returns:
    ((logits, aux), the 'intermediates' tree).
  """
  out, state = model.apply(
      variables, inputs, padding_mask=padding_mask, deterministic=True,
      capture_intermediates=is_router, mutable=['intermediates'])
  return out, state['intermediates']


@functools.partial(jax.jit, static_argnums=0)
def _routing_pass(model: nn.Module, variables: Any, inputs: jax.Array,
                  pad_id: jax.Array):
  """Eval-mode forward pass that keeps each router's top-1 choice.

  `pad_id` is traced (-1: no padding, as token ids are >= 0), so one
  program serves every pad id.

  Returns:
    ({layer: top-1 expert [B, L] int32}, {layer: the MoeLayer aux dict}).
  """
  b, l = inputs.shape
  (_, aux), intermediates = _apply_captured(model, variables, inputs,
                                            inputs == pad_id)
  top1 = {}
  for layer, keys, (decision, *_) in _router_decisions(intermediates):
    if not hasattr(decision, 'expert_index'):
      raise ValueError(
          f'the router at {"/".join(keys[:-1])} returned a '
          f'{type(decision).__name__} without expert_index [G, S, K]; the '
          'specialisation score needs token-choice routing.')
    if _routes_a_subset(decision, b, l):
      continue
    top1[layer] = _top1(decision, model, b, l)
  return top1, dict(aux.get('layers', {}))


def expert_domain_counts(model: nn.Module, variables: Any,
                         inputs: jax.Array, padding_mask: Optional[jax.Array],
                         domain: jax.Array, num_domains: int
                         ) -> dict[str, jax.Array]:
  """Joint counts of (top-1 expert, domain) per MoE layer, traceable.

  The in-training form of `specialisation`: an eval step sums these over
  its batches and the NMI is `info.nmi_from_joint` of the sum. Row 1 is a
  chance level: the same counts with the domains rolled by one sequence
  within the batch (every token keeps a common, wrong domain; needs B >= 2
  to differ from row 0). Tokens that are padding, or whose domain is not in
  [0, num_domains), are not counted. Routers without a per-token choice
  (expert choice, Soft MoE) are left out.

  Args:
    model: see `routing_outputs`.
    variables: {'params': ..., other collections}.
    inputs: [B, L] int32 token ids.
    padding_mask: [B, L] bool (True = padding) or None.
    domain: [B] int32 domain ids (< 0 = unknown).
    num_domains: N, a static bound on the domain ids.

  Returns:
    {layer: [2, E, N] float32}: [0] the counts, [1] the rolled-domain ones.
  """
  b, l = inputs.shape
  labels = jnp.broadcast_to(domain[:, None], (b, l))
  return expert_label_counts(model, variables, inputs, padding_mask,
                             {'domain': (labels, num_domains)})['domain']


def expert_label_counts(model: nn.Module, variables: Any,
                        inputs: jax.Array, padding_mask: Optional[jax.Array],
                        labels: Mapping[str, tuple]
                        ) -> dict[str, dict[str, jax.Array]]:
  """Joint counts of (top-1 expert, per-token label), from one forward pass.

  E.g. labels {'domain': (domain broadcast to [B, L], N), 'token': (inputs,
  V)}: the domain and the token-id specialisation of every token-choice
  layer. Row 1 of each count is the chance level: the labels rolled by one
  sequence within the batch (the label marginal kept, the pairing broken).
  Padding and labels outside [0, N) are not counted. Counts are scatter-adds
  (no [B, L, N] one-hot), so N may be a large vocabulary.

  Args:
    model: see `routing_outputs`.
    variables: {'params': ..., other collections}.
    inputs: [B, L] int32 token ids.
    padding_mask: [B, L] bool (True = padding) or None.
    labels: {name: ([B, L] int labels, N a static bound)}.

  Returns:
    {name: {layer: [2, E, N] float32}}.
  """
  b, l = inputs.shape
  _, intermediates = _apply_captured(model, variables, inputs, padding_mask)
  valid = (jnp.ones((b, l), jnp.float32) if padding_mask is None
           else (~padding_mask).astype(jnp.float32))
  out = {name: {} for name in labels}
  for layer, _, (decision, *rest) in _router_decisions(intermediates):
    if not hasattr(decision, 'expert_index') or (
        rest and EXPERT_CHOICE_KEY in rest[-1]):
      continue  # soft / expert-choice routing: no per-token first choice
    if _routes_a_subset(decision, b, l):
      continue
    top1 = _top1(decision, model, b, l)  # [B, L]
    for name, (label, n) in labels.items():
      rows = jnp.stack([label, jnp.roll(label, 1, axis=0)])  # [2, B, L]
      ok = (rows >= 0) & (rows < n)
      weight = valid[None] * ok.astype(jnp.float32)
      counts = jnp.zeros((2, decision.num_experts, n), jnp.float32)
      out[name][layer] = counts.at[
          jnp.arange(2)[:, None, None], top1[None],
          jnp.where(ok, rows, 0)].add(weight)
  return out


def scores_from_counts(counts: Sequence[Mapping[str, np.ndarray]]
                       ) -> dict[str, dict[str, float]]:
  """Specialisation NMI of summed `expert_domain_counts`, per layer.

  Args:
    counts: per batch {layer: [2, E, N] counts}; row 1 counts each sequence
      under its batch neighbour's domain.

  Returns:
    {layer: {'nmi', 'chance'}} in layer order ({} without counts): the NMI
    (`info.nmi_from_joint`, as in `specialisation`) of the summed row 0 and
    of row 1. This chance level is one fixed within-batch shuffle, not the
    mean of several eval-wide ones (`info.shuffled_nmi`).
  """
  if not counts or not counts[0]:
    return {}
  out = {}
  for layer in sorted(counts[0], key=layer_order):
    joint = np.sum([np.asarray(c[layer], np.float64) for c in counts], 0)
    out[layer] = {'nmi': nmi_from_joint(joint[0]),
                  'chance': nmi_from_joint(joint[1])}
  return out


def has_domains(batches: Sequence[Mapping[str, np.ndarray]]) -> bool:
  """Whether every example of every batch carries a domain id >= 0."""
  return bool(batches) and all(
      'domain' in b and np.all(np.asarray(b['domain']) >= 0) for b in batches)


def routing_outputs(model: nn.Module, params: Any,
                    batches: Sequence[Mapping[str, np.ndarray]],
                    pad_id: Optional[int] = None):
  """Top-1 experts, validity and per-layer aux of eval batches.

  Args:
    model: TransformerLM-like: apply(variables, inputs [B, L],
      padding_mask=, deterministic=, capture_intermediates=, mutable=) ->
      ((logits, aux with aux['layers']), state); MoE routers are submodules
      named 'router'. Static under jit (must be hashable).
    params: the param tree, or a full variables dict {'params': ..., ...}.
    batches: dicts with 'tokens' [B, L + 1] (inputs are tokens[:, :-1]).
    pad_id: padding token id or None.

  Returns:
    ({layer: top-1 expert [sum B, L] int32 numpy},
     valid [sum B, L] bool numpy (False at padding inputs),
     [per batch: {layer: aux dict of numpy arrays}]).
  """
  variables = _as_variables(params)
  tops, valids, auxes = [], [], []
  for batch in batches:
    inputs = jnp.asarray(np.asarray(batch['tokens'])[:, :-1], jnp.int32)
    top1, aux = jax.device_get(_routing_pass(
        model, variables, inputs, jnp.int32(-1 if pad_id is None else pad_id)))
    tops.append(top1)
    auxes.append(aux)
    valids.append(np.ones(inputs.shape, bool) if pad_id is None else
                  np.asarray(inputs) != pad_id)
  layers = sorted(tops[0], key=layer_order) if tops else []
  experts = {k: np.concatenate([t[k] for t in tops]) for k in layers}
  valid = (np.concatenate(valids) if valids else np.zeros((0, 0), bool))
  return experts, valid, auxes


def layer_order(name: str):
  """'block_10' after 'block_2'."""
  head, _, tail = name.rpartition('_')
  return (head, int(tail)) if tail.isdigit() else (name, -1)


def domain_ids(batches: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
  """[sum B] domain ids; ValueError if any is missing or unknown."""
  if not has_domains(batches):
    raise ValueError(
        "batches carry no domain ids ('domain' missing or -1): the "
        "specialisation score needs labelled eval data, e.g. "
        "data.name='synthetic_mixture'.")
  return np.concatenate([np.asarray(b['domain'], np.int64) for b in batches])


def specialisation(model: nn.Module, params: Any,
                   batches: Sequence[Mapping[str, np.ndarray]],
                   pad_id: Optional[int] = None) -> dict[str, float]:
  """NMI between each token's top-1 expert and its domain, per MoE layer.

  Eval mode (deterministic routing); padding inputs are left out. The
  routing is read with flax `capture_intermediates` on the routers, so the
  layers need no change. Compiles once per (model, batch shape).

  Args:
    model: see `routing_outputs`.
    params: the param tree (or a full variables dict).
    batches: eval batches {'tokens': [B, L + 1], 'domain': [B]}, every
      domain >= 0 (see `has_domains`).
    pad_id: padding token id or None.

  Returns:
    {layer name (e.g. 'block_0'): NMI in [0, 1]}; {} for a dense model.
  """
  if not getattr(model, 'moe_layers', True):
    return {}  # a dense TransformerLM: nothing to run
  domain = domain_ids(batches)
  experts, valid, _ = routing_outputs(model, params, batches, pad_id)
  return {layer: score_layer(top1, domain, valid, num_shuffles=0)['nmi']
          for layer, top1 in experts.items()}
