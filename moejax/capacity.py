"""Expert capacity: the one place where `C` is computed.

Axis letters: S tokens per group, E experts, K experts chosen per token,
C capacity (slots per expert per group).

    C = max(min_capacity, ceil(cf * S * K / E)), rounded up to `multiple_of`.

The capacity scales with K (GShard / vmoe / maxtext convention): a capacity
factor of 1.0 means exactly enough slots for a perfectly balanced router.
flaxformer does *not* multiply by K; its `cf` equals ours times K.

`cf=None` means dropless: every expert gets `S` slots, which is the most a
group can ever send to one expert (a token picks an expert at most once).
The same bound caps every finite capacity, so `C` never exceeds `S` (rounded
up to `multiple_of`); the cap changes buffer sizes, never which tokens drop.
"""

from __future__ import annotations

import math
from typing import Optional


def _round_up(value: int, multiple_of: int) -> int:
  return -(-value // multiple_of) * multiple_of


def compute_capacity(
    tokens_per_group: int,
    num_experts: int,
    top_k: int,
    capacity_factor: Optional[float],
    min_capacity: int = 4,
    multiple_of: int = 1,
) -> int:
  """Slots per expert per group.

  Args:
    tokens_per_group: S.
    num_experts: E.
    top_k: K, experts chosen per token.
    capacity_factor: cf > 0, or None for dropless (C = S).
    min_capacity: lower bound on C (flaxformer's `min_expert_capacity`, 4).
    multiple_of: round C up to a multiple of this (e.g. 4 or 8 for TPU tiles).

  Returns:
    C, an int with 1 <= C <= round_up(S, multiple_of).

  Example: S=8, E=4, K=2, cf=1.25 -> ceil(1.25*8*2/4) = 5; min_capacity=4
  leaves 5; multiple_of=4 gives 8.
  """
  for name, value in (('tokens_per_group', tokens_per_group),
                      ('num_experts', num_experts), ('top_k', top_k),
                      ('multiple_of', multiple_of)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f'{name} must be an int >= 1, got {value!r}.')
  if not isinstance(min_capacity, int) or min_capacity < 0:
    raise ValueError(f'min_capacity must be an int >= 0, got {min_capacity!r}.')
  if top_k > num_experts:
    raise ValueError(f'top_k={top_k} must be <= num_experts={num_experts}.')
  upper = _round_up(tokens_per_group, multiple_of)
  if capacity_factor is None:
    return upper
  if isinstance(capacity_factor, bool) or not isinstance(
      capacity_factor, (int, float)) or not capacity_factor > 0:
    raise ValueError('capacity_factor must be a number > 0 or None '
                     f'(dropless), got {capacity_factor!r}.')
  # round(.., 9) keeps float noise (0.1 * 30 = 3.0000000000000004) from
  # adding a slot.
  raw = math.ceil(round(capacity_factor * tokens_per_group * top_k /
                        num_experts, 9))
  capacity = _round_up(max(min_capacity, raw, 1), multiple_of)
  return min(capacity, upper)
