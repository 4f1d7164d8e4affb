"""Sparse upcycling: an MoE's step-0 params from a trained dense model.

Axis letters: E experts, D model width, F FFN hidden width.

Komatsuzaki et al. 2022 ("Sparse Upcycling") start an MoE from a dense
checkpoint: every expert of an MoE block is a copy of that block's dense
FFN, the router is new, and everything else (embeddings, attention, norms,
dense blocks) is copied. Nakamura et al. 2025 ("Drop-Upcycling") then
re-initialise a random fraction of each expert's hidden units, different
per expert, to break the experts' symmetry.

Param paths (moejax.models.transformer): a dense block's FFN is
`block_i/ffn/{wi | wi_0, wi_1, wo}` ([D, F], [F, D]); the MoE block's is
`block_i/ffn/experts/<same names>` ([E, D, F], [E, F, D]) plus
`block_i/ffn/router/kernel` [D, E]. `upcycle_params` fills the target tree:

    same path, same shape in the source       -> copied
    block_i/ffn/experts/w  <- block_i/ffn/w    -> E copies (+ noise / drop)
    block_i/ffn/router/*                       -> the target's fresh init,
                                                  or zeros (uniform routing)

and refuses (UpcycleError, naming the param) a target param that has no
source, a source param left unused, or a shape that does not fit. Model
state (e.g. a loss-free balancing bias) comes from the target's init.

Function preservation: with zero-noise copies, each token's output is
sum_k g_k FFN(x) = FFN(x) exactly when the gates sum to one
(`renormalize=True`) and no choice is dropped (dropless, or capacity to
spare); the step-0 MoE then computes the dense model's function.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from moejax.train.finetune import path_name

ROUTER_INITS = ('fresh', 'zero')
# Hidden-unit axis of each FFN kernel of an expert bank: wi* [E, D, F] -> 2,
# wo [E, F, D] -> 1.
_HIDDEN_AXIS = {'wi': 2, 'wi_0': 2, 'wi_1': 2, 'wo': 1}


class UpcycleError(ValueError):
  """A dense source that does not fit the MoE target (names the param)."""


def _flat(tree: Any) -> dict:
  return {path_name(p): x for p, x in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def _source_of(name: str) -> tuple[str, bool]:
  """(source path, is an expert bank leaf) of a target param path."""
  head, sep, leaf = name.rpartition('/experts/')
  if sep and leaf in _HIDDEN_AXIS:
    return f'{head}/{leaf}', True
  return name, False


def _is_router(name: str) -> bool:
  return 'router' in name.split('/')


def upcycle_plan(source: Mapping[str, Any], target: Mapping[str, Any]
                 ) -> dict[str, tuple[str, str]]:
  """How each target param is filled: {target path: (kind, source path)}.

  kind is 'copy', 'experts' (E copies of the source) or 'router'.

  Args:
    source: the dense params (arrays or ShapeDtypeStructs, nested dicts).
    target: the MoE params, likewise.

  Raises:
    UpcycleError naming the first param that does not fit.
  """
  src, tgt = _flat(source), _flat(target)
  plan, used = {}, set()
  for name, leaf in tgt.items():
    if _is_router(name):
      plan[name] = ('router', '')
      continue
    origin, bank = _source_of(name)
    if origin not in src:
      raise UpcycleError(
          f'the MoE param {name} {tuple(leaf.shape)} has no counterpart '
          f'{origin} in the dense source (upcycling copies the source and '
          'fills routers and expert banks only)')
    want = tuple(leaf.shape[1:]) if bank else tuple(leaf.shape)
    if tuple(src[origin].shape) != want:
      raise UpcycleError(
          f'the source param {origin} has shape '
          f'{tuple(src[origin].shape)}, the MoE param {name} needs {want}'
          + (' per expert' if bank else ''))
    plan[name] = ('experts' if bank else 'copy', origin)
    used.add(origin)
  unused = sorted(set(src) - used)
  if unused:
    raise UpcycleError(f'the source param {unused[0]} has no place in the '
                       f'MoE model ({len(unused)} unused source params)')
  return plan


def _expert_copies(w: np.ndarray, e: int, name: str, noise: float,
                   drop_ratio: float, seeds: tuple) -> np.ndarray:
  """[E, ...] copies of a dense kernel w, each perturbed independently.

  noise: Gaussian noise of std noise * std(w) added to every entry.
  drop_ratio: per expert, round(drop_ratio * F) hidden units re-drawn from
    N(mean(w), std(w)). The units of expert e depend only on
    (seed, layer, e), so wi, wi_0, wi_1 (columns) and wo (rows) of one
    expert re-draw the same hidden units, as in Drop-Upcycling.
  seeds: (seed, layer number, leaf number) of the draws.
  """
  seed, layer, leaf = seeds
  w32 = np.asarray(w, np.float32)
  out = np.broadcast_to(w32, (e,) + w32.shape).copy()
  mean, std = float(w32.mean()), float(w32.std())
  hidden = _HIDDEN_AXIS[name.rsplit('/', 1)[-1]] - 1  # axis in w
  values = np.random.default_rng([seed, layer, leaf])
  for i in range(e):
    if noise > 0:
      out[i] += values.normal(0.0, noise * std, w32.shape).astype(np.float32)
    if drop_ratio > 0:
      f = w32.shape[hidden]
      units = np.random.default_rng([seed, layer, 1 << 20, i]).permutation(
          f)[:int(round(drop_ratio * f))]
      block = np.moveaxis(out[i], hidden, 0)  # a view: writes go to out
      block[units] = values.normal(mean, std, block[units].shape)
  return out


def upcycle_params(source: Mapping[str, Any], target_init: Mapping[str, Any],
                   *, router: str = 'fresh', noise: float = 0.0,
                   drop_ratio: float = 0.0, seed: int = 0) -> Any:
  """The upcycled MoE params.

  Args:
    source: the trained dense model's params.
    target_init: the MoE model's freshly initialised params (their routers
      are kept for router='fresh'; the other leaves are replaced).
    router: 'fresh' (the target's init) | 'zero' (uniform routing at
      step 0; ties then go to the lowest expert ids).
    noise: relative std of Gaussian noise on each expert copy (>= 0).
    drop_ratio: Drop-Upcycling's re-initialised fraction of each expert's
      hidden units, in [0, 1].
    seed: seed of the noise and of the re-initialised units; layer l's
      expert e draws from its own stream.

  Returns:
    A tree like `target_init` (numpy arrays, the target's dtypes).

  Raises:
    UpcycleError: see `upcycle_plan`; ValueError for bad options.
  """
  if router not in ROUTER_INITS:
    raise ValueError(f'router={router!r}; allowed values: '
                     f'{", ".join(map(repr, ROUTER_INITS))}.')
  if not noise >= 0 or not 0 <= drop_ratio <= 1:
    raise ValueError(f'noise={noise!r} must be >= 0 and drop_ratio='
                     f'{drop_ratio!r} in [0, 1].')
  plan = upcycle_plan(source, target_init)
  src = _flat(source)
  layers = sorted({origin.rpartition('/')[0] for kind, origin in
                   plan.values() if kind == 'experts'})

  def fill(path, leaf):
    name = path_name(path)
    kind, origin = plan[name]
    dtype = np.asarray(leaf).dtype
    if kind == 'router':
      return (np.zeros(leaf.shape, dtype) if router == 'zero'
              else np.asarray(leaf))
    if kind == 'copy':
      return np.asarray(src[origin]).astype(dtype)
    layer = layers.index(origin.rpartition('/')[0])
    return _expert_copies(np.asarray(src[origin]), leaf.shape[0], name,
                          noise, drop_ratio,
                          (seed, layer, sorted(plan).index(name))
                          ).astype(dtype)

  return jax.tree_util.tree_map_with_path(fill, target_init)
