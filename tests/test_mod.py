"""Mixture-of-Depths blocks (moejax.models.mod).

Pinned against the project's own plain `Block` with a hand-applied router
weight, hand-set router scores (router kernel = the first unit vector, so a
token's score is its first feature), hand-computed BCE / accuracy values,
and the full-sequence forward pass against token-by-token decoding through
`moejax.generate`'s KV cache.
"""

import functools
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import config_lib
from moejax import generate as gen
from moejax.analysis import capture as capture_lib
from moejax.models import TransformerLM
from moejax.models import mod as mod_lib
from moejax.models.transformer import Block, freeze_moe
from moejax.train import step as step_lib
from tests.test_generate import FAST_COMPILE
from tests.test_generate import random_variables

D, H, F = 8, 2, 16
MOE = dict(num_experts=4, top_k=2, capacity_factor=None,
           eval_capacity_factor=None)
_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _block(moe=None, **mod):
  return mod_lib.ModBlock(H, F, moe=freeze_moe(moe, F),
                          mod=mod_lib.ModOptions(**mod))


def _init(block, x, padding_mask=None):
  return flax.core.unfreeze(
      _jit(block.init)(jax.random.key(1), x, padding_mask))


def _unit_router(variables):
  """Router kernel = e_0: token i's score is x[i, 0]."""
  variables['params']['mod_router']['kernel'] = jnp.zeros(
      (D, 1)).at[0, 0].set(1.0)
  return variables


@pytest.mark.parametrize('moe', [None, MOE], ids=['dense', 'moe'])
def test_capacity_one_is_the_plain_block_times_the_router_weight(moe):
  x = jax.random.normal(jax.random.key(0), (2, 5, D))
  block = _block(moe, capacity=1.0)

  @_jit
  def run(x):  # one program: init, the MoD block and the plain block
    params = block.init(jax.random.key(1), x)['params']
    out, _, mod_aux = block.apply({'params': params}, x)
    plain = {k: v for k, v in params.items() if not k.startswith('mod_')}
    plain_out, _ = Block(H, F, moe=freeze_moe(moe, F)).apply(
        {'params': plain}, x)
    return out, mod_aux, plain_out, params['mod_router']['kernel']

  out, mod_aux, plain_out, kernel = run(x)
  r = x @ kernel[:, 0]  # [B, L] router weights
  expected = x + r[..., None] * (plain_out - x)
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)
  assert float(mod_aux['fraction']) == 1.0
  # Without the weight the outputs differ (the rule is not the plain block).
  assert np.abs(np.asarray(out - plain_out)).max() > 1e-2


def _scored_inputs():
  """x [2, 7, D] with x[..., 0] the scores; row 1 pads positions 5, 6."""
  x = np.array(jax.random.normal(jax.random.key(0), (2, 7, D)))
  x[0, :, 0] = [0.5, -1, 2, 0.1, 3, -2, 1]
  x[1, :, 0] = [1, 0.2, -1, 2, -3, 9, 9]  # the 9s are padding
  padding = np.zeros((2, 7), bool)
  padding[1, 5:] = True
  return jnp.asarray(x), jnp.asarray(padding)


@pytest.mark.parametrize('capacity,processed,updated', [
    # ceil(0.3 * 7) = ceil(2.1) = 3 tokens per sequence. Row 0: scores 3, 2,
    # 1 at positions 4, 2, 6. Row 1: the padded 9s are never taken before a
    # real token: 2, 1, 0.2 at positions 3, 0, 1.
    (0.3, 3, [[2, 4, 6], [0, 1, 3]]),
    # ceil(0.5 * 7) = 4; row 1 has 5 real tokens: 2, 1, 0.2, -1 at 3, 0,
    # 1, 2. Row 0: 3, 2, 1, 0.5 at 4, 2, 6, 0.
    (0.5, 4, [[0, 2, 4, 6], [0, 1, 2, 3]]),
])
def test_capacity_processes_ceil_cl_tokens_and_skips_the_rest_exactly(
    capacity, processed, updated):
  x, padding = _scored_inputs()
  block = _block(capacity=capacity)
  variables = _unit_router(_init(block, x, padding))
  apply = _jit(functools.partial(block.apply, capture_intermediates=True,
                                    mutable=['intermediates']))
  (out, _, _), state = apply(variables, x, padding)
  attn_out = state['intermediates']['attn']['__call__'][0]
  assert attn_out.shape == (2, processed, D)  # [B, Lc, D]
  for row, positions in enumerate(updated):
    changed = np.flatnonzero(np.any(np.asarray(out[row] != x[row]), -1))
    assert changed.tolist() == positions
    skipped = [i for i in range(7) if i not in positions]
    np.testing.assert_array_equal(out[row, skipped], x[row, skipped])


