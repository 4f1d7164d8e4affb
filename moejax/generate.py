"""Autoregressive generation from a TransformerLM through its KV cache.

Axis letters: B batch, P prompt length, N new tokens, T = P + N the cache
length, L tokens fed in one call (P for the prefill, 1 per decode step),
V vocab.

Flow:
    model -> inference_model(model)    no capacity limit, deterministic MoE
    init_cache(model, B, T)            zeros, collection 'cache'
    prefill(prompt [B, P])          -> logits [B, P, V], cache (index P)
    token_1 = sample_logits(logits[:, -1])                        [B]
    decode_step(token_n [B])        -> logits [B, V], cache (index + 1)
                                       (step_model: B*K < E tokens use the
                                       'per_token' dispatcher)
    token_{n+1} = sample_logits(logits)         ... until N new tokens
    -> tokens [B, P + N]

Inference semantics: every token reaches its experts. `inference_model`
clones the model with `capacity_factor`, `eval_capacity_factor` and
`group_size` None, so the MoE layers are dropless with one group per call,
and a token's MoE output depends on that token alone: decoding one token at
a time through the cache gives the logits of the full forward pass of the
same (capacity-free) model. Routers whose choice depends on other tokens
('expert_choice', 'soft_moe') are refused.

Variables: {'params': ..., other collections (e.g. 'moe_state', the
loss-free / fixed selection bias)}; every collection but 'cache' is passed
to the model unchanged and is never updated.

Compilation: `generate` runs two jitted programs, the prefill and the
per-token step (each also picks the next token), compiled once per model,
shapes and greedy-or-sampling; the loop over tokens is Python.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from moejax import routers
from moejax import routing
from moejax.dispatch import DISPATCHER_NAMES
from moejax.models.transformer import TransformerLM

# MoeLayer arguments set to None at inference: dropless, one group per call.
NO_CAPACITY = {'capacity_factor': None, 'eval_capacity_factor': None,
               'group_size': None, 'group_sequences': None}


# ---------------------------------------------------------------- validation
def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return (isinstance(value, (int, float, np.integer, np.floating)) and
          not isinstance(value, bool))


def _check_int(name: str, value, minimum: int) -> None:
  if not _is_int(value) or value < minimum:
    raise ValueError(f'{name} must be an int >= {minimum}, got {value!r}.')


def _check_sampling(temperature, top_p) -> None:
  """temperature >= 0 (0 = greedy), 0 < top_p <= 1."""
  if not _is_number(temperature) or not (
      math.isfinite(temperature) and temperature >= 0):
    raise ValueError(f'temperature must be a finite number >= 0 (0 = greedy)'
                     f', got {temperature!r}.')
  if not _is_number(top_p) or not 0 < top_p <= 1:
    raise ValueError(f'top_p must be a number in (0, 1] (1 = no nucleus '
                     f'cut), got {top_p!r}.')


def check_model(model: Any) -> None:
  """Raises ValueError unless `model` can be decoded through a KV cache.

  Args:
    model: must be a causal `TransformerLM` whose MoE router (if any) is
      causal-safe (its RouterSpec in moejax.routers; built in: 'topk'): a
      token's output may not depend on others.
  """
  if not isinstance(model, TransformerLM):
    raise ValueError(
        'model must be a causal moejax.models.TransformerLM (decoder-only '
        f'LM), got {type(model).__name__}; an encoder cannot generate.')
  router = (model.moe or {}).get('router', 'topk')
  if not routers.get(router).causal_safe:
    raise ValueError(
        f'router={router!r} routes a token by the other tokens of its group, '
        'so decoding one token at a time would not match the model; '
        "allowed value for generation: router='topk'.")


def _check_prompt(model: TransformerLM, prompt_ids) -> np.ndarray:
  """prompt_ids: non-empty [B, P] integers in [0, V); returns int32 numpy."""
  prompt = np.asarray(prompt_ids)
  if prompt.ndim != 2 or prompt.shape[0] < 1 or prompt.shape[1] < 1:
    raise ValueError(f'prompt_ids must be a non-empty [B, P] array of token '
                     f'ids (B, P >= 1), got shape {prompt.shape}.')
  if not np.issubdtype(prompt.dtype, np.integer):
    raise ValueError(f'prompt_ids must hold integer token ids, got dtype '
                     f'{prompt.dtype}.')
  bad = (prompt < 0) | (prompt >= model.vocab_size)
  if bad.any():
    raise ValueError(
        f'prompt_ids hold {int(prompt[bad][0])}; allowed values: token ids '
        f'in [0, {model.vocab_size}) (the model\'s vocab_size).')
  return prompt.astype(np.int32)


def _check_length(model: TransformerLM, prompt_len: int,
                  new_tokens: int) -> None:
  window = model.sliding_window
  if window is not None and prompt_len + new_tokens > window:
    raise ValueError(
        f'sliding_window={window} is shorter than the prompt ({prompt_len}) '
        f'+ max_new_tokens ({new_tokens}) = {prompt_len + new_tokens} '
        'positions; sliding-window attention is not implemented, so allowed:'
        f' prompt length + max_new_tokens <= {window}.')


def _check_rng(rng) -> None:
  """A single jax.random key: typed (jax.random.key) or raw (PRNGKey)."""
  if rng is None:
    raise ValueError('rng is required when sampling (temperature > 0); '
                     'allowed: a jax.random key, e.g. jax.random.key(0).')
  dtype = getattr(rng, 'dtype', None)
  typed = dtype is not None and jax.dtypes.issubdtype(dtype,
                                                      jax.dtypes.prng_key)
  raw = dtype == jnp.uint32 and getattr(rng, 'ndim', None) == 1
  if not ((typed and rng.ndim == 0) or raw):
    raise ValueError(f'rng must be one jax.random key (jax.random.key(seed)'
                     f' or jax.random.PRNGKey(seed)), got {rng!r}.')


# ------------------------------------------------------------- the pieces
def inference_model(model: TransformerLM) -> TransformerLM:
  """The model as generation runs it: MoE without capacity limit.

  Args:
    model: a TransformerLM.

  Returns:
    `model` cloned with the moe mapping's capacity_factor,
    eval_capacity_factor, group_size and group_sequences set to None
    (dropless, one group per call); `model` itself when it has no MoE
    layers.
  """
  check_model(model)
  if model.moe is None:
    return model
  return model.clone(moe={**model.moe, **NO_CAPACITY})


def step_model(model: TransformerLM, batch_size: int) -> TransformerLM:
  """The model of one decode step of `batch_size` tokens.

  With fewer token-choices than experts (B * K < E), the buffer
  dispatchers would run every expert on a one-slot buffer (E/K times the
  expert FLOPs and weight reads of the chosen experts); the 'per_token'
  dispatcher instead gathers each token's K experts' weights. Same params,
  same outputs (tests/test_routers.py); other cases keep the dispatcher.

  Args:
    model: the inference model (`inference_model`).
    batch_size: B, tokens per decode step.

  Returns:
    `model`, or its clone with dispatcher='per_token'.
  """
  moe = model.moe
  if moe is None or moe.get('router', 'topk') != 'topk':
    return model
  granularity = moe.get('granularity', 1)
  chosen = batch_size * moe.get('top_k', 1) * granularity
  if chosen >= moe['num_experts'] * granularity:
    return model
  return model.clone(moe={**moe, 'dispatcher': 'per_token'})


def _without_cache(variables: Mapping[str, Any]) -> dict:
  """The variable collections but 'cache' (params, moe_state, ...)."""
  if 'params' not in variables:
    raise ValueError(f'variables must hold a \'params\' collection, got '
                     f'collections {sorted(variables)}.')
  return {k: v for k, v in variables.items() if k != 'cache'}


def init_cache(model: TransformerLM, batch_size: int, max_len: int):
  """A zero KV cache of `max_len` positions, without initialising params.

  Args:
    model: the TransformerLM (its inference clone decides the shapes).
    batch_size: B.
    max_len: T, positions the cache holds (prompt + new tokens).

  Returns:
    The 'cache' collection: per attention layer `key` [B, T, KV, Dh],
    `value` [B, T, KV, Dv] (zeros) and `index` int32 0.
  """
  _check_int('batch_size', batch_size, 1)
  _check_int('max_len', max_len, 1)
  model = inference_model(model)
  tokens = jax.ShapeDtypeStruct((batch_size, max_len), jnp.int32)
  shapes = jax.eval_shape(functools.partial(model.init, decode=True),
                          jax.random.key(0), tokens)['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def prefill(model: TransformerLM, variables: Mapping[str, Any], cache,
            prompt_ids: jax.Array):
  """Runs `prompt_ids` through the cache (after the positions it holds).

  Args:
    model: the TransformerLM (run as `inference_model(model)`).
    variables: {'params': ..., other collections}; a 'cache' is ignored.
    cache: from `init_cache` (or an earlier call), with room for L more.
    prompt_ids: [B, L] int32 token ids.

  Returns:
    (logits [B, L, V] float32, the cache with index advanced by L).
  """
  model = inference_model(model)
  (logits, _), state = model.apply(
      {**_without_cache(variables), 'cache': cache}, prompt_ids,
      deterministic=True, decode=True, mutable=['cache'])
  return logits, state['cache']


def decode_step(model: TransformerLM, variables: Mapping[str, Any], cache,
                token_ids: jax.Array):
  """Feeds one token per sequence through the cache.

  Args:
    model: the TransformerLM.
    variables: {'params': ..., other collections}.
    cache: the cache after the previous positions.
    token_ids: [B] int32, the tokens at position `index`.

  Returns:
    (logits [B, V] float32 of the next token, the cache with index + 1).
  """
  logits, cache = prefill(model, variables, cache, token_ids[:, None])
  return logits[:, 0], cache


# ---------------------------------------------------------------- sampling
def _nucleus_sample(logits: jax.Array, rng: jax.Array, temperature,
                    top_p) -> jax.Array:
  """Samples [B] from softmax(logits [B, V] / temperature) cut to top_p."""
  logits = logits.astype(jnp.float32)
  # Max-subtracted first: a tiny temperature cannot overflow to inf.
  scaled = (logits - logits.max(axis=-1, keepdims=True)) / temperature
  order = jnp.argsort(-scaled, axis=-1)  # [B, V], most likely first
  sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V]
  # Keep a token iff the more likely ones hold < top_p: the smallest set
  # with mass >= top_p; the most likely token (mass_before 0) always stays.
  keep = mass_before < top_p
  choice = jax.random.categorical(
      rng, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)  # [B]
  return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


def _pick(logits: jax.Array, rng, temperature, top_p,
          greedy: bool) -> jax.Array:
  """[B, V] -> [B] int32: argmax (greedy) or a nucleus sample."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return _nucleus_sample(logits, rng, temperature, top_p).astype(jnp.int32)


