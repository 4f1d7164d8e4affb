"""ReMoE: ReLU routing with an adaptive L1 penalty (router='relu').

Axis letters: G groups, S tokens per group, D model width, E experts,
K choices per token (here K = E), C capacity.

Wang, Chen and Zhu 2024, "ReMoE: Fully Differentiable Mixture-of-Experts
with ReLU Routing" (ICLR 2025). The gates are `ReLU(x . W)` (float32): no
top-k and no softmax, so routing is continuous, and every expert with a
positive gate is chosen; how many experts a token gets varies. What keeps
the layer sparse is an L1 penalty on the gates whose coefficient a
controller moves every training step towards a target sparsity:

    L_reg  = mean over valid tokens of sum_e gate_e            ('plain')
           = mean over valid tokens of sum_e f_e * gate_e       (balanced,
             f_e = E * (tokens with gate_e > 0) / (K_target * tokens))
    lambda <- lambda * alpha ** sign(density - K_target / E)
    density = (valid token-expert pairs with gate > 0) / (valid tokens * E)

i.e. lambda grows while the layer is denser than the target sparsity
1 - K_target / E and shrinks while it is sparser (the paper's
lambda_{i+1} = lambda_i * alpha^{sign((1 - k/E) - S_i)}, alpha = 1.2,
lambda_0 = 1e-8). The balanced form is the paper's load-balancing L1
(its Megatron code: the Switch formula with the ReLU gates as the
probabilities and K_target in the count normaliser).

Representation. A RoutingDecision with K = E choices per token: the E
experts sorted by gate, largest first (ties to the lower index), so choice
0 is the token's strongest expert as in top-k; `request = valid & gate > 0`.
Capacity and dropping are those of top-k (`routing.assign_slots`), with
C = ceil(cf * S * K_target / E); each expert's slots go in position order
(priority 'choice' or 'token': the same here, and causal) or by the
tokens' largest gates ('score', which sees later tokens). Every
dispatcher serves it; 'ragged' and 'per_token' build E rows per token
(E x the rows of top-1), so they are the slow choices here.

State. lambda lives in the 'moe_state' collection (`moe_state/.../router/
l1_coeff`, a float32 scalar initialised to lambda_0): outside the
optimizer, inside the checkpoint. A training call (`deterministic=False`)
with 'moe_state' mutable uses the current lambda and then stores the
controller's update with the density of this call's whole (global) batch
(under gradient accumulation, of the whole step's batch: the counts come
from the train step's counting pass, `_step_counts`); otherwise lambda is
only read. One controller per layer (the paper shares
one lambda and the mean density over layers; per layer, every layer meets
the target on its own).

aux: `reg_loss` = lambda * L_reg enters the training loss with weight 1
(not aux_loss_weight: lambda is the adaptive weight; `train.step`),
`aux_loss` = 0 (the L1 term balances; no Switch loss), `z_loss`, the
`losses.routing_metrics` (expert_load over the requested choices, before
capacity), plus `l1_penalty` (L_reg), `l1_coeff` (lambda used in this
call) and `losses.active_expert_metrics` (`active_experts`: experts per
valid token before capacity; `kept_experts`: after).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import losses
from moejax import routers
from moejax import routing

# Options only this router reads (top_k = K_target and priority are shared
# with 'topk', with the same defaults).
RELU_OPTIONS = (('top_k', 1), ('priority', 'choice'),
                ('relu_l1_alpha', 1.2), ('relu_l1_init', 1e-8),
                ('relu_l1_balance', False))


def route_relu(gates: jax.Array, capacity: int, priority: str = 'choice',
               valid: Optional[jax.Array] = None) -> routing.RoutingDecision:
  """ReLU gates -> a RoutingDecision with K = E choices, capacity applied.

  Args:
    gates: [G, S, E] float32, ReLU(logits) (>= 0).
    capacity: C.
    priority: 'choice' | 'token' | 'score' (score: the largest gate).
    valid: optional [G, S] bool, False for padding.

  Returns:
    A RoutingDecision: expert_index [G, S, E] the experts by gate, largest
    first (ties, e.g. the zero gates, to the lower index); gate the sorted
    gates; request valid & gate > 0; slot and kept from
    `routing.assign_slots`, each expert's slots claimed in position order
    ('choice' and 'token' agree: a token's claims on different experts
    never compete) or by the tokens' largest gate, descending ('score').

  Example (E = 3, one group, C = 1): gates [[.5, 0, .2], [.3, 0, 0]] sort
  to experts [[0, 2, 1], [0, 1, 2]]; requests (0, 2) and (0); token 0 gets
  expert 0 (slot 0) and expert 2 (slot 0), token 1's expert 0 request is
  dropped (slot 1 >= C).
  """
  g, s, e = gates.shape
  valid = jnp.ones((g, s), bool) if valid is None else valid.astype(bool)
  # Slots are claimed with choice e = expert e, so every expert's claims
  # come in position order ('choice' = 'token': causal), or by the tokens'
  # largest gates ('score').
  by_expert = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (g, s, e))
  request = valid[..., None] & (gates > 0)
  slot, kept = routing.assign_slots(by_expert, request, e, capacity,
                                    priority, priority_score=gates.max(-1))
  # Then the choices are sorted by gate. Inactive experts get one equal
  # key, so the stable sort keeps them in index order (whatever the sign
  # of their zero).
  key = jnp.where(gates > 0, -gates, 1.0)
  order = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
  take = lambda a: jnp.take_along_axis(a, order, axis=-1)
  return routing.RoutingDecision(
      expert_index=order, slot=take(slot), gate=take(gates).astype(
          jnp.float32), request=take(request), kept=take(kept),
      num_experts=e, capacity=capacity)


def l1_penalty(gates: jax.Array, valid: jax.Array, target_k: int,
               balance: bool = False,
               step_counts: Optional[tuple] = None) -> jax.Array:
  """The ReMoE sparsity penalty L_reg (module docstring), a float32 scalar.

  Args:
    gates: [G, S, E] ReLU gates.
    valid: [G, S] bool.
    target_k: K_target (the balanced form's normaliser).
    balance: weight expert e's gates by f_e = E * active_e / (K_target *
      tokens) (no gradient through f).
    step_counts: optional (active [E], tokens) of the whole step's batch
      (gradient accumulation): f from them instead of this call's tokens.

  Example: two valid tokens, gates [1, 0] and [.5, .5] (E = 2): plain
  (1 + 1) / 2 = 1; balanced with K_target = 1: f = 2 * (2, 1) / (1 * 2) =
  (2, 1), (2 * 1 + 2 * .5 + 1 * .5) / 2 = 1.75.
  """
  valid_f = valid.astype(jnp.float32)
  tokens = jnp.maximum(valid_f.sum(), 1.0)
  per_expert = jnp.einsum('GSE,GS->E', gates.astype(jnp.float32), valid_f)
  if balance:
    active, total = step_counts or (_active_counts(gates, valid), tokens)
    f = gates.shape[-1] * active / (target_k * jnp.maximum(total, 1.0))
    per_expert = per_expert * jax.lax.stop_gradient(f)
  return per_expert.sum() / tokens


def _active_counts(gates: jax.Array, valid: jax.Array) -> jax.Array:
  """[G, S, E] gates, [G, S] valid -> [E] valid tokens with a positive
  gate per expert (float32)."""
  return jnp.einsum('GSE,GS->E', (gates > 0).astype(jnp.float32),
                    valid.astype(jnp.float32))


def l1_coeff_update(coeff: jax.Array, density: jax.Array, target_k: int,
                    num_experts: int, alpha: float) -> jax.Array:
  """lambda * alpha ** sign(density - K_target / E) (float32 scalar).

  Args:
    coeff: lambda, float32 scalar.
    density: realised fraction of (valid token, expert) pairs with a
      positive gate, before capacity.
    target_k: K_target.
    num_experts: E.
    alpha: the controller's factor (> 1).

  Example: lambda 1, alpha 1.2, K_target / E = 1/4: density 1/2 -> 1.2,
  density 1/8 -> 1/1.2, density 1/4 -> 1.
  """
  step = jnp.sign(density - target_k / num_experts)
  return (coeff * jnp.power(jnp.float32(alpha), step)).astype(jnp.float32)


class ReluRouter(nn.Module):
  """Linen ReMoE router: x [G, S, D] -> (RoutingDecision with K = E, aux).

  Params: `kernel` [D, E] float32 (initialised as `routing.Router`'s).
  State: `l1_coeff` (moe_state), see the module docstring.
  """
  num_experts: int
  target_k: int = 1
  priority: str = 'choice'
  l1_alpha: float = 1.2
  l1_init: float = 1e-8
  l1_balance: bool = False
  kernel_init: nn.initializers.Initializer = nn.initializers.variance_scaling(
      0.1, 'fan_in', 'truncated_normal')

  @nn.compact
  def __call__(self, x: jax.Array, capacity: int,
               valid: Optional[jax.Array] = None,
               deterministic: bool = True):
    """Routes x [G, S, D]; valid [G, S] bool (False = padding)."""
    g, s, d = x.shape
    e = self.num_experts
    valid = jnp.ones((g, s), bool) if valid is None else valid
    kernel = self.param('kernel', self.kernel_init, (d, e), jnp.float32)
    coeff = self.variable('moe_state', 'l1_coeff',
                          lambda: jnp.asarray(self.l1_init, jnp.float32))
    logits = routing.router_logits(x, kernel)  # [G, S, E]
    gates = jax.nn.relu(logits)
    decision = route_relu(gates, capacity, self.priority, valid)
    step = self._step_counts(gates, valid, deterministic)
    penalty = l1_penalty(gates, valid, self.target_k, self.l1_balance, step)
    lam = coeff.value
    aux = {'aux_loss': jnp.zeros((), jnp.float32),
           'z_loss': losses.z_loss(logits, valid),
           'reg_loss': lam * penalty, 'l1_penalty': penalty,
           'l1_coeff': lam}
    # Counted choices are the requested ones: unrequested indices -> E
    # (no one-hot column), so expert_load is over the active choices.
    counted = decision.replace(expert_index=jnp.where(
        decision.request, decision.expert_index, e))
    probs = losses.expert_probs(gates, 'sigmoid')  # gates / their sum
    aux.update(losses.routing_metrics(probs, counted, valid))
    aux.update(losses.active_expert_metrics(decision, valid))
    if not deterministic and self.is_mutable_collection('moe_state'):
      active, tokens = step or (_active_counts(gates, valid),
                                valid.astype(jnp.float32).sum())
      density = active.sum() / jnp.maximum(tokens * e, 1.0)
      coeff.value = l1_coeff_update(lam, density, self.target_k, e,
                                    self.l1_alpha)
    return decision, aux

  def _step_counts(self, gates: jax.Array, valid: jax.Array,
                   deterministic: bool) -> Optional[tuple]:
    """(active [E], tokens) of the whole step's batch under gradient
    accumulation, or None (then this call's own counts serve).

    In training the router exchanges its active-gate counts per expert
    through `routing.step_totals` (sown in the train step's counting pass,
    the step's totals read back in every micro-batch), so
    the L1 controller moves lambda once, from the whole batch's density,
    and the balanced penalty's f is the whole batch's.
    """
    if deterministic:
      return None
    return routing.step_totals(self, _active_counts(gates, valid), valid)


def _check_layer(layer) -> None:
  """ValueError naming the bad ReMoE option of a MoeLayer."""
  alpha, init = layer.relu_l1_alpha, layer.relu_l1_init
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or (
      not alpha > 1):
    raise ValueError(f'relu_l1_alpha must be a number > 1 (the L1 '
                     f'controller factor; ReMoE: 1.2), got {alpha!r}.')
  if isinstance(init, bool) or not isinstance(init, (int, float)) or (
      not init > 0):
    raise ValueError(f'relu_l1_init must be a number > 0 (the initial L1 '
                     f'coefficient; ReMoE: 1e-8), got {init!r}.')
  if not isinstance(layer.relu_l1_balance, bool):
    raise ValueError('relu_l1_balance must be a bool, got '
                     f'{layer.relu_l1_balance!r}.')


def _relu_kwargs(layer) -> dict:
  return dict(num_experts=layer.effective_experts,
              target_k=layer.effective_top_k, priority=layer.priority,
              l1_alpha=float(layer.relu_l1_alpha),
              l1_init=float(layer.relu_l1_init),
              l1_balance=layer.relu_l1_balance)


# `_add`, as the built-ins in moejax.routers (which imports this module at
# its end, before MoeLayer exists); tests/test_router_registry.py checks
# that these options are MoeLayer fields.
SPEC = routers._add(routers.RouterSpec(  # pylint: disable=protected-access
    name='relu', module=ReluRouter, kwargs=_relu_kwargs,
    dispatchers=('gather', 'einsum', 'ragged', 'per_token'),
    options=RELU_OPTIONS, validate=_check_layer,
    # 'score' sorts a group's tokens by their largest gate: later first.
    causal_options=(('priority', ('choice', 'token')),)))
