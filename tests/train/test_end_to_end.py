"""A few-step run of each config's tiny variant through the CLI entry point."""

import glob
import json
import math
import os

import pytest

from experiments import train
from moejax.train import read_metrics
from tests.train import helpers
from tests.train.helpers import STEPS
from tests.train.helpers import small_args

TRAIN_KEYS = ('train/loss', 'train/lm_loss', 'train/aux_loss', 'train/z_loss',
              'train/drop_fraction', 'train/max_violation',
              'train/tokens_per_sec', 'train/grad_norm', 'train/param_norm',
              'train/learning_rate')
EVAL_KEYS = ('eval/loss', 'eval/excess_loss', 'eval/drop_fraction')
LAYER_KEYS = ('aux_loss', 'z_loss', 'max_violation', 'drop_fraction',
              'fully_dropped_fraction', 'router_entropy', 'top1_prob',
              'capacity', 'expert_load')



@pytest.mark.parametrize('config,num_experts', [('dense', 0), ('switch', 4),
                                                ('gshard', 4)])
def test_tiny_run_writes_everything(config, num_experts, data_dir, tmp_path,
                                    capsys, request):
  workdir = str(tmp_path / config)
  assert train.main(small_args(config, workdir, data_dir)) == 0
  out, err = capsys.readouterr()
  assert 'params total' in out and 'FLOPs/token' in out
  # Captured, stderr is no terminal: plain progress lines, a record per step
  # and the evals at 20 and 40 after their step's record; no bar.
  helpers.assert_plain_progress(out + err, [
      (kind, s) for s in range(1, STEPS + 1)
      for kind in (('train', 'eval') if s in (20, 40) else ('train',))])

  with open(os.path.join(workdir, 'config.json')) as f:
    resolved = json.load(f)
  assert resolved['model']['moe']['num_experts'] == num_experts
  assert resolved['data']['data_dir'] == data_dir
  assert resolved['train']['steps'] == STEPS

  records = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  train_recs = [r for r in records if 'train/loss' in r]
  eval_recs = [r for r in records if 'eval/loss' in r]
  assert [r['step'] for r in train_recs] == list(range(1, STEPS + 1))
  assert [r['step'] for r in eval_recs] == [20, 40]
  for r in train_recs:
    assert set(TRAIN_KEYS) <= set(r), set(TRAIN_KEYS) - set(r)
    assert all(math.isfinite(r[k]) for k in TRAIN_KEYS)
    for block in ('block_0', 'block_1'):
      for key in LAYER_KEYS:
        assert (f'moe/{block}/{key}' in r) == (num_experts > 0), key
    if num_experts:
      load = r['moe/block_0/expert_load']
      assert isinstance(load, list) and len(load) == num_experts
      assert math.isclose(sum(load), 1.0, rel_tol=1e-4)
  for r in eval_recs:
    assert set(EVAL_KEYS) <= set(r)
    assert 0 < r['eval/excess_loss'] < r['eval/loss']
  if num_experts == 0:
    assert train_recs[-1]['train/aux_loss'] == 0.0

  ckpts = sorted(int(os.path.basename(p)) for p in
                 glob.glob(os.path.join(workdir, 'checkpoints', '*'))
                 if os.path.basename(p).isdigit())
  assert ckpts == [30, 40]  # keep_checkpoints=2
  assert glob.glob(os.path.join(workdir, 'tensorboard',
                                'events.out.tfevents.*'))
  assert os.path.getsize(os.path.join(workdir, 'plots', 'loss.png')) > 0
  has_load_plot = os.path.exists(os.path.join(workdir, 'plots',
                                              'expert_load.png'))
  assert has_load_plot == (num_experts > 0)
  if config == 'gshard':
    # Determinism: the same config and seed as conftest's reference run (in
    # another work dir) give bitwise the same params and metrics.
    reference = request.getfixturevalue('reference')
    helpers.assert_same_run(
        helpers.final_state(small_args(config, workdir, data_dir)),
        reference.result())