def test_a_padding_token_taken_for_lack_of_real_ones_is_not_updated():
  x, padding = _scored_inputs()
  padding = padding.at[1, 2:].set(True)  # row 1: 2 real tokens, Lc = 4
  block = _block(capacity=0.5)
  out, _, mod_aux = _jit(block.apply)(
      _unit_router(_init(block, x, padding)), x, padding)
  changed = np.flatnonzero(np.any(np.asarray(out[1] != x[1]), -1))
  assert changed.tolist() == [0, 1]
  # fraction = processed real tokens / real tokens = (4 + 2) / (7 + 2).
  assert float(mod_aux['fraction']) == pytest.approx(6 / 9)


def test_the_gathered_topk_path_equals_the_masked_path_on_equal_decisions():
  # predictor='router' selects the tokens with score > 0: exactly the top
  # ceil(0.5 * 7) = 4 of each row here (row 0: 3, 2, 1, 0.5 at 4, 2, 6,
  # 0; row 1: 2, 1, 0.3, 0.2 at 3, 0, 4, 1), so the gathered [B, 4, D] path
  # (RoPE at the original positions) and the masked [B, 7, D] path agree.
  x = np.array(jax.random.normal(jax.random.key(0), (2, 7, D)))
  x[0, :, 0] = [0.5, -1, 2, -0.1, 3, -2, 1]
  x[1, :, 0] = [1, 0.2, -1, 2, 0.3, -9, -9]
  outs = []
  for decisions in ('topk', 'predictor'):
    block = _block(capacity=0.5, predictor='router', decisions=decisions)
    variables = _unit_router(_init(block, jnp.asarray(x)))
    outs.append(_jit(block.apply)(variables, jnp.asarray(x))[0])
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(outs[0] - x).max()) > 1e-2


def test_capacity_tokens_hand_cases():
  assert mod_lib.capacity_tokens(0.125, 64) == 8
  assert mod_lib.capacity_tokens(0.3, 10) == 3  # 0.3 * 10 = 3.0000000000000004
  assert mod_lib.capacity_tokens(0.3, 7) == 3  # ceil(2.1)
  assert mod_lib.capacity_tokens(1.0, 5) == 5
  assert mod_lib.capacity_tokens(0.01, 5) == 1  # at least one token


def _later_token_changed(decisions):
  """Max change of positions 0..4 when token 5 changes (its score -> 50)."""
  x, _ = _scored_inputs()
  block = _block(capacity=0.5, predictor='router', decisions=decisions)
  variables = _unit_router(_init(block, x))
  x2 = x.at[:, 5].set(x[:, 5] * 1.5).at[:, 5, 0].set(50.0)
  apply = _jit(block.apply)
  out, out2 = apply(variables, x)[0], apply(variables, x2)[0]
  return float(jnp.abs(out2[:, :5] - out[:, :5]).max())


def test_predictor_decisions_are_causal_topk_ones_are_not():
  # Predictor ('router': selected iff score > 0) decisions: selected tokens
  # attend to earlier selected ones only, so token 5 cannot move 0..4.
  assert _later_token_changed('predictor') == 0.0
  # Top-k: row 0's token 5 (score -2 -> 50) pushes position 0 (score 0.5)
  # out of the ceil(0.5 * 7) = 4 chosen (4, 2, 6, 0 -> 5, 4, 2, 6).
  assert _later_token_changed('topk') > 1e-2


