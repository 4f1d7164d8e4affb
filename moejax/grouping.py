"""Routing groups: how a batch's tokens are laid out into groups of S.

Axis letters: B batch (sequences), L sequence length, D model width,
G groups, S tokens per group, k = S / L sequences per group.

A group's size is given in tokens (`group_size` = S) or in whole sequences
(`group_sequences` = k, so S = k * L for rows of L tokens, whatever L is;
k = -1, `WHOLE_BATCH`: one group of all the B rows the layer is called on:
the MoE layer of a Mixture-of-Depths block, whose rows hold only the Lc
selected tokens, gets groups of k * Lc; `group_tokens`). In such a block
the j-th token of a row is the j-th selected one, so 'position' order
there is by rank among the selected tokens, not by position (the block's
top-k selection in training is non-causal already: moejax.models.mod).

Capacity is per group, so which tokens share a group, and in what order
they claim slots, is part of the routing semantics.

    group_order='sequence'  (default) the tokens of the batch in memory
        order, cut every S: [B, L, D] -> [B*L/S, S, D]. With S = L (the
        default `group_size=None`) a group is one sequence; with S < L a
        group is a chunk of one; with S > L a group is k = S/L whole
        sequences, one after the other.
    group_order='position'  k = S/L whole sequences per group, ordered
        position-major: position 0 of the k sequences, then position 1, ...
        [B, L, D] -> [B/k, k, L, D] -> [B/k, L, k, D] -> [B/k, S, D]. This is
        the Switch / GShard setting (groups of many documents) made causal.

What a token's routing can see (with a causal-safe priority, 'token', or
'choice' with K = 1: slots are claimed in group order): a token's slot
depends on the tokens before it in its group. In 'sequence' order with
groups spanning sequences (S > L, or S not dividing L), the first token of
a sequence comes after every token of the previous sequence, later
positions included: a token's routing depends on later tokens of another
sequence. In 'position' order it depends only on tokens at earlier
positions (any sequence of the group) and on the same position of the
sequences before it in the group: never on a later position. A causal model
therefore refuses 'sequence' order across sequences (`causal_group_leak`)
unless non-causal routing is allowed. Both orders assume the sequences of
a batch are independent: if sequence b + 1 continued sequence b (packed
chunks of one document), any cross-sequence group would let a token see
its own document's future.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

GROUP_ORDERS = ('sequence', 'position')
# group_sequences = WHOLE_BATCH: one group holds every sequence of the batch
# the layer is called on (k = B), Switch / GShard's group of a whole batch.
WHOLE_BATCH = -1


def check_group_order(order: str) -> None:
  """ValueError naming group_order unless it is one of GROUP_ORDERS."""
  if order not in GROUP_ORDERS:
    raise ValueError(f'group_order={order!r} is not supported; allowed '
                     f'values: {", ".join(repr(o) for o in GROUP_ORDERS)}.')


def group_tokens(group_size: Optional[int], group_sequences: Optional[int],
                 seq_len: int, batch: Optional[int] = None) -> Optional[int]:
  """S for rows of L = seq_len tokens, or None for one group per sequence.

  Args:
    group_size: S in tokens, or None.
    group_sequences: k whole sequences per group (S = k * L), WHOLE_BATCH
      (-1: k = B, one group of the whole batch), or None.
    seq_len: L, the length of the rows the layer sees.
    batch: B, the rows the layer sees; needed only for WHOLE_BATCH.

  Raises:
    ValueError naming both when both are set (one size, two ways), or
    WHOLE_BATCH without a batch size.
  """
  if group_sequences is None:
    return group_size
  if group_size is not None:
    also = (' (-1 is the default of configs/switch.py and configs/gshard.py'
            ': give group_sequences=None with a group_size)'
            if group_sequences == WHOLE_BATCH else '')
    raise ValueError(
        f'group_size={group_size} and group_sequences={group_sequences} '
        'both set the size of a routing group; allowed: one of them (the '
        f'other None){also}.')
  return sequences_per_group(group_sequences, batch) * seq_len


def sequences_per_group(group_sequences: int, batch: Optional[int]) -> int:
  """k: `group_sequences`, or B for WHOLE_BATCH (-1).

  Raises:
    ValueError for WHOLE_BATCH when the batch size B is not known.
  """
  if group_sequences != WHOLE_BATCH:
    return group_sequences
  if batch is None:
    raise ValueError('group_sequences=-1 (one group of the whole batch) '
                     'needs the batch size B; pass batch=B.')
  return batch


def group_tokens_size(group_size: Optional[int], seq_len: int) -> int:
  """S: `group_size`, or L when it is None (one group per sequence)."""
  return group_size or seq_len


def check_layout(group_size: Optional[int], order: str, seq_len: int) -> None:
  """'position' order needs groups of whole sequences: S a multiple of L.

  Raises:
    ValueError naming group_size and the allowed values.
  """
  check_group_order(order)
  s = group_tokens_size(group_size, seq_len)
  if order == 'position' and s % seq_len:
    raise ValueError(
        f"group_order='position' groups whole sequences, so group_size={s} "
        f'must be a multiple of the sequence length {seq_len}; allowed '
        f'values: None or k * {seq_len}.')


def causal_group_leak(group_size: Optional[int], order: str,
                      seq_len: int) -> Optional[str]:
  """What lets a token's routing see later positions through its group.

  Returns:
    None when the layout is causal-safe ('position' order; 'sequence' order
    with S dividing L), else a description for an error message.

  Example: L = 4, S = 8, 'sequence' order: the group holds sequence 0 then
  sequence 1, so sequence 1's first token claims its slot after sequence
  0's last (position 3) token.
  """
  check_layout(group_size, order, seq_len)
  s = group_tokens_size(group_size, seq_len)
  if order == 'sequence' and seq_len % s:
    return (f"group_size={s} with group_order='sequence' (sequence length "
            f'{seq_len}) puts a sequence\'s first tokens after later '
            'positions of the sequence before it in the group')
  return None


def _padding(b: int, l: int, s: int, order: str, pad_to_group: bool) -> int:
  """Rows of padding that fill the last group: tokens ('sequence') or whole
  sequences ('position'); ValueError if needed and not allowed."""
  if order == 'sequence':
    pad = -(b * l) % s
    if pad and not pad_to_group:
      raise ValueError(
          f'group_size={s} does not divide the {b * l} tokens of a [{b}, '
          f'{l}] batch; choose a divisor of {b * l} or set '
          'pad_to_group=True.')
    return pad
  k = s // l
  pad = -b % k
  if pad and not pad_to_group:
    raise ValueError(
        f"group_size={s} with group_order='position' groups {k} whole "
        f'sequences, which does not divide the {b} sequences of a [{b}, '
        f'{l}] batch; choose a group_size of k * {l} with k dividing {b}, '
        'or set pad_to_group=True.')
  return pad


def to_groups(x: jax.Array, valid: jax.Array, group_size: Optional[int],
              order: str = 'sequence', pad_to_group: bool = False):
  """[B, L, ...] tokens and [B, L] valid -> [G, S, ...] and [G, S].

  Padding added to fill the last group (with `pad_to_group`) is invalid.

  Args:
    x: [B, L, ...] per-token values.
    valid: [B, L] bool, False for padding tokens.
    group_size: S, or None for one group per sequence.
    order: 'sequence' | 'position' (module docstring).
    pad_to_group: pad the batch to whole groups instead of raising.

  Returns:
    ([G, S, ...], [G, S] bool).
  """
  b, l = valid.shape
  check_layout(group_size, order, l)
  s = group_tokens_size(group_size, l)
  pad = _padding(b, l, s, order, pad_to_group)
  rest = x.shape[2:]
  if order == 'position':
    k = s // l
    x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    valid = jnp.pad(valid, ((0, pad), (0, 0)))  # padded: invalid
    x = x.reshape((-1, k, l) + rest).swapaxes(1, 2)  # [G, L, k, ...]
    valid = valid.reshape(-1, k, l).swapaxes(1, 2)
    return x.reshape((-1, s) + rest), valid.reshape(-1, s)
  x = x.reshape((b * l,) + rest)
  x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
  valid = jnp.pad(valid.reshape(b * l), (0, pad))
  return x.reshape((-1, s) + rest), valid.reshape(-1, s)


def from_groups(a: jax.Array, b: int, l: int, group_size: Optional[int],
                order: str = 'sequence') -> jax.Array:
  """Inverse of `to_groups`: [G, S, ...] -> [B, L, ...] (padding cut)."""
  check_layout(group_size, order, l)
  s = group_tokens_size(group_size, l)
  rest = a.shape[2:]
  if order == 'position':
    k = s // l
    a = a.reshape((-1, l, k) + rest).swapaxes(1, 2)  # [G, k, L, ...]
    return a.reshape((-1, l) + rest)[:b]
  return a.reshape((-1,) + rest)[:b * l].reshape((b, l) + rest)
