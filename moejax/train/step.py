"""Loss, jitted train step and eval step.

Axis letters: B batch, L sequence length (inputs), V vocab.

A batch is `tokens` [B, L + 1] int32: inputs `tokens[:, :-1]`, targets
`tokens[:, 1:]`. The loss is

    lm_loss + aux_loss_weight * aux['aux_loss'] + z_loss_weight * aux['z_loss']
            (+ aux['reg_loss']) (+ aux['mod_loss'])

where aux['reg_loss'] is there only when a router reports it (ReMoE's
lambda * L1, weight 1: its coefficient adapts on its own; the other
routers' losses are unchanged, bit for bit), and aux['mod_loss'] only with
Mixture-of-Depths blocks (their weighted predictor BCE, moejax.models.mod),
where lm_loss is the mean next-token cross-entropy over the non-padding
target positions. For a classifier (`model.task == 'classify'`, e.g.
`EncoderClassifier`) the inputs are the same `tokens[:, :-1]`, the targets
are per-example `labels` [B] (the synthetic mixture's domain ids), and
'lm_loss' holds the mean classification cross-entropy; the metrics add
'correct' (number of right argmax predictions). The train step's RNG is
`fold_in(key(seed), step)`, so a step is a pure function of (state,
batch, seed): resumed runs are bitwise identical to uninterrupted ones.

The train step applies the model with its non-'params' collections
(`TrainState.model_state`, e.g. 'moe_state') mutable and stores their new
values; eval reads them. It also returns `finite_flags`: whether the loss,
every MoE layer's aux entries (router z_loss, a function of the router
logits, aux_loss, entropy, loads...), every gradient leaf, the new params
and the new model state are finite; `nonfinite_report` turns them into the
message the loop stops with.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import routing
from moejax import sharding
from moejax.analysis import capture as capture_lib
from moejax.train import accumulate
from moejax.train.state import TrainState

Metrics = dict[str, jax.Array]
# Eval-step entries 'spec_counts/<layer>': [2, E, N] expert x domain counts.
SPEC_PREFIX = 'spec_counts/'
TOKEN_SPEC_PREFIX = 'token_counts/'  # (top-1 expert, input token id) counts
# Model aux entries copied into the metrics when the routers report them
# (models.transformer.OPTIONAL_MEAN_AUX_KEYS).
OPTIONAL_METRIC_KEYS = ('reg_loss', 'active_experts')
# Mixture-of-Depths aux entries (moejax.models.mod.summarize_mod_aux), there
# only when the model has MoD blocks; 'mod_loss' is added to the loss.
MOD_METRIC_KEYS = ('mod_loss', 'mod_bce', 'mod_accuracy', 'mod_fraction')


def step_rng(seed, step: jax.Array) -> jax.Array:
  """The 'router' RNG key of training step `step`: fold_in(key(seed), step).

  Args:
    seed: run seed in [0, 2**32), a Python int or a uint32 scalar (traced or
      concrete); both give the same key.
    step: int scalar (traced or concrete).

  Returns:
    A typed PRNG key.
  """
  return jax.random.fold_in(jax.random.key(jnp.uint32(seed)), step)


def split_tokens(tokens: jax.Array, pad_id: Optional[int] = None):
  """Splits [B, L + 1] tokens into model inputs, targets and loss weights.

  Args:
    tokens: [B, L + 1] int32.
    pad_id: padding token id, or None if nothing is padding.

  Returns:
    inputs [B, L] int32, targets [B, L] int32, weights [B, L] float32 (0 at
    padding targets), padding_mask [B, L] bool (True where the input is
    padding) or None.
  """
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  if pad_id is None:
    return inputs, targets, jnp.ones(targets.shape, jnp.float32), None
  weights = (targets != pad_id).astype(jnp.float32)
  return inputs, targets, weights, inputs == pad_id


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Weighted next-token cross-entropy, summed.

  Args:
    logits: [B, L, V] float32.
    targets: [B, L] int32.
    weights: [B, L] float32.

  Returns:
    (sum of weighted per-token NLL, sum of weights), float32 scalars.
  """
  nll = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  return jnp.sum(nll * weights), jnp.sum(weights)