def sample_logits(logits: jax.Array, rng: Optional[jax.Array],
                  temperature: float = 1.0, top_p: float = 1.0) -> jax.Array:
  """Picks one token per row of `logits`.

  temperature == 0: the argmax (rng unused). Otherwise a draw from
  softmax(logits / temperature) restricted to the top-p nucleus: the
  smallest set of most likely tokens whose probability mass is >= top_p
  (always at least the most likely token).

  Args:
    logits: [B, V].
    rng: a jax.random key (required when temperature > 0).
    temperature: >= 0.
    top_p: in (0, 1]; 1 keeps every token.

  Returns:
    [B] int32 token ids.

  Example: probabilities [.5, .3, .2] with top_p=0.75 keep {0, 1} (.5 <
  .75 <= .5 + .3) and draw 0 or 1 with probabilities .625 / .375.
  """
  _check_sampling(temperature, top_p)
  logits = jnp.asarray(logits)
  if logits.ndim != 2:
    raise ValueError(f'logits must be [B, V], got shape {logits.shape}.')
  greedy = temperature == 0
  if not greedy:
    _check_rng(rng)
  return _pick(logits, rng, temperature, top_p, greedy)


# ------------------------------------------------------------ the programs
@functools.partial(jax.jit, static_argnames=('model', 'greedy'))
def _first_token(model, variables, cache, prompt, rng, temperature, top_p,
                 greedy):
  """Prefill [B, P] and pick token P: -> ([B] int32, cache)."""
  logits, cache = prefill(model, variables, cache, prompt)
  return _pick(logits[:, -1], rng, temperature, top_p, greedy), cache


