"""Every MoE layer's routing on a batch: logits, choices, gates, drops.

Axis letters: B batch (sequences), L sequence length, D model width,
G groups, S tokens per group, E experts, K experts chosen per token.

    tokens [B, L] -> model.apply (eval mode) -> per router:
        its input x [G, S, D] and output (RoutingDecision, aux)
    -> LayerRouting with every array on tokens [B, L, ...]

The decisions come from the same `capture_intermediates` pass as the
specialisation score (`moejax.analysis.capture`). A decision does not hold
the logits, so an interceptor (`nn.intercept_methods`) also reads each
router's input and kernel, and the logits are recomputed with the router's
own `routing.router_logits` (float32, HIGHEST precision): bit for bit what
the router saw in eval mode, where there is no jitter. A MoeLayer routes
groups [G, S] (`MoeLayer._group`, padded at the end if asked); the first
B * L group positions are the batch's tokens in order.

Only token-choice routers are read: router='topk' (with null experts,
logits are [.., E + N] and an expert_index >= E is a null expert) and
router='relu' (K = E choices, the experts by gate, largest first; `kept`
False for the inactive ones); expert choice and Soft MoE have no "K best
experts per token" and raise a ValueError.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from moejax import expert_choice
from moejax import relu_router
from moejax import routing
from moejax import soft_moe
from moejax.analysis.capture import _apply_captured
from moejax.analysis.capture import _as_variables
from moejax.analysis.capture import _router_decisions
from moejax.analysis.capture import is_router
from moejax.analysis.capture import on_tokens
from moejax.analysis.capture import layer_order

# Router modules this capture refuses, by the MoeLayer `router` value.
UNSUPPORTED_ROUTERS = ((expert_choice.ExpertChoiceRouter, 'expert_choice'),
                       (soft_moe.SoftRouter, 'soft_moe'))


@struct.dataclass
class LayerRouting:
  """One MoE layer's routing of a [B, L] batch (numpy arrays)."""
  logits: np.ndarray  # [B, L, E] float32, x . W of the router
  expert_index: np.ndarray  # [B, L, K] int32, chosen experts, best first
  gate: np.ndarray  # [B, L, K] float32, combine weight before drops
  kept: np.ndarray  # [B, L, K] bool, the choice got a slot (not padding)
  expert_load: np.ndarray  # [E] float32, share of valid choices per expert

  @property
  def top1(self) -> np.ndarray:
    """[B, L] int32: each token's first choice (its expert map)."""
    return self.expert_index[..., 0]


def _check_token_choice(module: nn.Module) -> None:
  """ValueError naming the router unless `module` is a token-choice one."""
  for kind, name in UNSUPPORTED_ROUTERS:
    if isinstance(module, kind):
      raise ValueError(
          f"capture_routing reads token-choice routing only; the router at "
          f"{'/'.join(module.path)} is router={name!r} ({kind.__name__}), "
          "which has no K best experts per token. Allowed: router='topk' "
          "or 'relu'.")
  if not isinstance(module, (routing.Router, relu_router.ReluRouter)):
    raise ValueError(f'capture_routing: unknown router module '
                     f'{type(module).__name__} at {"/".join(module.path)}.')


def _logit_recorder(logits: dict):
  """An interceptor that stores each router's logits [G, S, E] in `logits`,
  keyed by the router's module path."""

  def interceptor(next_fun, args, kwargs, context):
    if is_router(context.module, context.method_name):
      _check_token_choice(context.module)
      kernel = context.module.get_variable('params', 'kernel')
      logits[tuple(context.module.path)] = routing.router_logits(args[0],
                                                                 kernel)
    return next_fun(*args, **kwargs)

  return interceptor


@functools.partial(jax.jit, static_argnums=0)
def _capture_pass(model: nn.Module, variables: Any, tokens: jax.Array,
                  padding_mask: Optional[jax.Array]) -> dict:
  """Eval-mode forward pass -> {layer: {field: array on [B, L, ...]}}."""
  b, l = tokens.shape
  logits = {}
  with nn.intercept_methods(_logit_recorder(logits)):
    _, intermediates = _apply_captured(model, variables, tokens, padding_mask)
  out = {}
  for layer, keys, (decision, aux) in _router_decisions(intermediates):
    fields = {'logits': logits[keys[:-1]],
              'expert_index': decision.expert_index, 'gate': decision.gate,
              'kept': decision.kept}
    out[layer] = {k: on_tokens(v, model, b, l) for k, v in fields.items()}
    out[layer]['expert_load'] = aux['expert_load']
  return out


def capture_routing(model: nn.Module, variables: Any, tokens: Any,
                    padding_mask: Optional[Any] = None
                    ) -> dict[str, LayerRouting]:
  """Each MoE layer's token-choice routing of a batch, in eval mode.

  The model runs with `deterministic=True`: the eval capacity factor, no
  router jitter, no random second-expert policy, no bias update. `kept` is
  the layer's own capacity outcome: a choice is kept iff the token is not
  padding and the choice found a slot among the C = capacity slots of its
  expert in its group, slots being claimed in the layer's `priority` order
  (default 'choice': all first choices in position order, then all second
  choices, ...; see `moejax.routing.assign_slots`). A dropped choice adds
  nothing to the token's output (its `gate` is still reported); with
  capacity_factor=None (dropless) every valid choice is kept. When a group
  spans sequences (`group_size`, `group_order`: `moejax.grouping`), a
  token's `kept` depends on the other tokens of its group, in the group's
  order, as in the layer.

  `expert_index` is the layer's choice: top-K of the scores plus any
  selection bias ('moe_state'), within the allowed expert groups; `gate`
  holds the unbiased scores of those experts. E and K are the effective
  (fine-grained: granularity * ...) values.

  Args:
    model: a TransformerLM-like module: apply(variables, tokens,
      padding_mask=, deterministic=) with MoeLayers whose router submodules
      are named 'router' (router='topk'). Hashable (static under jit).
    variables: {'params': ..., other collections such as 'moe_state'}, or
      the param tree alone.
    tokens: [B, L] int token ids.
    padding_mask: optional [B, L] bool, True = padding (never kept).

  Returns:
    {layer name ('block_i', in layer order): LayerRouting}; {} for a dense
    model. ValueError if a layer uses expert-choice or Soft MoE routing.

  Example:
    >>> routes = capture_routing(model, variables, tokens)
    >>> routes['block_0'].top1  # [B, L] expert map of the first layer
  """
  if not getattr(model, 'moe_layers', True):
    return {}  # a dense TransformerLM: nothing to run
  tokens = jnp.asarray(tokens, jnp.int32)
  if padding_mask is not None:
    padding_mask = jnp.asarray(padding_mask, bool)
  out = jax.device_get(_capture_pass(model, _as_variables(variables), tokens,
                                     padding_mask))
  return {layer: LayerRouting(**out[layer])
          for layer in sorted(out, key=layer_order)}