def test_predictor_bce_and_accuracy_hand_case():
  logits = jnp.array([[2.0, -1.0, 0.5, -3.0]])
  targets = jnp.array([[True, True, False, False]])
  # BCE: softplus(-2) = 0.126928, softplus(1) = 1.313262 (targets 1);
  # softplus(0.5) = 0.974077, softplus(-3) = 0.048587 (targets 0);
  # mean = 2.462854 / 4 = 0.615714. Decisions (> 0): T F T F -> 2/4 right.
  out = mod_lib.predictor_metrics(logits, targets)
  assert float(out['bce']) == pytest.approx(0.615714, abs=1e-5)
  assert float(out['accuracy']) == 0.5
  # Without token 1: (0.126928 + 0.974077 + 0.048587) / 3; 2 of 3 right.
  valid = jnp.array([[True, False, True, True]])
  out = mod_lib.predictor_metrics(logits, targets, valid)
  assert float(out['bce']) == pytest.approx(0.383197, abs=1e-5)
  assert float(out['accuracy']) == pytest.approx(2 / 3)


@pytest.mark.parametrize('predictor,trained', [
    ('mlp', ['block_1/mod_predictor']),  # stop-gradient input: the MLP only
    # BCE on the router's own score: the router and, through its input x,
    # the blocks below it (the paper's option (b) touches the LM).
    ('router', ['block_0', 'block_1/mod_router', 'embed']),
])
def test_the_loss_adds_the_weighted_bce_which_trains_the_predictor_only(
    predictor, trained):
  model = TransformerLM(num_layers=2, d_model=16, num_heads=2, d_ff=32,
                        vocab_size=32, mod={'every': 2, 'aux_weight': 0.5,
                                            'predictor': predictor})
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 32)
  params = random_variables(model)['params']

  @_jit
  def run(params):  # the loss and the gradient of the BCE alone
    bce = lambda p: model.apply({'params': p}, tokens[:, :-1])[1]['mod_bce']
    return step_lib.compute_loss(params, model, tokens, deterministic=True
                                 ) + (jax.grad(bce)(params),)

  loss, metrics, grads = run(params)
  assert float(loss) == pytest.approx(
      float(metrics['lm_loss'] + 0.5 * metrics['mod_bce']), rel=1e-6)
  # ceil(0.125 * 8) = 1 token of 8 in the MoD block.
  assert float(metrics['mod_fraction']) == pytest.approx(1 / 8)
  assert 0.0 <= float(metrics['mod_accuracy']) <= 1.0
  moved = set()
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    if float(jnp.abs(g).max()) > 0:
      keys = [k.key for k in path]
      moved.add('/'.join(keys[:2]) if keys[0] == 'block_1' else keys[0])
  assert sorted(moved) == trained


@functools.partial(jax.jit, static_argnums=(0,),
                   compiler_options=FAST_COMPILE)
def _full_and_cached(model, variables, tokens):
  """Logits [B, L, V] and aux of the full forward pass of `model`, the
  logits of its top-k clone, and those of prefilling 3 tokens then
  decoding the rest one at a time through gen's KV cache."""
  full, aux = model.apply(variables, tokens)
  topk = model.clone(mod={**vars(model.mod), 'decisions': 'topk'})
  cache = gen.init_cache(model, tokens.shape[0], tokens.shape[1])
  first, cache = gen.prefill(model, variables, cache, tokens[:, :3])

  def step(cache, token):  # token [B]
    logits, cache = gen.decode_step(model, variables, cache, token)
    return cache, logits

  _, rest = jax.lax.scan(step, cache, tokens[:, 3:].T)  # [L - 3, B, V]
  cached = jnp.concatenate([first, rest.transpose(1, 0, 2)], axis=1)
  return full, aux['mod_fraction'], topk.apply(variables, tokens)[0], cached


@pytest.mark.parametrize('kwargs', [
    dict(every=1, predictor='mlp'),
    dict(every=2, predictor='router', moe=MOE),  # MoDE
], ids=['mod_mlp', 'mode_router'])
def test_token_by_token_decoding_matches_the_predictor_forward_pass(kwargs):
  kwargs = dict(kwargs)
  moe = kwargs.pop('moe', None)
  model = TransformerLM(num_layers=2, d_model=16, num_heads=2, d_ff=32,
                        vocab_size=32, moe=moe,
                        mod={**kwargs, 'decisions': 'predictor'})
  variables = random_variables(model, seed=3)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
  with jax.default_matmul_precision('highest'):
    full, fraction, topk, cached = _full_and_cached(model, variables, tokens)
  # The predictor skips some tokens and processes others.
  assert 0.1 < float(fraction) < 0.9
  np.testing.assert_allclose(cached, full, atol=1e-5, rtol=1e-5)
  # The top-k forward pass (training) is another computation.
  assert float(jnp.abs(topk - full).max()) > 1e-3