@functools.partial(jax.jit, static_argnames=('model', 'greedy'),
                   donate_argnames=('cache',))
def _next_token(model, variables, cache, token, rng, temperature, top_p,
                greedy):
  """Feed token n [B], pick token n + 1: -> ([B] int32, cache)."""
  logits, cache = decode_step(model, variables, cache, token)
  return _pick(logits, rng, temperature, top_p, greedy), cache


def _knobs(temperature, top_p) -> dict:
  """The picking arguments of `_first_token` / `_next_token`."""
  greedy = temperature == 0
  return dict(temperature=1.0 if greedy else float(temperature),
              top_p=float(top_p), greedy=greedy)


def check_generate_args(model: TransformerLM, prompt_ids, max_new_tokens,
                        temperature=0.0, top_p=1.0, rng=None) -> np.ndarray:
  """Checks `generate`'s arguments (nothing is traced or compiled).

  Args:
    model, prompt_ids, max_new_tokens, temperature, top_p, rng: as
      `generate`.

  Returns:
    The prompt as a [B, P] int32 numpy array.

  Raises:
    ValueError naming the argument and the allowed values.
  """
  check_model(model)
  prompt = _check_prompt(model, prompt_ids)
  _check_int('max_new_tokens', max_new_tokens, 1)
  _check_sampling(temperature, top_p)
  _check_length(model, prompt.shape[1], max_new_tokens)
  if temperature != 0:
    _check_rng(rng)
  return prompt


