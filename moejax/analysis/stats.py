"""Per-layer routing statistics of a trained model on eval data.

Axis letters: B batch, L sequence length, E experts.

One eval-mode pass over fixed batches gives, for every MoE layer, the
expert load, drops and max-violation (the MoeLayer's own aux metrics,
averaged over batches) and the specialisation numbers of
`moejax.analysis.info` (NMI of top-1 expert vs domain, its
shuffled-domain chance level, MI in nats).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import numpy as np

from moejax.analysis import capture as capture_lib
from moejax.analysis import info as info_lib

# MoeLayer aux entries averaged over batches (expert_load is a vector [E]).
AUX_KEYS = ('expert_load', 'drop_fraction', 'fully_dropped_fraction',
            'max_violation', 'router_entropy', 'top1_prob', 'capacity')


def routing_statistics(model: nn.Module, params: Any,
                       batches: Sequence[Mapping[str, np.ndarray]],
                       pad_id: Optional[int] = None, num_shuffles: int = 8,
                       seed: int = 0) -> dict[str, dict[str, Any]]:
  """Load, drop, violation and specialisation of every MoE layer.

  Args:
    model: TransformerLM-like (see `capture.routing_outputs`).
    params: its param tree (or a full variables dict).
    batches: eval batches {'tokens': [B, L + 1], optionally 'domain' [B]}.
    pad_id: padding token id or None.
    num_shuffles: permutations for the chance level `nmi_shuffled`.
    seed: their seed.

  Returns:
    {layer: {'expert_load': list [E] (fraction of token-choices before
    capacity, mean over batches), 'top1_load': list [E] (fraction of valid
    tokens whose first choice is each expert), 'drop_fraction',
    'fully_dropped_fraction', 'max_violation', 'router_entropy',
    'top1_prob', 'capacity' (batch means), and when every example has a
    domain id: 'nmi', 'nmi_shuffled', 'mi', 'uncertainty', 'tokens'}};
    {} for a dense model.
  """
  experts, valid, auxes = capture_lib.routing_outputs(model, params, batches,
                                                   pad_id)
  domain = (capture_lib.domain_ids(batches)
            if capture_lib.has_domains(batches) else None)
  out = {}
  for layer, top1 in experts.items():
    stats = {}
    for key in AUX_KEYS:
      values = [np.asarray(a[layer][key], np.float64) for a in auxes
                if key in a.get(layer, {})]
      if values:
        mean = np.mean(values, axis=0)
        stats[key] = mean.tolist() if mean.ndim else float(mean)
    num_experts = len(stats.get('expert_load', [])) or int(top1.max()) + 1
    counts = np.bincount(top1[valid], minlength=num_experts)  # [E]
    stats['top1_load'] = (counts / max(counts.sum(), 1)).tolist()
    if domain is not None:
      stats.update(info_lib.score_layer(top1, domain, valid, num_shuffles,
                                        seed))
    out[layer] = stats
  return out


def mean_over_layers(stats: Mapping[str, Mapping[str, Any]],
                     key: str) -> float:
  """Mean of a scalar statistic over layers (NaN if no layer has it)."""
  values = [s[key] for s in stats.values() if key in s]
  return float(np.mean(values)) if values else float('nan')
