"""Mixture-of-Depths (Raposo et al. 2024): blocks that process only some of
a sequence's tokens.

Axis letters: B batch, L sequence length, D model width, Lc = ceil(c * L)
tokens a Mixture-of-Depths (MoD) block processes per sequence (capacity
fraction c), M the KV cache length.

An MoD block (`ModBlock`) is the model's `Block` (attention + dense or MoE
FFN) behind a per-token router:

    r = x . w_r                          [B, L] float32, one score per token
    top-k: the Lc tokens of highest r (padding never before a real token),
           kept in sequence order       idx [B, Lc]
    x_sel = x[idx]                       [B, L, D] -> [B, Lc, D]
    a, y = block updates of x_sel        attention among the selected tokens
                                         only, causal in their order, RoPE at
                                         their original positions
    x[idx] += r[idx] * (a + y)           the router weight multiplies the
                                         update (so the router gets a
                                         gradient); every other token skips
                                         the block: its output is its input.

Top-k over the sequence is not causal (a token's selection depends on later
tokens' scores). For generation a causal decision replaces it: a predictor
p [B, L] (logits) of "is this token in the top-k", trained with binary
cross-entropy against the top-k choice:
  'mlp'     the paper's auxiliary MLP on stop_gradient(x) (D -> hidden ->
            1); its loss trains the MLP only.
  'router'  the router's own r (the paper's alternative): the BCE loss
            also trains the router.
A token is selected at decode time iff p > 0. `decisions='predictor'` runs
the full-sequence forward pass on the same decisions (every token goes
through the block with a key mask; the skipped tokens' results are thrown
away), and `decode=True` always does: token-by-token decoding through the KV
cache gives the logits of that forward pass. A skipped token's K/V in the
block's cache is masked out (collection 'cache', `selected` [B, M]), so the
selected tokens attend to earlier selected tokens only.

Param tree added to an MoD block `block_{i}` (float32 always):

    mod_router/kernel              [D, 1]
    mod_predictor/hidden/kernel    [D, hidden]   (predictor='mlp')
    mod_predictor/hidden/bias      [hidden]
    mod_predictor/out/kernel       [hidden, 1]
    mod_predictor/out/bias         [1]

Per-block metrics (`ModBlock` aux): 'bce' (predictor loss), 'accuracy'
(predictor decision == top-k choice), 'fraction' (tokens processed / real
tokens), means over the real (non-padding) tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from moejax.models.transformer import Block

PREDICTORS = ('mlp', 'router')
DECISIONS = ('topk', 'predictor')
# Model aux entries averaged over the MoD blocks.
MOD_METRICS = ('bce', 'accuracy', 'fraction')


@dataclasses.dataclass(frozen=True)
class ModOptions:
  """Which blocks are MoD blocks and how they route (hashable).

  Attributes:
    every: block i is an MoD block iff (i + 1) % every == 0 (2: every
      other block, as in the paper: 1, 3, 5, ...).
    capacity: c in (0, 1]: each MoD block processes ceil(c * L) tokens of
      every sequence (0.125: the paper's best setting).
    predictor: 'mlp' (auxiliary MLP, stop-gradient input) | 'router'
      (BCE on the router's own score).
    predictor_hidden: the MLP's hidden width.
    aux_weight: weight of the mean predictor BCE in the training loss.
    decisions: 'topk' (training; non-causal) | 'predictor' (causal: what
      decoding does) for the full-sequence forward pass.
  """
  every: int = 2
  capacity: float = 0.125
  predictor: str = 'mlp'
  predictor_hidden: int = 64
  aux_weight: float = 0.01
  decisions: str = 'topk'

  def validate(self) -> None:
    """Raises ValueError naming the bad option and the allowed values."""
    for name in ('every', 'predictor_hidden'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'mod {name}={value!r} is not allowed; allowed '
                         'values: an int >= 1.')
    if (isinstance(self.capacity, bool) or
        not isinstance(self.capacity, (int, float)) or
        not 0 < self.capacity <= 1):
      raise ValueError(f'mod capacity={self.capacity!r} is not allowed; '
                       'allowed values: a number in (0, 1].')
    if self.predictor not in PREDICTORS:
      raise ValueError(f'mod predictor={self.predictor!r} is not allowed; '
                       f'allowed values: {", ".join(map(repr, PREDICTORS))}.')
    if self.decisions not in DECISIONS:
      raise ValueError(f'mod decisions={self.decisions!r} is not allowed; '
                       f'allowed values: {", ".join(map(repr, DECISIONS))}.')
    if not (isinstance(self.aux_weight, (int, float)) and
            not isinstance(self.aux_weight, bool) and self.aux_weight >= 0):
      raise ValueError(f'mod aux_weight={self.aux_weight!r} is not allowed; '
                       'allowed values: a number >= 0.')

  def layers(self, num_layers: int) -> tuple[int, ...]:
    """Indices of the MoD blocks among `num_layers`."""
    return tuple(i for i in range(num_layers) if (i + 1) % self.every == 0)


def freeze_mod(mod: Optional[Any]) -> Optional[ModOptions]:
  """A validated ModOptions from a mapping / ModOptions, or None (off).

  Args:
    mod: None, a ModOptions, or a mapping of its fields.

  Returns:
    The ModOptions, or None.
  """
  if mod is None or isinstance(mod, ModOptions):
    options = mod
  elif isinstance(mod, Mapping):
    names = [f.name for f in dataclasses.fields(ModOptions)]
    unknown = sorted(set(mod) - set(names))
    if unknown:
      raise ValueError(f'mod holds unknown keys {unknown}; allowed keys: '
                       f'{", ".join(names)}.')
    options = ModOptions(**mod)
  else:
    raise ValueError(f'mod must be None, a ModOptions or a mapping, got '
                     f'{mod!r}.')
  if options is not None:
    options.validate()
  return options


def capacity_tokens(capacity: float, length: int) -> int:
  """Lc = ceil(c * L), at least 1 and at most L (c * L rounded to 9
  decimals first, so 0.3 * 10 gives 3, not 4)."""
  return min(length, max(1, math.ceil(round(capacity * length, 9))))


def topk_selection(scores: jax.Array, k: int,
                   padding_mask: Optional[jax.Array] = None) -> jax.Array:
  """The k highest-scoring positions of each sequence, in sequence order.

  Args:
    scores: [B, L] float32.
    k: tokens to take per sequence (<= L).
    padding_mask: optional [B, L] bool, True = padding (taken only after
      every real token).

  Returns:
    idx [B, k] int32, increasing along k.
  """
  if padding_mask is not None:
    scores = jnp.where(padding_mask, -jnp.inf, scores)
  _, idx = jax.lax.top_k(scores, k)
  return jnp.sort(idx, axis=-1).astype(jnp.int32)


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, L, ...] -> x at idx [B, Lc] -> [B, Lc, ...]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (
      x.ndim - 2)), axis=1)


def scatter_add(x: jax.Array, idx: jax.Array, update: jax.Array) -> jax.Array:
  """x [B, L, D] with update [B, Lc, D] added at idx [B, Lc]; every other
  position unchanged (bit for bit)."""
  rows = jnp.arange(x.shape[0])[:, None]
  return x.at[rows, idx].add(update)


def selection_mask(idx: jax.Array, length: int) -> jax.Array:
  """idx [B, Lc] -> [B, L] bool, True at the selected positions."""
  rows = jnp.arange(idx.shape[0])[:, None]
  return jnp.zeros((idx.shape[0], length), bool).at[rows, idx].set(True)


def predictor_metrics(logits: jax.Array, targets: jax.Array,
                      valid: Optional[jax.Array] = None
                      ) -> dict[str, jax.Array]:
  """The predictor's BCE loss and accuracy against the top-k choice.

  Args:
    logits: [B, L] float32 predictor logits (selected iff > 0).
    targets: [B, L] bool, the top-k choice.
    valid: optional [B, L] bool, the tokens to count (default all).

  Returns:
    {'bce': mean sigmoid cross-entropy, 'accuracy': mean of
    (logits > 0) == targets}, float32 scalars over the valid tokens.
  """
  weights = (jnp.ones(logits.shape, jnp.float32) if valid is None
             else valid.astype(jnp.float32))
  count = jnp.maximum(jnp.sum(weights), 1.0)
  bce = optax.sigmoid_binary_cross_entropy(
      logits.astype(jnp.float32), targets.astype(jnp.float32))
  correct = ((logits > 0) == targets).astype(jnp.float32)
  return {'bce': jnp.sum(bce * weights) / count,
          'accuracy': jnp.sum(correct * weights) / count}


def _block_update(x: jax.Array, x_attn: jax.Array, y: jax.Array
                  ) -> jax.Array:
  """f(x) = a + y, float32 [B, L, D], from `Block.updates`' x + a and y."""
  return (x_attn.astype(jnp.float32) - x.astype(jnp.float32) +
          y.astype(jnp.float32))


class ModPredictor(nn.Module):
  """The auxiliary MLP: x [B, L, D] -> logits [B, L] (float32).

  Attributes:
    hidden: hidden width.
  """
  hidden: int = 64

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Predicts top-k membership from stop_gradient(x)."""
    h = jax.lax.stop_gradient(x.astype(jnp.float32))
    h = nn.relu(nn.Dense(self.hidden, dtype=jnp.float32,
                         param_dtype=jnp.float32, name='hidden')(h))
    return nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32,
                    name='out')(h)[..., 0]


class ModBlock(Block):
  """A Mixture-of-Depths block: `Block` behind a per-token router.

  Attributes (besides Block's):
    mod: the ModOptions (capacity, predictor, decisions).
  """
  mod: ModOptions = ModOptions()

  def _scores(self, x: jax.Array):
    """Router scores r [B, L] and predictor logits p [B, L] (float32)."""
    xf = x.astype(jnp.float32)
    r = nn.Dense(1, use_bias=False, dtype=jnp.float32,
                 param_dtype=jnp.float32, name='mod_router')(xf)[..., 0]
    if self.mod.predictor == 'router':
      return r, r
    return r, ModPredictor(self.mod.predictor_hidden, name='mod_predictor')(
        xf)

  @nn.compact
  def __call__(self, x: jax.Array, padding_mask: Optional[jax.Array] = None,
               deterministic: bool = True, decode: bool = False):
    """Applies the MoD block.

    Args:
      x: [B, L, D] residual stream.
      padding_mask: optional [B, L] bool, True = padding (never selected
        before a real token, never a key, never updated).
      deterministic: eval mode (passed to an MoE FFN).
      decode: decode through the KV cache (predictor decisions).

    Returns:
      x [B, L, D], the MoeLayer aux dict (None for a dense FFN), and the
      MoD aux dict {'bce', 'accuracy', 'fraction'} (float32 scalars).
    """
    length = x.shape[1]
    r, p = self._scores(x)
    real = (jnp.ones(r.shape, bool) if padding_mask is None
            else ~padding_mask.astype(bool))
    idx = topk_selection(jax.lax.stop_gradient(r),
                         capacity_tokens(self.mod.capacity, length),
                         padding_mask)
    targets = selection_mask(idx, length) & real
    if decode or self.mod.decisions == 'predictor':
      selected = (p > 0) & real
      x, aux = self._apply_masked(x, r, selected, deterministic, decode)
    else:
      selected = targets
      x, aux = self._apply_topk(x, r, idx, padding_mask, deterministic)
    mod_aux = predictor_metrics(p, targets, real)
    mod_aux['fraction'] = (jnp.sum(selected.astype(jnp.float32)) /
                           jnp.maximum(jnp.sum(real.astype(jnp.float32)), 1.))
    return x, aux, mod_aux

  def _apply_topk(self, x, r, idx, padding_mask, deterministic):
    """The training path: the block on the gathered [B, Lc, D] tokens."""
    x_sel = gather_tokens(x, idx)  # [B, Lc, D]
    pad_sel = (None if padding_mask is None
               else gather_tokens(padding_mask.astype(bool), idx))
    x_attn, y, aux = self.updates(x_sel, pad_sel, deterministic, False,
                                  positions=idx)
    weight = gather_tokens(r, idx)[..., None]  # [B, Lc, 1]
    update = weight * _block_update(x_sel, x_attn, y)
    if pad_sel is not None:  # a padding token taken for lack of real ones
      update = jnp.where(pad_sel[..., None], 0.0, update)
    return scatter_add(x, idx, update.astype(x.dtype)), aux

  def _apply_masked(self, x, r, selected, deterministic, decode):
    """The causal path: every token through the block, only the selected
    ones as keys and updated; with `decode`, through the KV cache."""
    skip = ~selected  # [B, L]
    if decode:
      key_mask = self._cache_selected(selected)
      x_attn, y, aux = self.updates(x, None, deterministic, True,
                                    key_mask=key_mask, route_mask=skip)
    else:
      x_attn, y, aux = self.updates(x, skip, deterministic, False)
    update = r[..., None] * _block_update(x, x_attn, y)
    return jnp.where(selected[..., None], x + update.astype(x.dtype), x), aux

  def _cache_selected(self, selected: jax.Array) -> jax.Array:
    """Records this call's decisions [B, L] in the cache; returns the
    selected mask of every cached position [B, M] (the keys allowed)."""
    initialized = self.has_variable('cache', 'selected')
    cached = self.variable('cache', 'selected', jnp.zeros, selected.shape,
                           bool)
    index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
    if not initialized:  # model.init: only creates the cache
      return selected
    cached.value = jax.lax.dynamic_update_slice(cached.value, selected,
                                                (0, index.value))
    index.value = index.value + selected.shape[1]
    return cached.value


def summarize_mod_aux(mod_aux: Mapping[str, Mapping[str, jax.Array]],
                      aux_weight: float) -> dict:
  """The model-level MoD aux entries.

  Args:
    mod_aux: {block_name: ModBlock aux dict}, non-empty.
    aux_weight: the predictor loss weight.

  Returns:
    {'mod_layers': dict(mod_aux), 'mod_bce', 'mod_accuracy',
    'mod_fraction' (means over the MoD blocks), 'mod_loss' = aux_weight *
    mod_bce (added to the training loss by moejax.train.step)}.
  """
  out = {'mod_layers': dict(mod_aux)}
  for key in MOD_METRICS:
    out[f'mod_{key}'] = jnp.mean(jnp.stack(
        [jnp.asarray(a[key], jnp.float32) for a in mod_aux.values()]))
  out['mod_loss'] = jnp.float32(aux_weight) * out['mod_bce']
  return out
