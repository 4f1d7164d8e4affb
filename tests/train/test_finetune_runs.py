"""Upcycling and fine-tuning runs through experiments.train (the init and
finetune config blocks) and the LoRA merge of experiments.convert."""

import json
import os

import jax
import numpy as np
import pytest

from experiments import config_lib
from experiments import convert
from experiments import train
from experiments import workdir_config
from moejax.train import finetune
from moejax.train import init_source
from tests.train import helpers

SHORT = dict(train__steps=4, train__warmup_steps=1, train__eval_every=4,
             train__checkpoint_every=4)


def _params(workdir):
  """{path: array} of the newest checkpoint's params (its own tree)."""
  _, variables = init_source.restore_init_variables(
      workdir, init_source.saved_abstract(workdir))
  return {finetune.path_name(p): np.asarray(x) for p, x in
          jax.tree_util.tree_flatten_with_path(variables['params'])[0]}


def _run(config, workdir, data_dir, *extra, **overrides):
  argv = helpers.small_args(config, workdir, data_dir, **{**SHORT,
                                                          **overrides})
  return train.main(argv + list(extra))


@pytest.fixture(scope='module')
def dense_run(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp('dense') / 'run')
  assert _run('dense', workdir, data_dir) == 0
  return workdir


@pytest.fixture(scope='module')
def upcycled(tmp_path_factory, data_dir, dense_run):
  """The dense run upcycled (configs/upcycle.py) and trained 4 steps; its
  captured stdout."""
  workdir = str(tmp_path_factory.mktemp('upcycled') / 'run')
  import contextlib, io  # pylint: disable=g-import-not-at-top,multiple-import
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert _run('upcycle', workdir, data_dir, '--init_from', dense_run) == 0
  return workdir, out.getvalue()


def test_upcycling_preserves_the_dense_function_then_trains(upcycled,
                                                            dense_run):
  workdir, out = upcycled
  assert 'the dense function is preserved' in out, out
  params, dense = _params(workdir), _params(dense_run)
  # Trained 4 steps: the experts moved away from the dense FFN copies.
  bank = params['block_0/ffn/experts/wi']
  assert bank.shape[0] == 4 and not np.array_equal(
      bank[0], dense['block_0/ffn/wi'])


def _tuned(upcycled, data_dir, tmp_path, *extra, **overrides):
  """Fine-tunes the upcycled run (same model, init.upcycle=False)."""
  source, _ = upcycled
  workdir = str(tmp_path / 'tuned')
  rc = _run('upcycle', workdir, data_dir, '--init_from', source,
            '--config.init.upcycle=False', *extra, **overrides)
  return rc, workdir, _params(source)


def test_frozen_router_and_pattern_stay_bitwise(upcycled, data_dir,
                                                tmp_path, capsys):
  rc, workdir, source = _tuned(
      upcycled, data_dir, tmp_path, '--config.finetune.freeze_router=True',
      "--config.finetune.freeze=['block_0/attn/.*']")
  assert rc == 0
  assert 'params train' in capsys.readouterr().out
  tuned = _params(workdir)
  for name in tuned:
    frozen = 'router' in name or name.startswith('block_0/attn/')
    assert np.array_equal(tuned[name], source[name]) == frozen, name


def test_esft_trains_only_the_chosen_experts_and_resumes(upcycled, data_dir,
                                                         tmp_path, capsys):
  esft = ('--config.finetune.train_experts=topk_used',
          '--config.finetune.esft_fraction=0.5')
  rc, workdir, source = _tuned(upcycled, data_dir, tmp_path, *esft)
  assert rc == 0
  chosen = json.load(open(os.path.join(workdir, 'esft_experts.json')))
  tuned = _params(workdir)
  for layer, record in chosen['layers'].items():
    counts = np.array(record['counts'])
    assert list(record['experts']) == list(
        finetune.esft_select(counts, 0.5))
    assert len(record['experts']) < 4  # half of the tokens: not all
    for e in range(4):
      moved = not np.array_equal(tuned[f'{layer}/experts/wo'][e],
                                  source[f'{layer}/experts/wo'][e])
      assert moved == (e in record['experts']), (layer, e)
  for name in tuned:
    if '/experts/' not in name:
      assert np.array_equal(tuned[name], source[name]), name
  # A resume rebuilds the optimizer from esft_experts.json ...
  assert _tuned(upcycled, data_dir, tmp_path, *esft, '--override',
                train__steps=5)[0] == 0
  # ... and refuses without it.
  os.remove(os.path.join(workdir, 'esft_experts.json'))
  capsys.readouterr()
  assert _tuned(upcycled, data_dir, tmp_path, *esft, '--override',
                train__steps=6)[0] == 2
  assert 'esft_experts.json' in capsys.readouterr().err