def layer_metrics(aux: dict, prefix: str = 'moe') -> Metrics:
  """Flattens the per-layer MoE aux into '<prefix>/<block>/<name>' entries.

  Args:
    aux: the model's aux dict with aux['layers'] = {block: MoeLayer aux}.
    prefix: key prefix.

  Returns:
    {'moe/block_i/aux_loss': scalar, ..., 'moe/block_i/expert_load': [E]}.
  """
  return {f'{prefix}/{block}/{name}': value
          for block, layer in aux.get('layers', {}).items()
          for name, value in layer.items()}


def _task_loss(model: nn.Module, logits: jax.Array, tokens: jax.Array,
               labels: Optional[jax.Array], pad_id: Optional[int]) -> Metrics:
  """The task's summed loss and count: LM next-token or classification.

  Returns:
    {'nll_sum', 'tokens' (targets or examples counted)} and, for
    classification, 'correct'.
  """
  if getattr(model, 'task', 'lm') != 'classify':
    _, targets, weights, _ = split_tokens(tokens, pad_id)
    nll_sum, count = cross_entropy(logits, targets, weights)
    return {'nll_sum': nll_sum, 'tokens': count}
  if labels is None:
    raise ValueError('a classification model needs labels [B] (the batch '
                     "'domain' ids).")
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = jnp.argmax(logits, -1) == labels
  return {'nll_sum': jnp.sum(nll),
          'tokens': jnp.asarray(labels.shape[0], jnp.float32),
          'correct': jnp.sum(correct.astype(jnp.float32))}


def _extra_loss_terms(aux: dict, aux_loss_weight: float,
                      z_loss_weight: float) -> list:
  """The loss's terms besides the task loss, in the order they are added
  to it (scalars): the weighted balance and z losses, then ReMoE's
  'reg_loss' and the MoD 'mod_loss' when the model reports them. `aux` is
  the model's aux or the metrics that copy it."""
  terms = [aux_loss_weight * aux['aux_loss'], z_loss_weight * aux['z_loss']]
  if 'reg_loss' in aux:  # ReMoE: lambda is the weight (not added as 0)
    terms.append(aux['reg_loss'])
  if 'mod_loss' in aux:  # MoD predictor BCE, weighted by the model
    terms.append(aux['mod_loss'])
  return terms


def _apply_loss(params: Any, model: nn.Module, tokens: jax.Array, *,
                deterministic: bool, rng: Optional[jax.Array],
                aux_loss_weight: float, z_loss_weight: float,
                pad_id: Optional[int], model_state: Optional[dict],
                update_state: bool, labels: Optional[jax.Array] = None,
                read_only: Optional[dict] = None):
  """compute_loss, plus the model state after the forward pass.

  read_only: more variable collections the model reads and never writes
  (the step's routing counts under gradient accumulation).

  Returns:
    (loss, (metrics, new model_state)); new model_state is `model_state`
    itself unless `update_state` and it is non-empty.
  """
  inputs, _, _, padding_mask = split_tokens(tokens, pad_id)
  rngs = {'router': rng} if rng is not None else {}
  model_state = dict(model_state or {})
  variables = {'params': params, **model_state, **(read_only or {})}
  mutable = sorted(model_state) if update_state and model_state else False
  out = model.apply(variables, inputs, padding_mask=padding_mask,
                    deterministic=deterministic, rngs=rngs, mutable=mutable)
  if mutable:
    (logits, aux), new_state = out
    new_state = {**model_state, **flax.core.unfreeze(new_state)}
  else:
    (logits, aux), new_state = out, model_state
  metrics = _task_loss(model, logits, tokens, labels, pad_id)
  lm_loss = metrics['nll_sum'] / jnp.maximum(metrics['tokens'], 1.0)
  # ((lm_loss + aux term) + z term) + ...: added left to right.
  loss = sum(_extra_loss_terms(aux, aux_loss_weight, z_loss_weight),
             lm_loss)
  metrics.update(loss=loss, lm_loss=lm_loss)
  for key in ('aux_loss', 'z_loss', 'drop_fraction', 'max_violation'):
    metrics[key] = aux[key]
  for key in OPTIONAL_METRIC_KEYS + MOD_METRIC_KEYS:
    if key in aux:
      metrics[key] = aux[key]
  metrics.update(layer_metrics(aux))
  return loss, (metrics, new_state)