def _decode(model, variables, prompt: np.ndarray, new_tokens: int, rng,
            knobs: dict, timed: bool, step_dispatcher: str = 'auto'):
  """The loop of `generate` on checked arguments (model: the inference
  clone; rng: one key per run, split into one per picked token).

  Returns:
    (tokens [B, P + N] int32, the seconds of the prefill (with its compile
    when new) and of the N - 1 per-token steps (their compile excluded when
    `timed`: a throw-away step compiles them first)).
  """
  b, p = prompt.shape
  step = step_model(model, b)
  if step_dispatcher != 'auto' and model.moe is not None:
    step = model.clone(moe={**model.moe, 'dispatcher': step_dispatcher})
  keys = jax.random.split(jax.random.key(0) if knobs['greedy'] else rng,
                          new_tokens)  # unused when greedy
  cache = init_cache(model, b, p + new_tokens)
  start = time.perf_counter()
  token, cache = _first_token(model, variables, cache, jnp.asarray(prompt),
                              keys[0], **knobs)
  new = [jax.block_until_ready(token)]
  prefill_s = time.perf_counter() - start
  if timed and new_tokens > 1:  # compiles the step, outside the timing,
    # on a copy of the cache (same placement: one compiled program).
    jax.block_until_ready(_next_token(
        step, variables, jax.tree.map(jnp.copy, cache), token, keys[0],
        **knobs))
  start = time.perf_counter()
  for n in range(1, new_tokens):
    token, cache = _next_token(step, variables, cache, token, keys[n],
                               **knobs)
    new.append(token)
  jax.block_until_ready(token)
  decode_s = time.perf_counter() - start
  tokens = np.concatenate([prompt, np.stack(jax.device_get(new), axis=1)],
                          axis=1)
  return jnp.asarray(tokens), prefill_s, decode_s


