"""Low-rank adapters (LoRA, Hu et al. 2021) on the FFN kernels: names,
options, and folding them back into the kernels.

Axis letters: E experts, D model width, F hidden width, r LoRA rank.

With `lora_rank` r > 0, each FFN kernel w of an adapted module (`wi`, or
the gated `wi_0`, `wi_1`, [E, D, F]; `wo` [E, F, D]; DenseFfn's 2-D kernels
drop the E axis) gets two params beside it:

    <w>_lora_a   [E, in, r]    fan-in truncated normal, like the kernel
    <w>_lora_b   [E, r, out]   zeros, so at init the FFN is the base one

and the FFN computes x . w + (lora_alpha / r) * (x . a) . b, as two thin
matmuls inside the same dispatch (`moejax.ffn_math.LoraKernel`; the expert-
parallel path shards a and b like their kernel). The scale alpha / r is the
LoRA paper's convention: for a fixed alpha the update's size barely depends
on r, so alpha need not be re-tuned when r changes. lora_rank=0 (default)
creates no adapter and leaves params and numerics exactly as without LoRA.

Which FFNs are adapted (`lora_targets`): MoeLayer allows 'experts' (the
routed expert bank, whatever the dispatcher or router) and 'shared' (the
shared-expert DenseFfn); TransformerLM adds 'dense' (the dense FFN blocks).

Example (fine-tune, then serve without adapters):

    model = TransformerLM(..., lora_rank=8, lora_targets=('experts',))
    # ... train only the adapters: moejax.train.finetune, lora_only ...
    merged = merge_lora(params, lora_alpha=model.lora_alpha)
    TransformerLM(..., lora_rank=0).apply({'params': merged}, tokens)
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

LORA_SUFFIXES = ('_lora_a', '_lora_b')
LAYER_TARGETS = ('experts', 'shared')  # MoeLayer.lora_targets
MODEL_TARGETS = ('experts', 'shared', 'dense')  # TransformerLM.lora_targets


def adapter_names(kernel: str) -> tuple[str, str]:
  """('wi_lora_a', 'wi_lora_b') for the kernel 'wi'."""
  return tuple(kernel + suffix for suffix in LORA_SUFFIXES)


def lora_scale(lora_rank: int, lora_alpha: float) -> float:
  """The adapter's scale lora_alpha / r (the LoRA paper's convention)."""
  return float(lora_alpha) / lora_rank


def check_lora_options(lora_rank, lora_alpha,
                       lora_targets: Optional[Sequence[str]] = None,
                       allowed: Sequence[str] = LAYER_TARGETS) -> None:
  """Raises ValueError naming the bad LoRA argument and the allowed values.

  Args:
    lora_rank: r, an int >= 0 (0 = no adapters).
    lora_alpha: a finite number > 0 (scale = lora_alpha / r).
    lora_targets: a tuple or list of names from `allowed`, or None to skip.
    allowed: the allowed targets (LAYER_TARGETS or MODEL_TARGETS).
  """
  if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or (
      lora_rank < 0):
    raise ValueError(f'lora_rank must be an int >= 0 (0 = no adapters), got '
                     f'{lora_rank!r}.')
  if isinstance(lora_alpha, bool) or not isinstance(
      lora_alpha, (int, float)) or not 0 < lora_alpha < math.inf:
    raise ValueError(f'lora_alpha must be a number > 0 (the adapters scale '
                     f'is lora_alpha / lora_rank), got {lora_alpha!r}.')
  if lora_targets is None:
    return
  names = ', '.join(map(repr, allowed))
  if isinstance(lora_targets, str) or not isinstance(lora_targets,
                                                     (tuple, list)):
    raise ValueError(f'lora_targets must be a tuple of names, got '
                     f'{lora_targets!r}; allowed values: {names}.')
  unknown = [t for t in lora_targets if t not in allowed]
  if unknown:
    raise ValueError(f'lora_targets={tuple(lora_targets)!r} holds unknown '
                     f'{unknown[0]!r}; allowed values: {names}.')


def is_lora_path(path_names: Sequence[str]) -> bool:
  """Whether a param path, e.g. ('block_1', 'ffn', 'experts', 'wo_lora_b'),
  names an adapter factor."""
  return bool(path_names) and str(path_names[-1]).endswith(LORA_SUFFIXES)


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def lora_mask(params: Any) -> Any:
  """A tree like `params` of bools: True on the adapter leaves (for optax
  masks that train only the adapters)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: is_lora_path(_names(path)), params)


def lora_param_count(params: Any) -> int:
  """Number of scalars in the adapter leaves of `params`."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return sum(int(np.prod(x.shape)) for path, x in leaves
             if is_lora_path(_names(path)))


def merged_kernel(w: jax.Array, a: jax.Array, b: jax.Array,
                  lora_alpha: float) -> jax.Array:
  """w + (lora_alpha / r) * a . b, in float32, cast back to w's dtype.

  Args:
    w: [E, in, out] (or [in, out]).
    a: [E, in, r] (or [in, r]).
    b: [E, r, out] (or [r, out]).
    lora_alpha: the model's lora_alpha.

  Returns:
    [E, in, out] (or [in, out]) in w's dtype.
  """
  r = a.shape[-1]
  if a.shape[:-1] != w.shape[:-1] or b.shape != (*w.shape[:-2], r,
                                                 w.shape[-1]):
    raise ValueError(f'adapter shapes a {a.shape}, b {b.shape} do not fit '
                     f'the kernel {w.shape}.')
  f32 = lambda t: jnp.asarray(t, jnp.float32)
  delta = jnp.matmul(f32(a), f32(b), precision=jax.lax.Precision.HIGHEST)
  return (f32(w) + lora_scale(r, lora_alpha) * delta).astype(w.dtype)


def merge_lora(params: Any, lora_alpha: float) -> Any:
  """Folds every adapter into its kernel and drops the adapter leaves.

  The result loads into the same model built with lora_rank=0 and gives
  its outputs (to float rounding in the kernels' dtype).

  Args:
    params: a (nested) mapping of params, e.g. `variables['params']`, with
      `<w>_lora_a` [.., in, r] and `<w>_lora_b` [.., r, out] beside each
      adapted kernel `<w>` [.., in, out].
    lora_alpha: the lora_alpha the model was built with.

  Returns:
    The same nesting (dicts; a FrozenDict stays one) without adapter
    leaves; each adapted kernel is merged_kernel(w, a, b, lora_alpha).

  Raises:
    ValueError naming the path of an adapter without its kernel or its
    other factor.
  """
  check_lora_options(1, lora_alpha)
  return _merge(params, lora_alpha, ())


def _merge(tree: Any, lora_alpha: float, path: tuple) -> Any:
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  for name, value in tree.items():
    if is_lora_path((name,)):
      kernel = name[:-len(LORA_SUFFIXES[0])]
      missing = [n for n in (kernel,) + adapter_names(kernel) if n not in tree]
      if missing:
        raise ValueError(f'{"/".join(path + (name,))} has no '
                         f'{missing[0]!r} beside it; merge_lora needs the '
                         'kernel and both factors.')
      continue
    a_name, b_name = adapter_names(name)
    if a_name in tree:
      out[name] = merged_kernel(value, tree[a_name], tree[b_name], lora_alpha)
    else:
      out[name] = _merge(value, lora_alpha, path + (name,))
  return FrozenDict(out) if isinstance(tree, FrozenDict) else out