def compute_loss(params: Any, model: nn.Module, tokens: jax.Array, *,
                 deterministic: bool, rng: Optional[jax.Array] = None,
                 aux_loss_weight: float = 0.0, z_loss_weight: float = 0.0,
                 pad_id: Optional[int] = None,
                 model_state: Optional[dict] = None,
                 labels: Optional[jax.Array] = None
                 ) -> tuple[jax.Array, Metrics]:
  """Total training loss of one batch and its parts.

  Args:
    params: the model's params.
    model: a TransformerLM-like module returning (logits [B, L, V], aux),
      or a classifier (`task == 'classify'`) returning (logits [B, N], aux).
    tokens: [B, L + 1] int32.
    deterministic: eval mode of the MoE layers.
    rng: 'router' key (needed when deterministic=False).
    aux_loss_weight: weight of aux['aux_loss'].
    z_loss_weight: weight of aux['z_loss'].
    pad_id: padding token id or None.
    model_state: the model's non-'params' collections (read only here).
    labels: [B] int32 class ids (classifiers only).

  Returns:
    loss (float32 scalar) and metrics: 'loss', 'lm_loss' (the task loss),
    'aux_loss', 'z_loss', 'drop_fraction', 'max_violation' ('reg_loss',
    'active_experts' when the routers report them), 'nll_sum',
    'tokens', ('correct' for classifiers), plus the per-layer 'moe/...'
    entries.
  """
  loss, (metrics, _) = _apply_loss(
      params, model, tokens, deterministic=deterministic, rng=rng,
      aux_loss_weight=aux_loss_weight, z_loss_weight=z_loss_weight,
      pad_id=pad_id, model_state=model_state, update_state=False,
      labels=labels)
  return loss, metrics


def _aux_shares(model: nn.Module, toks: jax.Array,
                pad_id: Optional[int]) -> Optional[jax.Array]:
  """[M] micro-batch weights of the 'group'-scope balance loss (their
  shares of the non-empty routing groups, accumulate.group_shares), or
  None (weighted like the valid tokens: 'batch' scope, no MoE)."""
  moe = getattr(model, 'moe', None)
  if not moe or moe.get('aux_loss_scope', 'group') != 'group':
    return None
  valid = jax.vmap(lambda t: _valid_input_mask(t, pad_id))(toks)
  return accumulate.group_shares(valid, moe)


def _valid_input_mask(tokens: jax.Array, pad_id: Optional[int]) -> jax.Array:
  """[B, L] bool of tokens [B, L + 1]: False at padding inputs."""
  padding = split_tokens(tokens, pad_id)[3]
  return jnp.ones(tokens[:, :-1].shape, bool) if padding is None else ~padding


def _valid_inputs(tokens: jax.Array, pad_id: Optional[int]) -> jax.Array:
  """Number of non-padding input tokens of tokens [B, L + 1] (float32)."""
  return jnp.sum(_valid_input_mask(tokens, pad_id)).astype(jnp.float32)


def _task_count(model: nn.Module, tokens: jax.Array,
                pad_id: Optional[int]) -> jax.Array:
  """The task loss's normaliser: non-padding targets (LM) or examples."""
  if getattr(model, 'task', 'lm') == 'classify':
    return jnp.asarray(tokens.shape[0], jnp.float32)
  return split_tokens(tokens, pad_id)[2].sum()


