"""moejax: sparse Mixture-of-Experts layers and experiments in JAX/Flax.

Public surface (see each object's docstring for shapes):
  MoeLayer             router + dispatcher + experts (+ shared experts),
                       [B, L, D] -> [B, L, D]
  Router, RoutingDecision, route_top_k, assign_slots, select_top_k,
  group_limited_mask, loss_free_bias_update     token choice (moejax.routing)
  ExpertChoiceRouter, route_expert_choice       (moejax.expert_choice)
  SoftRouter                                    (moejax.soft_moe)
  ReluRouter, route_relu   ReMoE, router='relu' (moejax.relu_router)
  routers, RouterSpec  the router registry: register(RouterSpec(...)),
                       get(name), names(); ROUTERS = the built-in names
  compute_capacity     the capacity formula
  DISPATCHERS          {'einsum', 'gather'} -> (dispatch, combine); 'ragged'
                       in moejax.dispatch (ragged_plan / _dispatch / _combine)
  ExpertBank, RaggedExpertBank, DenseFfn
  load_balance_loss, z_loss, routing_metrics

Also: moejax.models (TransformerLM, attention), moejax.generate (KV-cache
generation), moejax.interop.hf (Hugging Face checkpoints in and out),
moejax.analysis (capture_routing, specialisation).
"""

from moejax.capacity import compute_capacity
from moejax.dispatch import DISPATCHER_NAMES, DISPATCHERS
from moejax.expert_choice import ExpertChoiceRouter, route_expert_choice
from moejax.experts import ACTIVATIONS, DenseFfn, ExpertBank, RaggedExpertBank
from moejax.layers import ROUTERS, MoeLayer
from moejax.losses import load_balance_loss, routing_metrics, z_loss
from moejax.routing import (PRIORITIES, SCORE_FNS, Router, RoutingDecision,
                            assign_slots, group_limited_mask,
                            loss_free_bias_update, route_top_k, select_top_k)
from moejax import routers
from moejax.routers import RouterSpec
from moejax.relu_router import ReluRouter, route_relu
from moejax.soft_moe import SoftRouter

__version__ = '0.1.0'
