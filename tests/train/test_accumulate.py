"""Gradient accumulation (train.grad_accum_steps, moejax.train.accumulate):
M micro-batches give the whole batch's update, routing statistics and
model state, up to float rounding.

The reference is the same train step without accumulation on the whole
batch. SGD with learning rate 1 makes the new params the old ones minus
the gradient, so comparing params compares gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.models.transformer import TransformerLM
from moejax.train import accumulate
from moejax.train import make_train_step
from moejax.train import train_and_evaluate
from moejax.train.run_spec import RunSpec
from moejax.train.state import TrainState

B, L, V = 4, 8, 16
PAD = 0


def _tokens(padded: bool) -> jax.Array:
  """[B, L + 1] tokens in [1, V); with padding, rows 1 and 3 end early (a
  different number of valid tokens in each micro-batch)."""
  tokens = jax.random.randint(jax.random.key(3), (B, L + 1), 1, V)
  if padded:
    tokens = tokens.at[1, 6:].set(PAD).at[3, 3:].set(PAD)
  return tokens


def _step_result(moe: dict, micro: int, tokens, pad_id=None):
  model = TransformerLM(vocab_size=V, num_layers=1, d_model=16, num_heads=2,
                        d_ff=32, moe=dict(num_experts=4, **moe))
  variables = model.init(jax.random.key(0), tokens[:, :-1])
  opt = optax.sgd(1.0)
  state = TrainState(
      step=jnp.zeros((), jnp.int32), params=variables['params'],
      opt_state=opt.init(variables['params']),
      model_state={k: v for k, v in variables.items() if k != 'params'})
  step = make_train_step(model, opt, seed=0, aux_loss_weight=0.3,
                         z_loss_weight=0.1, pad_id=pad_id,
                         grad_accum_steps=micro)
  start = jax.tree.map(np.asarray, state.params)  # the step donates state
  return (start, *step(state, tokens))


def _assert_trees_close(got, want, atol, what):
  flat_want = jax.tree_util.tree_leaves_with_path(want)
  assert len(jax.tree.leaves(got)) == len(flat_want), what
  for (path, w), g in zip(flat_want, jax.tree.leaves(got)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=atol,
                               err_msg=f'{what} {jax.tree_util.keystr(path)}')


def test_micro_batches_are_consecutive_rows():
  x = jnp.arange(12).reshape(4, 3)
  np.testing.assert_array_equal(accumulate.micro_batches(x, 2),
                                [[[0, 1, 2], [3, 4, 5]],
                                 [[6, 7, 8], [9, 10, 11]]])
  with pytest.raises(ValueError, match='grad_accum_steps=3 .* batch size 4'):
    accumulate.micro_batches(x, 3)


def test_group_shares_by_hand():
  # Per-sequence groups, L = 5: rows (3 valid, 0 valid | 2 valid, 5 valid)
  # in M = 2 micro-batches: 1 and 2 non-empty groups -> (1/3, 2/3), where
  # the valid tokens' shares would be (3/10, 7/10).
  valid = np.arange(5)[None, :] < np.array([3, 0, 2, 5])[:, None]
  valid = jnp.asarray(valid.reshape(2, 2, 5))
  np.testing.assert_allclose(accumulate.group_shares(valid, {}),
                             [1 / 3, 2 / 3])
  # Groups of the 2 sequences of a micro-batch: one non-empty group each.
  pairs = dict(group_sequences=2, group_order='position')
  np.testing.assert_allclose(accumulate.group_shares(valid, pairs),
                             [0.5, 0.5])
  # -1: a micro-batch's rows are one group (the layer sees B/M rows).
  whole = dict(group_sequences=-1, group_order='position')
  np.testing.assert_allclose(accumulate.group_shares(valid, whole),
                             [0.5, 0.5])
  # Chunks of 5 tokens = one per sequence, the same as per-sequence groups.
  np.testing.assert_allclose(
      accumulate.group_shares(valid, dict(group_size=5)), [1 / 3, 2 / 3])


CASES = {
    # Switch: per-group balance loss, capacity drops, groups of 2 whole
    # sequences (a micro-batch of 2 rows holds exactly one group).
    'group_scope_drops_position_groups': (
        dict(capacity_factor=0.5, group_size=2 * L, group_order='position'),
        2, False),
    # Switch's per-group loss with padding: one group per sequence, so each
    # micro-batch holds half the groups (weight 1/2) but 14 / 25 and 11 / 25
    # of the valid tokens (rows 1 and 3 end early); weighting the balance
    # loss by tokens would give another loss.
    'group_scope_padded_sequences': (dict(capacity_factor=0.5), 2, True),
    # DeepSeek-style: sigmoid scores, top-2, the loss-free bias updated once
    # from the whole batch's counts; global-batch balancing ('batch': f of
    # the whole batch, P of each micro-batch, weighted by its valid tokens,
    # exact with padding); 4 micro-batches of one row, each with another
    # number of valid tokens. (Each micro-batch's own f would give another
    # loss: tests/test_losses.py hand case.)
    'loss_free_bias_batch_scope': (
        dict(score_fn='sigmoid', top_k=2, bias_update_rate=0.05,
             aux_loss_scope='batch', capacity_factor=1.0, priority='token'),
        4, True),
    # ReMoE: the L1 controller moves lambda once, from the whole batch's
    # density of active gates, and the balanced penalty's f is the whole
    # batch's (both from the counting pass); lambda_0 = 0.5 so the penalty
    # weighs in the gradient. With padding, 2 micro-batches.
    'remoe_balanced_l1': (
        dict(router='relu', relu_l1_balance=True, relu_l1_init=0.5,
             capacity_factor=None, eval_capacity_factor=None), 2, True),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_accumulated_step_equals_the_whole_batch_step(name):
  moe, micro, padded = CASES[name]
  tokens = _tokens(padded)
  pad_id = PAD if padded else None
  start, want, m_want = _step_result(moe, 1, tokens, pad_id)
  _, got, m_got = _step_result(moe, micro, tokens, pad_id)
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(want.params), jax.tree.leaves(start)))
  assert moved > 1e-2  # the step really moved the params
  _assert_trees_close(got.params, want.params, 2e-6, 'params')
  _assert_trees_close(got.model_state, want.model_state, 0, 'model state')
  for key in ('loss', 'lm_loss', 'aux_loss', 'z_loss', 'nll_sum', 'tokens',
              'grad_norm'):
    np.testing.assert_allclose(m_got[key], m_want[key], rtol=2e-6,
                               err_msg=key)
  router = want.model_state.get('moe_state', {}).get('block_0', {}).get(
      'ffn', {}).get('router', {})
  if 'bias_update_rate' in moe:  # the bias moved, by the batch's counts
    assert float(jnp.abs(router['bias']).max()) > 0
  if 'relu_l1_init' in moe:  # lambda moved (x 1.2 or / 1.2)
    assert abs(float(router['l1_coeff']) - moe['relu_l1_init']) > 0.05


def test_bad_grad_accum_steps_is_refused():
  with pytest.raises(ValueError, match='grad_accum_steps=0'):
    make_train_step(TransformerLM(vocab_size=V, num_layers=1, d_model=8,
                                  num_heads=1, d_ff=8), optax.sgd(1.0),
                    seed=0, grad_accum_steps=0)


class _Loader:
  """B=4 sequences of L+1=9 tokens, a pure function of t."""
  batch_size, seq_len = B, L

  def batch(self, t):
    rng = np.random.RandomState(t)
    return {'tokens': rng.randint(1, V, (B, L + 1)).astype(np.int32)}


def test_run_spec_reaches_the_train_step(tmp_path):
  # RunSpec.grad_accum_steps is what the trainer's step splits the batch
  # by: 3 does not divide the loader's batch of 4.
  spec = RunSpec(workdir=str(tmp_path / 'run'), steps=1, grad_accum_steps=3,
                 progress_bar=False)
  model = TransformerLM(vocab_size=V, num_layers=1, d_model=8, num_heads=1,
                        d_ff=8)
  evals = [{'tokens': np.ones((B, L + 1), np.int32),
            'optimal_nll': np.full(B, np.nan)}]
  with pytest.raises(ValueError, match='grad_accum_steps=3 .* batch size 4'):
    train_and_evaluate(model, spec, train_loader=_Loader(), eval_data=evals,
                       optimizer=optax.sgd(0.1))