def _accumulated_grads(params: Any, model: nn.Module, tokens: jax.Array,
                       labels: Optional[jax.Array], rng: jax.Array, *,
                       micro: int, model_state: Optional[dict],
                       aux_loss_weight: float, z_loss_weight: float,
                       pad_id: Optional[int],
                       mesh: Optional[jax.sharding.Mesh]):
  """Gradients of tokens [B, L + 1] summed over `micro` micro-batches.

  See moejax.train.accumulate (the objective, the counting pass, metrics).

  Returns:
    (grads, metrics, new model_state) as the unaccumulated step's.
  """
  model_state = dict(model_state or {})
  toks = accumulate.micro_batches(tokens, micro, mesh)  # [M, B/M, L + 1]
  labs = (None if labels is None
          else accumulate.micro_batches(labels, micro, mesh))
  rngs = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(micro))
  n_targets = jnp.maximum(_task_count(model, tokens, pad_id), 1.0)
  n_inputs = jnp.maximum(_valid_inputs(tokens, pad_id), 1.0)

  def count_fn(toks_i, rng_i):
    inputs, _, _, padding_mask = split_tokens(toks_i, pad_id)
    _, sown = model.apply({'params': params, **model_state}, inputs,
                          padding_mask=padding_mask, deterministic=False,
                          rngs={'router': rng_i},
                          mutable=[routing.SOWN_COUNTS])
    return dict(sown).get(routing.SOWN_COUNTS, {})

  counts = accumulate.step_counts(count_fn, toks, rngs)
  read_only = None if counts is None else {routing.STEP_COUNTS: counts}
  aux_shares = _aux_shares(model, toks, pad_id)  # [M] or None

  def weights(i, toks_i):
    """(valid-token share, balance-loss share) of micro-batch i."""
    share = _valid_inputs(toks_i, pad_id) / n_inputs
    return share, (share if aux_shares is None else aux_shares[i])

  def objective(p, i, toks_i, labs_i, rng_i):
    _, (metrics, new_state) = _apply_loss(
        p, model, toks_i, deterministic=False, rng=rng_i,
        aux_loss_weight=aux_loss_weight, z_loss_weight=z_loss_weight,
        pad_id=pad_id, model_state=model_state, update_state=True,
        labels=labs_i, read_only=read_only)
    share, aux_share = weights(i, toks_i)
    balance, *extra = _extra_loss_terms(metrics, aux_loss_weight,
                                        z_loss_weight)
    loss = (metrics['nll_sum'] / n_targets + aux_share * balance +
            share * sum(extra))
    return loss, (metrics, new_state, share)

  def body(grads, xs):
    (loss, aux), g = jax.value_and_grad(objective, has_aux=True)(
        params, *xs)
    return jax.tree.map(jnp.add, grads, g), (loss, *aux)

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, (losses, stacked, states, shares) = jax.lax.scan(
      body, zeros, (jnp.arange(micro), toks, labs, rngs))
  metrics = accumulate.combine_metrics(stacked, shares, aux_shares)
  metrics['lm_loss'] = metrics['nll_sum'] / jnp.maximum(metrics['tokens'],
                                                        1.0)
  metrics['loss'] = losses.sum()
  # Every micro-batch updates the state from the step's counts (or keeps
  # it): the last one's is the step's.
  return grads, metrics, jax.tree.map(lambda x: x[-1], states)


