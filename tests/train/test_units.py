"""Unit tests of the training pieces: optimizer, loss, metrics files."""

import io
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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


def _flags_of(metrics, grads):
  flags = step_lib.finite_flags(metrics, grads, params={'w': jnp.ones(2)},
                                model_state={})
  return jax.device_get(flags)


def test_nonfinite_report_names_the_first_layer_in_forward_order():
  nan, one = jnp.float32(jnp.nan), jnp.float32(1.0)
  metrics = {'loss': nan, 'moe/block_2/aux_loss': one,
             'moe/block_2/z_loss': jnp.float32(jnp.inf),
             'moe/block_10/aux_loss': nan, 'moe/block_10/z_loss': nan,
             'moe/block_0/expert_load': jnp.array([0.5, 0.5])}
  grads = {'block_2': {'router': {'kernel': jnp.array([1.0, nan])}},
           'embed': {'embedding': jnp.ones(3)}}
  flags = _flags_of(metrics, grads)
  assert not flags['all_finite'] and flags['finite/moe/block_0/expert_load']
  report = step_lib.nonfinite_report(7, flags, loss=float('nan'))
  lines = report.split('\n')
  assert lines[0] == ('non-finite values in the update to step 7 (train '
                      'batch 6) (loss=nan).')
  # block_2 comes before block_10 (natural order, not string order).
  assert lines[1] == ('First non-finite MoE layer (forward order): block_2: '
                      'z_loss (router logits); later ones too: block_10.')
  assert lines[2] == ('Non-finite gradients in 1 of 2 param arrays: '
                      'block_2/router/kernel.')
  assert 'Non-finite: the loss.' in lines


def test_nonfinite_gradient_with_finite_loss_and_layers():
  metrics = {'loss': jnp.float32(2.0), 'moe/block_0/z_loss': jnp.float32(1.)}
  grads = {'a': jnp.ones(2), 'b': jnp.array([jnp.inf])}
  flags = _flags_of(metrics, grads)
  assert not flags['all_finite'] and flags['finite/loss']
  report = step_lib.nonfinite_report(3, flags)
  assert "Every MoE layer's router logits and aux losses were finite." in (
      report)
  assert 'Non-finite gradients in 1 of 2 param arrays: b.' in report
  assert bool(_flags_of(metrics, {'a': jnp.ones(2)})['all_finite'])


def test_config_diff_lists_changed_and_new_keys():
  from experiments import workdir_config  # pylint: disable=g-import-not-at-top
  stored = {'seed': 0, 'train': {'steps': 10, 'lr': 1.0},
            'model': {'tie_embeddings': True}}
  new = {'seed': 0, 'train': {'steps': 20, 'lr': 1},  # 1 == 1.0: same
         'model': {'tie_embeddings': 1,  # 1 is not True for a bool key
                   'moe': {'allow_noncausal_routing': False,  # new, default
                           'z_loss_weight': 0.5}}}  # new, not the default
  assert workdir_config.config_diff(stored, new) == [
      ('model.moe.z_loss_weight', '<absent>', 0.5),
      ('model.tie_embeddings', True, 1),
      ('train.steps', 10, 20)]


def test_checkpoint_crc_detects_changed_bytes(tmp_path):
  from moejax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from moejax.train.state import TrainState  # pylint: disable=g-import-not-at-top
  logs = []
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=3,
                                       log=logs.append)
  for step in (1, 2):
    checkpointer.save(TrainState(step=jnp.int32(step),
                                 params={'w': jnp.arange(4.0) * step},
                                 opt_state=(), model_state={}))
  abstract = jax.eval_shape(lambda: TrainState(
      step=jnp.int32(0), params={'w': jnp.zeros(4)}, opt_state=(),
      model_state={}))
  assert float(checkpointer.restore(abstract, 2).params['w'][1]) == 2.0
  # Record a different CRC for checkpoint 2: its bytes no longer match.
  record = tmp_path / 'checkpoints' / '2' / 'integrity' / 'metadata'
  crcs = json.loads(record.read_text())
  assert [path for path, _ in crcs['crc32']] == ['.step', ".params['w']"]
  crcs['crc32'][1][1] ^= 1
  record.write_text(json.dumps(crcs))
  with pytest.raises(ckpt_lib.CheckpointCorruptError,
                     match=r"leaf \.params\['w'\] has CRC-32"):
    checkpointer.restore(abstract, 2)
  state = checkpointer.restore_latest_good(abstract)
  assert int(state.step) == 1 and checkpointer.all_steps() == [1]
  assert (tmp_path / 'bad_checkpoints' / '2').is_dir()
  assert any('moved the bad checkpoint 2' in m for m in logs)
  checkpointer.close()
