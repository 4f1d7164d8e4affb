"""Fine-tuning masks (moejax.train.finetune through the project's own
make_optimizer) and sparse upcycling (moejax.train.upcycle)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.models import TransformerLM
from moejax.train import finetune, optim, upcycle

E, D, F = 3, 4, 5


def _params():
  """A small MoE-like param tree with unequal values per leaf."""
  rng = np.random.default_rng(0)
  draw = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
      'embed': {'embedding': draw(7, D)},
      'block_0': {'attn': {'query': draw(D, 2, 2)},
                  'attn_norm': {'scale': draw(D)},
                  'ffn': {'router': {'kernel': draw(D, E)},
                          'experts': {'wi': draw(E, D, F),
                                      'wo': draw(E, F, D),
                                      'wi_lora_a': draw(E, D, 2),
                                      'wi_lora_b': draw(E, 2, F)}}},
  }


def _labels(plan):
  flat = jax.tree_util.tree_flatten_with_path(
      finetune.param_labels(_params(), plan))[0]
  return {finetune.path_name(p): v for p, v in flat}


def test_labels_of_each_plan():
  labels = _labels(finetune.FinetunePlan(freeze_router=True,
                                         freeze=('block_0/attn.*',)))
  assert labels['block_0/ffn/router/kernel'] == 'frozen'
  assert labels['block_0/attn/query'] == 'frozen'
  assert labels['block_0/attn_norm/scale'] == 'frozen'  # 'attn.*' matches
  assert labels['block_0/ffn/experts/wi'] == 'train'
  assert labels['embed/embedding'] == 'train'
  lora = _labels(finetune.FinetunePlan(lora_only=True))
  assert {k for k, v in lora.items() if v == 'train'} == {
      'block_0/ffn/experts/wi_lora_a', 'block_0/ffn/experts/wi_lora_b'}
  esft = _labels(finetune.FinetunePlan(expert_rows={'block_0/ffn': (1,)}))
  assert {k for k, v in esft.items() if v == 'rows'} == {
      f'block_0/ffn/experts/{n}' for n in
      ('wi', 'wo', 'wi_lora_a', 'wi_lora_b')}
  assert esft['block_0/ffn/router/kernel'] == 'frozen'


@pytest.mark.parametrize('counts, fraction, want', [
    # counts 5, 3, 1, 1 of 10: shares 0.5, 0.8, 0.9, 1.0 by decreasing count.
    ([5, 1, 3, 1], 0.8, (0, 2)),
    ([5, 1, 3, 1], 0.5, (0,)),
    # 0.81 needs a third expert: the tie 1 = 1 goes to the lower id (1).
    ([5, 1, 3, 1], 0.81, (0, 1, 2)),
    ([5, 1, 3, 1], 1.0, (0, 1, 2, 3)),
    ([0, 0, 9, 1], 0.9, (2,)),  # 9 / 10 = 0.9 exactly
])
def test_esft_select_hand_cases(counts, fraction, want):
  assert finetune.esft_select(np.array(counts), fraction) == want


def _train(plan, steps=3, weight_decay=0.1):
  """`steps` updates of the project's optimizer with a plan; returns
  (params before, params after, optimizer state)."""
  params = _params()
  opt = optim.make_optimizer(1e-2, 0, 10, weight_decay=weight_decay,
                             grad_clip=1.0, plan=plan)
  state = opt.init(params)
  new, update = params, jax.jit(opt.update)
  for i in range(steps):
    grads = jax.tree.map(lambda x, i=i: jnp.cos(x * (i + 1)) + 0.5, new)
    updates, state = update(grads, state, new)
    new = optax.apply_updates(new, updates)
  return params, new, state


def _state_leaves(state):
  return {finetune.path_name(p).split('/mu/')[-1]: x.shape
          for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
          if '/mu/' in finetune.path_name(p)}


def test_frozen_params_stay_bitwise_and_get_no_state():
  plan = finetune.FinetunePlan(freeze_router=True, freeze=('embed/.*',))
  before, after, state = _train(plan)
  same = lambda get: np.array_equal(get(before), get(after))
  assert same(lambda p: p['block_0']['ffn']['router']['kernel'])
  assert same(lambda p: p['embed']['embedding'])
  assert not same(lambda p: p['block_0']['ffn']['experts']['wi'])
  assert not same(lambda p: p['block_0']['attn']['query'])
  mu = _state_leaves(state)
  assert 'block_0/ffn/router/kernel' not in mu and 'embed/embedding' not in mu
  assert mu['block_0/ffn/experts/wi'] == (E, D, F)


def test_esft_rows_train_and_the_rest_stays_bitwise():
  # Weight decay > 0: an update mask applied to AdamW's state only would
  # still decay the frozen rows.
  plan = finetune.FinetunePlan(expert_rows={'block_0/ffn': (0, 2)})
  before, after, state = _train(plan, weight_decay=0.5)
  wi0, wi1 = before['block_0']['ffn']['experts']['wi'], after['block_0'][
      'ffn']['experts']['wi']
  np.testing.assert_array_equal(wi0[1], wi1[1])  # expert 1 not chosen
  assert not np.array_equal(wi0[0], wi1[0])
  assert not np.array_equal(wi0[2], wi1[2])
  np.testing.assert_array_equal(before['block_0']['attn']['query'],
                                after['block_0']['attn']['query'])
  assert _state_leaves(state)['block_0/ffn/experts/wi'] == (2, D, F)


def test_clipping_norm_counts_only_what_trains():
  # The trained leaves' updates equal plain training of those leaves alone:
  # frozen gradients (here large) do not enter the global norm.
  plan = finetune.FinetunePlan(freeze=('embed/.*', 'block_0/attn/.*',
                                       'block_0/attn_norm/.*'))
  params = _params()
  grads = jax.tree.map(lambda x: 3.0 * jnp.ones_like(x), params)
  grads['embed']['embedding'] = 1e3 * jnp.ones_like(
      grads['embed']['embedding'])
  opt = optim.make_optimizer(1e-2, 0, 10, grad_clip=1.0, plan=plan)
  got, _ = opt.update(grads, opt.init(params), params)
  sub = lambda t: {'ffn': t['block_0']['ffn']}
  plain = optim.make_optimizer(1e-2, 0, 10, grad_clip=1.0)
  want, _ = plain.update(sub(grads), plain.init(sub(params)), sub(params))
  jax.tree.map(np.testing.assert_allclose, sub(got), want)
  np.testing.assert_array_equal(got['embed']['embedding'], 0.0)


def test_no_plan_is_exactly_plain_training():
  params = _params()
  a = optim.make_optimizer(1e-2, 5, 10)
  b = optim.make_optimizer(1e-2, 5, 10, plan=finetune.FinetunePlan())
  assert (jax.tree.structure(a.init(params)) ==
          jax.tree.structure(b.init(params)))


@pytest.mark.parametrize('plan, needle', [
    (finetune.FinetunePlan(freeze=('nothing/.*',)), "'nothing/.*' matches"),
    (finetune.FinetunePlan(freeze=('(',)), 'not a regular expression'),
    (finetune.FinetunePlan(freeze=('.*',)), 'freeze every param'),
    (finetune.FinetunePlan(expert_rows={'block_9/ffn': (0,)}),
     "no expert bank at 'block_9/ffn'"),
    (finetune.FinetunePlan(expert_rows={'block_0/ffn': (3,)}),
     'non-empty subset of [0, 3)'),
])
def test_check_plan_names_the_problem(plan, needle):
  with pytest.raises(ValueError) as e:
    finetune.check_plan(_params(), plan)
  assert needle in str(e.value)


# ------------------------------------------------------------------ upcycle
def _dense_and_moe(**moe):
  kw = dict(num_layers=2, d_model=8, num_heads=2, d_ff=16, vocab_size=32,
            activation='swiglu')
  dense = TransformerLM(**kw)
  moe_model = TransformerLM(**kw, moe=dict(
      num_experts=4, top_k=2, capacity_factor=None,
      eval_capacity_factor=None, **moe))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 32)
  return dense, moe_model, tokens


def _upcycled(renormalize=True, logits=False, **options):
  """(dense params, upcycled params, dense logits, MoE logits); the logits
  are None unless `logits`."""
  dense, moe_model, tokens = _dense_and_moe(renormalize=renormalize)
  dense_params = dense.init(jax.random.key(0), tokens)['params']
  target = moe_model.init(jax.random.key(5), tokens)['params']
  params = upcycle.upcycle_params(dense_params, target, **options)
  if not logits:
    return dense_params, params, None, None
  want = dense.apply({'params': dense_params}, tokens)[0]
  got = moe_model.apply({'params': params}, tokens)[0]
  return dense_params, params, np.asarray(want), np.asarray(got)


def test_upcycled_moe_computes_the_dense_function():
  # Renormalised top-2 gates sum to 1 and experts are equal copies:
  # sum_k g_k FFN(x) = FFN(x), so the logits match to float rounding.
  dense, params, want, got = _upcycled(logits=True)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  bank = params['block_0']['ffn']['experts']['wi_0']
  for e in range(4):
    np.testing.assert_array_equal(bank[e], dense['block_0']['ffn']['wi_0'])
  np.testing.assert_array_equal(params['embed']['embedding'],
                                dense['embed']['embedding'])


def test_upcycling_without_renormalised_gates_changes_the_function():
  _, _, want, got = _upcycled(renormalize=False, logits=True)
  assert np.abs(got - want).max() > 1e-3


def test_zero_router_routes_uniformly():
  _, params, _, _ = _upcycled(router='zero')
  assert not np.any(params['block_1']['ffn']['router']['kernel'])


def test_noise_makes_experts_differ():
  dense, params, want, got = _upcycled(noise=0.1, logits=True)
  bank = params['block_0']['ffn']['experts']['wi_1']
  assert not np.array_equal(bank[0], bank[1])
  assert np.abs(got - want).max() > 1e-4


def test_drop_upcycling_redraws_the_same_units_of_each_expert():
  # F = 16, ratio 0.25: round(4.0) = 4 hidden units per expert re-drawn, the
  # same ones in wi_0, wi_1 (columns) and wo (rows), different per expert.
  dense, params, _, _ = _upcycled(drop_ratio=0.25)
  d, p = dense['block_0']['ffn'], params['block_0']['ffn']['experts']
  units = []
  for e in range(4):
    cols = {n: set(np.flatnonzero(np.any(p[n][e] != d[n], axis=0)))
            for n in ('wi_0', 'wi_1')}
    rows = set(np.flatnonzero(np.any(p['wo'][e] != d['wo'], axis=1)))
    assert cols['wi_0'] == cols['wi_1'] == rows and len(rows) == 4
    units.append(frozenset(rows))
  assert len(set(units)) > 1


@pytest.mark.parametrize('change, needle', [
    (lambda s: s['block_0']['ffn'].pop('wo'),
     'has no counterpart block_0/ffn/wo'),
    (lambda s: s.update(extra={'w': np.zeros(3)}),
     'the source param extra/w has no place'),
    (lambda s: s['block_0']['ffn'].update(wo=np.zeros((3, 8))),
     'block_0/ffn/wo has shape (3, 8)'),
])
def test_upcycle_refuses_a_source_that_does_not_fit(change, needle):
  dense, moe_model, tokens = _dense_and_moe(renormalize=True)
  source = jax.tree.map(np.asarray, dense.init(jax.random.key(0),
                                               tokens)['params'])
  source = jax.tree.map(lambda x: x, dict(source))
  source['block_0'] = {k: dict(v) for k, v in source['block_0'].items()}
  change(source)
  target = moe_model.init(jax.random.key(5), tokens)['params']
  with pytest.raises(upcycle.UpcycleError) as e:
    upcycle.upcycle_params(source, target)
  assert needle in str(e.value)