def test_specialisation_counts_skip_the_mod_blocks_moe():
  # MoDE: both blocks MoE, block 1 also MoD (its MoE routes ceil(0.125 *
  # 8) = 1 token per sequence, not [B, L]): only block_0 is counted.
  model = TransformerLM(num_layers=2, d_model=16, num_heads=2, d_ff=32,
                        vocab_size=32, moe=MOE, mod={'every': 2})
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
  counts = _jit(functools.partial(
      capture_lib.expert_label_counts, model,
      labels={'token': (tokens, 32)}, padding_mask=None))(
          random_variables(model), inputs=tokens)['token']
  assert sorted(counts) == ['block_0']
  assert float(counts['block_0'][0].sum()) == 2 * 8  # every token once
  # The sweep's routing statistics (routing_outputs) skip it the same way.
  experts, valid, _ = capture_lib.routing_outputs(
      model, random_variables(model), [{'tokens': np.zeros((2, 9), int)}])
  assert sorted(experts) == ['block_0'] and experts['block_0'].shape == (2, 8)
  assert valid.shape == (2, 8)


def test_off_by_default_blocks_and_aux_unchanged():
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
  plain = TransformerLM(num_layers=2, d_model=16, num_heads=2, d_ff=32,
                        vocab_size=32)
  mod = plain.clone(mod={'every': 2})
  v_plain, v_mod = _jit(lambda t: (
      plain.init(jax.random.key(1), t)['params'],
      mod.init(jax.random.key(1), t)['params']))(tokens)
  # block_0 is a plain block in both; block_1 only gains the MoD params.
  for path in ('embed', 'block_0', 'final_norm'):
    jax.tree.map(np.testing.assert_array_equal, v_plain[path], v_mod[path])
  assert sorted(set(v_mod['block_1']) - set(v_plain['block_1'])) == [
      'mod_predictor', 'mod_router']
  _, aux = _jit(plain.apply)({'params': v_plain}, tokens)
  assert not [k for k in aux if k.startswith('mod_')]


def _config(**mod):
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'mod.py') +
                                  ':tiny')
  config.model.mod.update(mod)
  return config


@pytest.mark.parametrize('mod,message', [
    (dict(capacity=0.0), 'model.mod.capacity=0.0 is not allowed; allowed '
     'values: a number in (0, 1]'),
    (dict(capacity=1.5), 'model.mod.capacity=1.5 is not allowed'),
    (dict(predictor='oracle'), "model.mod.predictor='oracle' is not "
     "allowed; allowed values: 'mlp', 'router'"),
    (dict(decisions='causal'), "model.mod.decisions='causal' is not allowed"
     "; allowed values: 'topk', 'predictor'"),
    (dict(every=-1), 'model.mod.every=-1 is not allowed; allowed values: 0 '
     '(off)'),
    (dict(every=3), 'model.mod.every=3 makes no block an MoD block among '
     'model.num_layers=2'),
    (dict(aux_weight=-0.1), 'model.mod.aux_weight=-0.1 is not allowed'),
    (dict(predictor_hidden=0), 'model.mod.predictor_hidden=0 is not '
     'allowed'),
])
def test_bad_mod_keys_are_one_line_errors_naming_the_key(mod, message):
  with pytest.raises(ValueError) as info:
    config_lib.validate_config(_config(**mod))
  assert str(info.value).startswith(message), str(info.value)
  assert '\n' not in str(info.value)


def test_mod_is_refused_on_the_encoder_classifier():
  config = _config()
  config.model.task = 'classify'
  with pytest.raises(ValueError, match=r"^model.mod.every=2 applies to "
                     r"model.task='lm' only"):
    config_lib.validate_config(config)


def test_the_config_builds_an_mod_model():
  model = config_lib.build_model(_config())
  assert model.mod == mod_lib.ModOptions(every=2, capacity=0.125)
  assert model.mod.layers(model.num_layers) == (1,)
