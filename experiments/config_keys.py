"""Small helpers shared by the config modules (no project imports)."""

from __future__ import annotations

from typing import Any

import ml_collections


def flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1} (dicts are recursed into, not leaves)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out.update(flatten(dict(value), f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def require(key: str, value: Any, ok: bool, allowed: str) -> None:
  """Raises ValueError naming `key`, `value` and the allowed values unless
  `ok`."""
  if not ok:
    raise ValueError(f'{key}={value!r} is not allowed; allowed values: '
                     f'{allowed}.')


def is_int(value: Any) -> bool:
  """An int that is not a bool."""
  return isinstance(value, int) and not isinstance(value, bool)