def _all_finite(tree: Any) -> jax.Array:
  """True iff every inexact leaf of `tree` is finite (bool scalar)."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def finite_flags(metrics: Metrics, grads: Any, params: Any,
                 model_state: Any) -> Metrics:
  """Which parts of one training step were finite (bool scalars).

  Args:
    metrics: the compute_loss metrics of the step (with 'moe/<block>/...').
    grads: the gradient tree (before clipping).
    params: the params after the update.
    model_state: the model state after the step.

  Returns:
    {'all_finite': everything below is finite, 'finite/loss',
    'finite/moe/<block>/<aux name>' for every MoE-layer aux entry,
    'finite/grad/<param path>' per gradient leaf, 'finite/params',
    'finite/model_state'}.
  """
  flags = {'finite/loss': jnp.isfinite(metrics['loss'])}
  for key, value in metrics.items():
    if key.startswith('moe/'):
      flags[f'finite/{key}'] = jnp.all(jnp.isfinite(value))
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
    name = '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k)))
                    for k in path)
    flags[f'finite/grad/{name}'] = jnp.all(jnp.isfinite(leaf))
  flags['finite/params'] = _all_finite(params)
  flags['finite/model_state'] = _all_finite(model_state)
  flags['all_finite'] = jnp.all(jnp.stack(list(flags.values())))
  return flags


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    *, seed: int, aux_loss_weight: float = 0.0,
                    z_loss_weight: float = 0.0, pad_id: Optional[int] = None,
                    learning_rate_fn: Optional[optax.Schedule] = None,
                    mesh: Optional[jax.sharding.Mesh] = None,
                    state_shardings: Optional[TrainState] = None,
                    grad_accum_steps: int = 1
                    ) -> Callable[[TrainState, jax.Array],
                                  tuple[TrainState, Metrics]]:
  """Builds the jitted train step (the state argument is donated).

  The model runs with deterministic=False, its non-'params' collections
  (`state.model_state`) mutable; their new values go into the new state.
  On a mesh, the step is traced and run under `jax.set_mesh(mesh)` (MoE
  layers run expert-parallel), takes the state with `state_shardings` and
  tokens / labels split over the batch axes (`sharding.shard_batch`), and
  returns the state with the same shardings and the metrics replicated.

  Args:
    model: the flax module.
    optimizer: the optax transformation.
    seed: run seed; step t uses step_rng(seed, t).
    aux_loss_weight: weight of the load-balancing loss.
    z_loss_weight: weight of the router z-loss.
    pad_id: padding token id or None.
    learning_rate_fn: schedule, only to report 'learning_rate'.
    mesh: the device mesh, or None (no shardings given: JAX places it).
    state_shardings: with mesh, the TrainState of NamedShardings
      (`sharding.tree_shardings` of the abstract state).
    grad_accum_steps: M >= 1 dividing B: the step's gradient summed over M
      micro-batches of B / M rows (moejax.train.accumulate); 1: the whole
      batch in one pass (unchanged).

  Returns:
    step(state, tokens [B, L + 1], labels=None) -> (new state, metrics)
    (labels [B] are used by classifiers only) where metrics
    holds the compute_loss metrics (per-layer ones too), 'grad_norm'
    (before clipping), 'param_norm' (after the update), 'learning_rate',
    and the `finite_flags` ('all_finite', 'finite/...'). The update is
    applied even when it is not finite: the caller must check
    'all_finite' before using the new state (see loop.py).
    `step.lower(state, tokens, labels=None)` gives the jax.stages.Lowered
    program (arguments may be ShapeDtypeStructs).
  """

  if (isinstance(grad_accum_steps, bool) or
      not isinstance(grad_accum_steps, int) or grad_accum_steps < 1):
    raise ValueError(f'grad_accum_steps={grad_accum_steps!r}; allowed: an '
                     'int >= 1 dividing the batch size.')

  def train_step(state: TrainState, tokens: jax.Array, seed_: jax.Array,
                 labels: Optional[jax.Array]):
    """One AdamW update on tokens [B, L + 1]; returns (state, metrics)."""
    if grad_accum_steps > 1:
      grads, metrics, model_state = _accumulated_grads(
          state.params, model, tokens, labels, step_rng(seed_, state.step),
          micro=grad_accum_steps, model_state=state.model_state,
          aux_loss_weight=aux_loss_weight, z_loss_weight=z_loss_weight,
          pad_id=pad_id, mesh=mesh)
    else:
      loss_fn = lambda p: _apply_loss(
          p, model, tokens, deterministic=False,
          rng=step_rng(seed_, state.step), aux_loss_weight=aux_loss_weight,
          z_loss_weight=z_loss_weight, pad_id=pad_id,
          model_state=state.model_state, update_state=True, labels=labels)
      grads, (metrics, model_state) = jax.grad(loss_fn, has_aux=True)(
          state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state,
                                          state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    metrics['param_norm'] = optax.tree.norm(params)
    if learning_rate_fn is not None:
      metrics['learning_rate'] = jnp.asarray(learning_rate_fn(state.step),
                                             jnp.float32)
    metrics.update(finite_flags(metrics, grads, params, model_state))
    new_state = TrainState(step=state.step + 1, params=params,
                           opt_state=opt_state, model_state=model_state)
    return new_state, metrics

  # The seed is an argument, not a compile-time constant: runs that differ
  # only in their seed (seed sweeps) share one compiled program.
  jitted = _jit(train_step, mesh, (state_shardings, 'batch', 'replicated',
                                   'batch'),
                (state_shardings, 'replicated'), donate_argnums=0)
  seed_array = np.uint32(seed)

  classify = getattr(model, 'task', 'lm') == 'classify'

  def step(state: TrainState, tokens: jax.Array,
           labels: Optional[jax.Array] = None):
    """step(state, tokens [B, L + 1], labels [B] for classifiers)."""
    return jitted(state, tokens, seed_array, labels if classify else None)

  # step.lower(state, tokens[, labels]): the jax.stages.Lowered program
  # (arrays or ShapeDtypeStructs), e.g. to read the compiled collectives.
  step.lower = lambda state, tokens, labels=None: jitted.lower(
      state, tokens, seed_array, labels if classify else None)
  return step


def make_eval_step(model: nn.Module, *, aux_loss_weight: float = 0.0,
                   z_loss_weight: float = 0.0, pad_id: Optional[int] = None,
                   num_domains: int = 0, token_vocab: int = 0,
                   mesh: Optional[jax.sharding.Mesh] = None,
                   state_shardings: Optional[TrainState] = None
                   ) -> Callable[..., Metrics]:
  """Builds the jitted eval step (deterministic=True: eval capacity factor).

  Args:
    model: the flax module.
    aux_loss_weight: as in training (for the reported total 'loss').
    z_loss_weight: as in training.
    pad_id: padding token id or None.
    num_domains: N > 0: also count each MoE layer's (top-1 expert, domain)
      pairs for the specialisation score (`SPEC_PREFIX` entries, see
      `analysis.capture.expert_domain_counts`); 0: do not.
    token_vocab: V > 0: also count each MoE layer's (top-1 expert, input
      token id) pairs, ids in [0, V) (`TOKEN_SPEC_PREFIX` entries
      [2, E, V], see `analysis.capture.expert_label_counts`); 0: do not.
    mesh: the device mesh, or None (see make_train_step).
    state_shardings: with mesh, the TrainState of NamedShardings; params
      and model_state must come with its `params` / `model_state` ones,
      tokens and domains split over the batch axes. The metrics come back
      replicated.

  Returns:
    step(params, tokens [B, L + 1], model_state=None, labels=None) -> the
    compute_loss metrics of the batch, plus with num_domains
    'spec_counts/<layer>' [2, E, N] (with token_vocab 'token_counts/<layer>'
    [2, E, V]); model_state (the TrainState's) is read
    only; labels [B] are the domain ids (a classifier's targets).
  """
  classify = getattr(model, 'task', 'lm') == 'classify'

  def eval_step(params: Any, tokens: jax.Array,
                model_state: Optional[dict], domain: Optional[jax.Array]
                ) -> Metrics:
    """Deterministic metrics of tokens [B, L + 1]."""
    metrics = compute_loss(params, model, tokens, deterministic=True,
                           aux_loss_weight=aux_loss_weight,
                           z_loss_weight=z_loss_weight, pad_id=pad_id,
                           model_state=model_state,
                           labels=domain if classify else None)[1]
    inputs, _, _, padding_mask = split_tokens(tokens, pad_id)
    labels = {}
    if num_domains and domain is not None:
      labels[SPEC_PREFIX] = (jnp.broadcast_to(domain[:, None], inputs.shape),
                             num_domains)
    if token_vocab:
      labels[TOKEN_SPEC_PREFIX] = (inputs, token_vocab)
    if labels:
      counts = capture_lib.expert_label_counts(
          model, {'params': params, **dict(model_state or {})}, inputs,
          padding_mask, labels)
      for prefix, by_layer in counts.items():
        metrics.update({prefix + k: v for k, v in by_layer.items()})
    return metrics

  jitted = _jit(eval_step, mesh, (
      getattr(state_shardings, 'params', None), 'batch',
      getattr(state_shardings, 'model_state', None), 'batch'), 'replicated')

  def step(params: Any, tokens: jax.Array,
           model_state: Optional[dict] = None,
           labels: Optional[jax.Array] = None) -> Metrics:
    use = labels if classify or num_domains else None
    return jitted(params, tokens, model_state, use)

  return step


def _jit(fn: Callable, mesh: Optional[jax.sharding.Mesh], in_shardings,
         out_shardings, **kwargs) -> Callable:
  """jax.jit(fn), or on a mesh: with shardings, traced and run in the mesh.

  Args:
    fn: the function.
    mesh: the device mesh, or None (plain jax.jit; shardings ignored).
      The result's `.lower(*args)` lowers in the mesh too.
    in_shardings: per argument: a sharding tree, 'batch' (leading axis
      over `sharding.batch_axes`) or 'replicated'.
    out_shardings: the same for the outputs.
    **kwargs: more jax.jit arguments (donate_argnums).

  Returns:
    The jitted function.
  """
  if mesh is None:
    return jax.jit(fn, **kwargs)
  named = {'batch': sharding.batch_sharding(mesh),
           'replicated': NamedSharding(mesh, P())}
  resolve = lambda s: named[s] if isinstance(s, str) else s
  jitted = jax.jit(fn, in_shardings=tuple(map(resolve, in_shardings)),
                   out_shardings=(tuple(map(resolve, out_shardings))
                                  if isinstance(out_shardings, tuple)
                                  else resolve(out_shardings)), **kwargs)

  def call(*args):
    with jax.set_mesh(mesh):  # MoE layers see the mesh when traced
      return jitted(*args)

  def lower(*args):
    with jax.set_mesh(mesh):
      return jitted.lower(*args)

  call.lower = lower
  return call


def _natural_key(name: str):
  """'block_10' sorts after 'block_2' (forward order of the blocks)."""
  head, _, tail = name.rpartition('_')
  return (head, int(tail)) if tail.isdigit() else (name, -1)


def nonfinite_report(step: int, flags: Metrics,
                     loss: Optional[float] = None) -> str:
  """Explains a step whose `finite_flags` were not all true.

  Args:
    step: the step the update led to (it used train batch step - 1).
    flags: host values (bools) of the step's `finite_flags`.
    loss: the step's loss value, if known.

  Returns:
    A message naming the step, the first MoE layer (forward order) whose
    router logits (seen through z_loss, a function of the logits) or aux
    losses / metrics were non-finite, and the non-finite gradients.
  """
  bad = {k[len('finite/'):] for k, v in flags.items()
         if k.startswith('finite/') and not bool(v)}
  loss_text = '' if loss is None else f' (loss={loss})'
  lines = [f'non-finite values in the update to step {step} (train batch '
           f'{step - 1}){loss_text}.']
  layers = {}
  for key in sorted(k for k in flags if k.startswith('finite/moe/')):
    _, _, block, name = key.split('/', 3)
    if key[len('finite/'):] in bad:
      layers.setdefault(block, []).append(name)
  if layers:
    first = min(layers, key=_natural_key)
    names = ', '.join(n + (' (router logits)' if n == 'z_loss' else '')
                      for n in layers[first])
    others = sorted((b for b in layers if b != first), key=_natural_key)
    lines.append(f'First non-finite MoE layer (forward order): {first}: '
                 f'{names}' + (f'; later ones too: {", ".join(others)}'
                               if others else '') + '.')
  elif any(k.startswith('finite/moe/') for k in flags):
    lines.append('Every MoE layer\'s router logits and aux losses were '
                 'finite.')
  grads = [k[len('grad/'):] for k in bad if k.startswith('grad/')]
  if grads:
    total = sum(k.startswith('finite/grad/') for k in flags)
    shown = ', '.join(sorted(grads, key=_path_key)[:6])
    more = f' and {len(grads) - 6} more' if len(grads) > 6 else ''
    lines.append(f'Non-finite gradients in {len(grads)} of {total} param '
                 f'arrays: {shown}{more}.')
  for part, text in (('loss', 'the loss'), ('params', 'the updated params'),
                     ('model_state', 'the model state')):
    if part in bad:
      lines.append(f'Non-finite: {text}.')
  return '\n'.join(lines)


def _path_key(path: str):
  return tuple(_natural_key(p) for p in path.split('/'))