def test_lora_trains_adapters_only_and_merges(upcycled, data_dir, tmp_path):
  rc, workdir, source = _tuned(upcycled, data_dir, tmp_path,
                               '--config.finetune.lora_rank=2')
  assert rc == 0
  tuned = _params(workdir)
  adapters = [n for n in tuned if finetune.is_lora(n)]
  assert adapters and all(n.startswith(('block_0/ffn/experts/',
                                         'block_1/ffn/experts/'))
                          for n in adapters)
  for name in tuned:
    if not finetune.is_lora(name):
      assert np.array_equal(tuned[name], source[name]), name
  assert any(np.any(tuned[n]) for n in adapters if n.endswith('_lora_b'))
  merged = str(tmp_path / 'merged')
  assert convert.main(['--merge_lora', merged, '--workdir', workdir]) == 0
  logits = {}
  for path in (workdir, merged):
    config = workdir_config.load_stored_config(path)
    model = config_lib.build_model(config)
    _, variables = init_source.restore_init_variables(
        path, init_source.saved_abstract(path))
    tokens = np.arange(32).reshape(2, 16) % 64
    logits[path] = np.asarray(model.apply(
        {'params': variables['params']}, tokens, deterministic=True)[0])
  assert config.finetune.lora_rank == 0  # the merged work dir's config
  np.testing.assert_allclose(logits[merged], logits[workdir], atol=1e-5,
                             rtol=1e-5)


@pytest.mark.parametrize('config, extra, needle', [
    ('upcycle', ['--init_from', '{missing}'],
     "init.upcycle: the source '{missing}' is not a directory"),
    ('upcycle', ['--init_from', '{upcycled}'],
     'init.upcycle: the source'),  # an MoE source: no dense FFN to copy
    ('switch', ['--config.finetune.lora_rank=-1'],
     'finetune.lora_rank=-1 is not allowed'),
    ('switch', ["--config.finetune.freeze=['nothing/.*']"],
     "finetune.freeze: 'nothing/.*' matches no param"),
    ('switch', ["--config.finetune.lora_rank=2",
                "--config.finetune.lora_targets=['dense']"],
     'finetune.lora_rank > 0 but the model has no LoRA adapters'),
    ('dense', ['--config.finetune.freeze_router=True'],
     'finetune.freeze_router=True is not allowed'),
])
def test_bad_init_and_finetune_keys_exit_2(config, extra, needle, upcycled,
                                          data_dir, tmp_path, capsys):
  names = dict(missing=str(tmp_path / 'missing'), upcycled=upcycled[0])
  workdir = tmp_path / 'run'
  extra = [e.format(**names) for e in extra]
  assert _run(config, str(workdir), data_dir, *extra) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and needle.format(**names) in err, err
  assert not (workdir / 'checkpoints').exists()


def test_freeze_bias_keeps_the_loss_free_bias(data_dir, tmp_path):
  # configs/deepseek.py moves its loss-free balancing bias every step
  # (bias_update_rate > 0, zeros at init); finetune.freeze_bias keeps it
  # where it starts, while the params still train.
  biases = {}
  for frozen in (False, True):
    workdir = str(tmp_path / f'frozen_{frozen}')
    assert _run('deepseek', workdir, data_dir,
                f'--config.finetune.freeze_bias={frozen}') == 0
    _, variables = init_source.restore_init_variables(
        workdir, init_source.saved_abstract(workdir))
    biases[frozen] = [np.asarray(x) for x in
                      jax.tree.leaves(variables['model_state'])]
  assert biases[True] and all(not b.any() for b in biases[True])
  assert any(b.any() for b in biases[False])
