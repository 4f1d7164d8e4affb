"""Soft MoE's per-layer metrics (moejax/soft_moe.py `soft_metrics`) on a hand
case: `router_entropy` and `top1_prob` describe a token's combine weights
over the E*C slots, averaged over the valid tokens; nothing drops.

Axis letters as in moejax/soft_moe.py: G groups, S tokens, D width,
E experts, C slots per expert.
"""

import math

import jax.numpy as jnp
import numpy as np

import moejax


def test_soft_moe_metrics_hand_case():
  # G=1, S=3 (token 2 is padding), D=2, E=2, C=2: 4 slots, flattened
  # (e, c) = (0,0), (0,1), (1,0), (1,1). logits[s] = x[s] . phi.
  #   token 0, x = [0, 0]: logits [0, 0, 0, 0] -> combine [1/4] * 4:
  #     entropy ln 4 = 1.386294, top-1 1/4; logsumexp ln 4.
  #   token 1, x = [1, 0]: logits phi[0] = [ln 3, 0, 0, 0] -> combine
  #     [3, 1, 1, 1] / 6 = [1/2, 1/6, 1/6, 1/6]: entropy
  #     1/2 ln 2 + 3 * 1/6 ln 6 = 1/2 ln 12 = 1.242453, top-1 1/2;
  #     logsumexp ln 6.
  #   token 2, x = [0, 1] (padding): logits phi[1] = [5, -5, 0, 0]; its
  #     combine (top-1 ~0.99) must not count.
  # router_entropy = (1.386294 + 1.242453) / 2 = 1.314374 (over the E=2
  # experts instead, [1/2, 1/2] and [2/3, 1/3], it would be 0.664831; with
  # the padding token counted at zero weight, 2.628747 / 3 = 0.876249);
  # top1_prob = (1/4 + 1/2) / 2 = 0.375;
  # z_loss = ((ln 4)^2 + (ln 6)^2) / 2 = (1.921812 + 3.210402) / 2 = 2.566107.
  x = jnp.array([[[0., 0.], [1., 0.], [0., 1.]]])  # [G=1, S=3, D=2]
  padding = jnp.array([[False, False, True]])
  phi = jnp.array([[[math.log(3.), 0.], [0., 0.]],
                   [[5., -5.], [0., 0.]]])  # [D, E, C]
  params = {'router': {'kernel': phi},
            'experts': {'wi': jnp.ones((2, 2, 4)), 'wo': jnp.ones((2, 4, 2))}}
  layer = moejax.MoeLayer(num_experts=2, d_ff=4, router='soft_moe',
                          slots_per_expert=2)
  y, aux = layer.apply({'params': params}, x, padding)
  assert abs((math.log(4) + 0.5 * math.log(12)) / 2 - 1.314374) < 1e-6
  np.testing.assert_allclose(aux['router_entropy'], 1.314374, rtol=1e-6)
  np.testing.assert_allclose(aux['top1_prob'], 0.375, rtol=1e-6)
  np.testing.assert_allclose(aux['z_loss'], 2.566107, rtol=1e-6)
  # Every expert gets C slots of unit total weight: uniform load, no drops.
  np.testing.assert_allclose(aux['expert_load'], [0.5, 0.5])
  for name in ('max_violation', 'drop_fraction', 'fully_dropped_fraction',
               'aux_loss'):
    assert float(aux[name]) == 0.0, name
  assert float(aux['capacity']) == 2
  np.testing.assert_array_equal(y[0, 2], 0.0)  # padding: zero output
