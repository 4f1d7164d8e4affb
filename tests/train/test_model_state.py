"""Non-parameter model state ('moe_state' collections, e.g. the loss-free
balancing bias): outside the optimizer, updated by the training forward
pass, read by eval, saved in checkpoints, exact across resume.

The model is a toy defined here, so the test does not depend on any router.
"""

import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax.train import Checkpointer
from moejax.train import create_train_state
from moejax.train import make_eval_step
from moejax.train import make_train_step
from moejax.train import read_metrics
from moejax.train import train_and_evaluate
from moejax.train.run_spec import RunSpec
from moejax.train.metrics import strip_wall_clock
from tests.train import helpers

V = 8  # vocab
GAMMA = 0.1  # bias step


class _BiasedBigramLM(nn.Module):
  """logits[b, l] = table[tokens[b, l]] + bias, with `bias` [V] and `count`
  in the 'moe_state' collection. A training forward pass (deterministic=
  False) moves the bias like loss-free balancing moves its expert bias:
  bias += GAMMA * sign(1/V - freq), freq the batch's token frequencies
  [V]; `count` counts training forward passes."""

  @nn.compact
  def __call__(self, tokens, padding_mask=None, deterministic=True):
    del padding_mask
    table = self.param('table', nn.initializers.normal(1.0), (V, V))
    bias = self.variable('moe_state', 'bias', jnp.zeros, (V,), jnp.float32)
    count = self.variable('moe_state', 'count',
                          lambda: jnp.zeros((), jnp.int32))
    logits = table[tokens] + bias.value  # [B, L, V]
    if not deterministic and not self.is_initializing():
      freq = jnp.mean(jax.nn.one_hot(tokens, V), axis=(0, 1))  # [V]
      bias.value = bias.value + GAMMA * jnp.sign(1.0 / V - freq)
      count.value = count.value + 1
    zero = jnp.zeros((), jnp.float32)
    return logits, {'layers': {}, 'aux_loss': zero, 'z_loss': zero,
                    'drop_fraction': zero, 'max_violation': zero}


def _optimizer():
  return optax.adamw(0.1, weight_decay=0.1)


def test_state_is_outside_the_optimizer_and_updated_by_training_only():
  model, opt = _BiasedBigramLM(), _optimizer()
  state = create_train_state(model, opt, (2, 4), seed=0)
  assert set(state.model_state) == {'moe_state'}
  np.testing.assert_array_equal(state.model_state['moe_state']['bias'],
                                np.zeros(V))
  # AdamW keeps mu and nu of the params only (2 x the table), no bias.
  opt_shapes = sorted(x.shape for x in jax.tree.leaves(state.opt_state)
                      if x.ndim)
  assert opt_shapes == [(V, V), (V, V)]

  tokens = jnp.array([[0, 0, 1, 2, 5], [0, 3, 3, 3, 6]], jnp.int32)
  eval_step = make_eval_step(model)
  step = make_train_step(model, opt, seed=0)
  state, _ = step(state, tokens)
  # Inputs tokens[:, :-1] hold 0 x3, 1, 2, 3 x3 of 8: freq = [3, 1, 1, 3,
  # 0, 0, 0, 0] / 8, so sign(1/8 - freq) = [-1, 0, 0, -1, 1, 1, 1, 1].
  expected = GAMMA * np.array([-1, 0, 0, -1, 1, 1, 1, 1], np.float32)
  np.testing.assert_array_equal(state.model_state['moe_state']['bias'],
                                expected)
  assert int(state.model_state['moe_state']['count']) == 1
  # Eval reads the state (the bias shifts the logits) but never changes it.
  metrics = eval_step(state.params, tokens, state.model_state)
  without = eval_step(state.params, tokens,
                      {'moe_state': {'bias': jnp.zeros(V),
                                     'count': jnp.zeros((), jnp.int32)}})
  assert float(metrics['loss']) != float(without['loss'])
  state, _ = step(state, tokens)
  np.testing.assert_array_equal(state.model_state['moe_state']['bias'],
                                2 * expected)
  assert int(state.model_state['moe_state']['count']) == 2


class _Loader:
  """batch(t): B=2 sequences of L+1=5 tokens, a pure function of t."""
  batch_size, seq_len = 2, 4

  def __init__(self, sigterm_at=None):
    self._sigterm_at = sigterm_at

  def batch(self, t):
    if t == self._sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    rng = np.random.RandomState(t)
    return {'tokens': rng.randint(0, V, (2, 5)).astype(np.int32)}


EVAL = [{'tokens': np.arange(10, dtype=np.int32).reshape(2, 5) % V,
         'optimal_nll': np.full(2, np.nan)}]


def _run(workdir, loader):
  spec = RunSpec(workdir=str(workdir), steps=6, seed=0, log_every=1,
                 eval_every=3, checkpoint_every=2, keep_checkpoints=2,
                 progress_bar=False)
  return train_and_evaluate(_BiasedBigramLM(), spec, train_loader=loader,
                            eval_data=EVAL, optimizer=_optimizer())


def test_state_is_checkpointed_and_resume_is_exact(tmp_path):
  full = _run(tmp_path / 'full', _Loader())
  assert not full.preempted
  assert int(full.state.model_state['moe_state']['count']) == 6
  # SIGTERM while fetching batch 2 -> checkpoint at step 3, then resume.
  part = _run(tmp_path / 'part', _Loader(sigterm_at=2))
  assert part.preempted and part.step == 3
  assert helpers.checkpoint_steps(tmp_path / 'part') == [2, 3]
  restored = Checkpointer(str(tmp_path / 'part'), log=lambda m: None)
  saved = restored.restore(jax.eval_shape(lambda: part.state))
  restored.close()
  assert int(saved.model_state['moe_state']['count']) == 3
  resumed = _run(tmp_path / 'part', _Loader())
  # count 6 = 3 restored + 3 more: the state was restored, not re-made.
  assert int(resumed.state.model_state['moe_state']['count']) == 6
  helpers.assert_bitwise_equal(resumed.state, full.state)
  records = [read_metrics(os.path.join(tmp_path / name, 'metrics.jsonl'))
             for name in ('full', 'part')]
  assert strip_wall_clock(records[0]) == strip_wall_clock(records[1])
