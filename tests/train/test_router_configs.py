"""The router configs (deepseek, expert_choice, soft_moe) train end to end;
the loss-free balancing bias is model state that survives a restore."""

import os
import shutil

import jax
import numpy as np
import pytest

from experiments import train
from tests.train import helpers
from tests.train.helpers import small_args

STEPS = 10


def _args(config, workdir, data_dir):
  return small_args(config, str(workdir), data_dir, train__steps=STEPS,
                    train__eval_every=STEPS, train__checkpoint_every=5)


@pytest.mark.parametrize('config', ['deepseek', 'expert_choice', 'soft_moe'])
def test_router_config_trains(config, data_dir, tmp_path):
  argv = _args(config, tmp_path / config, data_dir)
  assert train.main(argv) == 0
  state, records = helpers.final_state(argv)
  last = [r for r in records if 'eval/loss' in r][-1]
  assert last['step'] == STEPS and np.isfinite(last['eval/loss'])
  if config == 'deepseek':
    assert 'eval/excess_loss' in last  # a causal LM on the mixture
    bias = state.model_state['moe_state']['block_0']['ffn']['router']['bias']
    # 2E = 8 fine-grained experts; after 10 updates of +-0.01 each entry
    # is a multiple of 0.01 in [-0.1, 0.1], and not all zero.
    assert bias.shape == (8,)
    assert np.abs(np.asarray(bias)).max() > 0
    np.testing.assert_allclose(np.asarray(bias) * 100,
                               np.round(np.asarray(bias) * 100), atol=1e-4)
    # The bias is state: neither a parameter nor in the optimizer state.
    for tree in (state.params, state.opt_state):
      names = [jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(tree)[0]]
      assert not any('bias' in n for n in names)
  else:  # encoder classifiers of the 8 domains
    assert 0.0 <= last['eval/accuracy'] <= 1.0
    assert 'eval/excess_loss' not in last


def test_loss_free_bias_survives_restore(data_dir, tmp_path):
  argv = _args('deepseek', tmp_path / 'run', data_dir)
  assert train.main(argv) == 0
  want = helpers.final_state(argv)  # the uninterrupted run's step 10
  # Lose the last checkpoint: the re-run restores step 5 (bias included)
  # and must redo steps 6-10 exactly.
  shutil.rmtree(os.path.join(str(tmp_path / 'run'), 'checkpoints',
                             str(STEPS)))
  assert helpers.checkpoint_steps(str(tmp_path / 'run')) == [5]
  assert train.main(argv) == 0
  got = helpers.final_state(argv)
  # The bias moved, so restoring a fresh (zero) bias would fail the check.
  assert any(np.any(np.asarray(x) != 0)
             for x in jax.tree_util.tree_leaves(want[0].model_state))
  helpers.assert_bitwise_equal(got[0].model_state, want[0].model_state)
  helpers.assert_bitwise_equal(got[0].params, want[0].params)


PLUGIN_CONFIG = '''
from configs import switch
from moejax import routers
from tests import test_router_registry

# A config is Python: importing (here: registering) a router makes its
# name a valid model.moe.router for this run.
if 'hash' not in routers.names():
  routers.register(test_router_registry.HASH)


def get_config(arg=None):
  config = switch.get_config(arg)
  config.model.moe.router = 'hash'
  return config
'''


def test_a_router_registered_by_the_config_file_trains(data_dir, tmp_path):
  from moejax import routers  # pylint: disable=import-outside-toplevel
  config = tmp_path / 'hash_router.py'
  config.write_text(PLUGIN_CONFIG)
  argv = _args('switch', tmp_path / 'run', data_dir)
  argv[0] = f'--config={config}:tiny'
  try:
    assert train.main(argv) == 0
    state, records = helpers.final_state(argv)
  finally:
    if 'hash' in routers.names():
      routers.unregister('hash')
  last = [r for r in records if 'eval/loss' in r][-1]
  assert last['step'] == STEPS and np.isfinite(last['eval/loss'])
  # The hash router's own params: router/kernel [D, E] (no null experts).
  kernel = state.params['block_0']['ffn']['router']['kernel']
  assert kernel.shape == (32, 4)