def generate_with_stats(model: TransformerLM, variables: Mapping[str, Any],
                        prompt_ids, max_new_tokens: int, *,
                        temperature: float = 0.0, top_p: float = 1.0,
                        rng: Optional[jax.Array] = None):
  """`generate`, also timing the prefill and the per-token steps.

  The per-token step is compiled (on a throw-away step) before the timing
  starts; the prefill's time includes its compile when it is new.

  Args:
    As `generate`.

  Returns:
    (tokens [B, P + N] int32, stats): stats = {'prefill_s',
    'decode_steps' (N - 1: the first new token comes from the prefill),
    'decode_s', 'ms_per_token' (per step, B tokens), 'tokens_per_s'
    (B * (N - 1) / decode_s); the last two are nan when N == 1}.
  """
  prompt = check_generate_args(model, prompt_ids, max_new_tokens,
                               temperature, top_p, rng)
  tokens, prefill_s, decode_s = _decode(
      inference_model(model), _without_cache(variables), prompt,
      max_new_tokens, rng, _knobs(temperature, top_p), timed=True)
  steps = max_new_tokens - 1
  return tokens, {
      'prefill_s': prefill_s, 'decode_steps': steps, 'decode_s': decode_s,
      'ms_per_token': 1e3 * decode_s / steps if steps else math.nan,
      'tokens_per_s': (prompt.shape[0] * steps / decode_s
                       if steps and decode_s > 0 else math.nan)}


def generate(model: TransformerLM, variables: Mapping[str, Any],
             prompt_ids, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, rng: Optional[jax.Array] = None
             ) -> jax.Array:
  """Continues each prompt by `max_new_tokens` tokens.

  Greedy (argmax) when temperature == 0, else sampling from
  softmax(logits / temperature) cut to the top-p nucleus (see
  `sample_logits`). The model runs as `inference_model(model)` (no
  capacity limit, deterministic); the cache holds T = P + N positions.
  Every argument is checked (`check_generate_args`) before anything
  compiles.

  Args:
    model: a causal TransformerLM (token-choice MoE, or dense).
    variables: {'params': ..., e.g. 'moe_state': ...}.
    prompt_ids: [B, P] integer token ids in [0, V), P >= 1 (all prompts
      the same length: no padding).
    max_new_tokens: N >= 1.
    temperature: >= 0; 0 = greedy.
    top_p: in (0, 1].
    rng: a jax.random key; required when temperature > 0.

  Returns:
    [B, P + N] int32: the prompts followed by the new tokens.

  Example:
    >>> tokens = generate(model, {'params': params}, [[1, 2, 3]], 8)
  """
  prompt = check_generate_args(model, prompt_ids, max_new_tokens,
                               temperature, top_p, rng)
  tokens, _, _ = _decode(
      inference_model(model), _without_cache(variables), prompt,
      max_new_tokens, rng, _knobs(temperature, top_p), timed=False)
  return tokens


def decode_latency(model: TransformerLM, variables: Mapping[str, Any],
                   batch_size: int, prompt_len: int, new_tokens: int,
                   step_dispatcher: str = 'auto') -> dict[str, float]:
  """Greedy decode speed, compile time excluded.

  Runs `generate_with_stats` on a [batch_size, prompt_len] prompt of zeros
  and reports its per-token steps (timed with block_until_ready after the
  step is compiled; the prefill is not counted).

  Args:
    model: a causal TransformerLM.
    variables: {'params': ..., other collections}.
    batch_size: B >= 1.
    prompt_len: P >= 1.
    new_tokens: N >= 2 (the first new token comes from the prefill, the
      N - 1 others from the timed steps).
    step_dispatcher: the MoE dispatcher of the decode steps; 'auto' =
      `step_model`'s choice.

  Returns:
    {'ms_per_token': wall ms of one step (B tokens), 'tokens_per_s':
    B * (N - 1) / seconds of the steps}.
  """
  _check_int('batch_size', batch_size, 1)
  _check_int('prompt_len', prompt_len, 1)
  _check_int('new_tokens', new_tokens, 2)
  routing.check_choice('step_dispatcher', step_dispatcher,
                       ('auto',) + DISPATCHER_NAMES)
  prompt = np.zeros((batch_size, prompt_len), np.int32)
  check_generate_args(model, prompt, new_tokens, 0.0, 1.0, None)
  _, _, decode_s = _decode(
      inference_model(model), _without_cache(variables), prompt, new_tokens,
      None, _knobs(0.0, 1.0), timed=True, step_dispatcher=step_dispatcher)
  steps = new_tokens - 1
  return {'ms_per_token': 1e3 * decode_s / steps,
          'tokens_per_s': batch_size * steps / decode_s}
