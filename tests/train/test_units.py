"""Unit tests of the training pieces: optimizer, loss, metrics files."""

import io
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax.train import metrics as metrics_lib
from moejax.train import optim
from moejax.train import step as step_lib


def test_decay_mask_skips_norms_and_biases():
  params = {'dense': {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones(4)},
            'norm': {'scale': jnp.ones(3)},
            'experts': {'wi': jnp.ones((2, 3, 4))}}
  mask = optim.decay_mask(params)
  assert mask == {'dense': {'kernel': True, 'bias': False},
                  'norm': {'scale': False}, 'experts': {'wi': True}}


def test_decay_applies_to_matrices_only():
  params = {'w': jnp.ones((2, 2)), 'scale': jnp.ones(2)}
  opt = optim.make_optimizer(1.0, warmup_steps=0, total_steps=10,
                             weight_decay=0.5, grad_clip=1.0)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.update(zeros, opt.init(params), params)
  assert float(jnp.abs(updates['scale']).max()) == 0.0
  assert float(updates['w'][0, 0]) < 0.0  # decays towards 0


def test_lr_schedule_warmup_then_cosine():
  lr = optim.lr_schedule(2.0, warmup_steps=10, total_steps=110,
                         min_lr_ratio=0.1)
  assert float(lr(0)) == 0.0
  assert math.isclose(float(lr(5)), 1.0, rel_tol=1e-6)
  assert math.isclose(float(lr(10)), 2.0, rel_tol=1e-6)
  assert math.isclose(float(lr(60)), 1.1, rel_tol=1e-5)  # cosine midpoint
  assert math.isclose(float(lr(110)), 0.2, rel_tol=1e-5)


def test_clipping_bounds_the_update():
  params = {'w': jnp.zeros(4)}
  opt = optax.chain(optax.clip_by_global_norm(1.0))
  huge = {'w': jnp.full(4, 100.0)}
  updates, _ = opt.update(huge, opt.init(params))
  assert math.isclose(float(optax.tree.norm(updates)), 1.0, rel_tol=1e-5)


class _TableLM(nn.Module):
  """Bigram table model: logits[b, l] = table[tokens[b, l]]; no MoE."""
  vocab: int = 5

  @nn.compact
  def __call__(self, tokens, padding_mask=None, deterministic=True):
    del padding_mask, deterministic
    table = self.param('table', nn.initializers.normal(1.0),
                       (self.vocab, self.vocab))
    zero = jnp.zeros((), jnp.float32)
    return table[tokens], {'layers': {}, 'aux_loss': zero + 0.5,
                           'z_loss': zero + 2.0, 'drop_fraction': zero,
                           'max_violation': zero}


def test_loss_masks_padding_targets_and_adds_weighted_aux():
  model = _TableLM()
  tokens = jnp.array([[1, 2, 3, 0, 0], [4, 3, 2, 1, 0]], jnp.int32)
  params = model.init(jax.random.key(0), tokens[:, :-1])['params']
  loss, m = step_lib.compute_loss(params, model, tokens, deterministic=True,
                                  aux_loss_weight=0.1, z_loss_weight=0.01,
                                  pad_id=0)
  logp = jax.nn.log_softmax(params['table'][tokens[:, :-1]])
  nll = -np.take_along_axis(np.asarray(logp),
                            np.asarray(tokens[:, 1:])[..., None], -1)[..., 0]
  weights = np.asarray(tokens[:, 1:] != 0, np.float32)  # 5 real targets
  expected = (nll * weights).sum() / weights.sum()
  assert float(m['tokens']) == 5.0
  np.testing.assert_allclose(float(m['lm_loss']), expected, rtol=1e-6)
  np.testing.assert_allclose(float(loss), expected + 0.05 + 0.02, rtol=1e-6)


def test_step_rng_is_a_function_of_seed_and_step():
  a = jax.random.key_data(step_lib.step_rng(3, 7))
  b = jax.random.key_data(step_lib.step_rng(3, 7))
  c = jax.random.key_data(step_lib.step_rng(3, 8))
  assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  with open(path, 'w') as f:
    for s in (1, 2, 3, 3, 4):
      f.write(json.dumps({'step': s, 'train/loss': float(s)}) + '\n')
    f.write('{"step": 5, "train/lo')  # cut by a kill
  assert metrics_lib.truncate_metrics(path, 3) == 4
  assert [r['step'] for r in metrics_lib.read_metrics(path)] == [1, 2, 3, 3]


def test_progress_bar_and_plain_lines(capsys, monkeypatch):
  record = {'step': 2, 'train/loss': 1.5, 'train/tokens_per_sec': 10.0}
  plain = metrics_lib.Progress(total=4, start=0, use_bar=False)
  plain.advance(2)
  plain.log(record)
  plain.log({'step': 2, 'eval/loss': 1.25})
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith('step 2/4 train loss 1.5000 tok/s 10')
  assert out[1].startswith('step 2/4 eval loss 1.2500')
  stream = io.StringIO()
  monkeypatch.setattr('sys.stderr', stream)
  bar = metrics_lib.Progress(total=4, start=1, use_bar=True)
  bar.advance(2)
  bar.log(record)
  bar.close()
  assert '2/4' in stream.getvalue() and 'loss=1.5000' in stream.getvalue()
