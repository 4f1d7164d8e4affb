"""moejax: sparse Mixture-of-Experts layers and experiments in JAX/Flax.

Public surface (see each object's docstring for shapes):
  MoeLayer             router + dispatcher + experts, [B, L, D] -> [B, L, D]
  Router, RoutingDecision, route_top_k, assign_slots, select_top_k
  compute_capacity     the capacity formula
  DISPATCHERS          {'einsum', 'gather'} -> (dispatch, combine)
  ExpertBank, DenseFfn
  load_balance_loss, z_loss, routing_metrics
"""

from moejax.capacity import compute_capacity
from moejax.dispatch import DISPATCHERS
from moejax.experts import ACTIVATIONS, DenseFfn, ExpertBank
from moejax.layers import ROUTERS, MoeLayer
from moejax.losses import load_balance_loss, routing_metrics, z_loss
from moejax.routing import (PRIORITIES, SCORE_FNS, Router, RoutingDecision,
                            assign_slots, route_top_k, select_top_k)

__version__ = '0.1.0'
