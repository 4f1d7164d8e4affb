"""The encoder classifier configs through the CLI: the same params / FLOPs
start-up line as the language models, and plots labelled for a
per-example loss."""

import os

import pytest

from experiments import train
from moejax.train import plots
from moejax.train import read_metrics
from tests.train.helpers import small_args

STEPS = 10


@pytest.mark.parametrize('config', ['expert_choice', 'soft_moe'])
def test_classifier_run_prints_params_and_flops(config, data_dir, tmp_path,
                                                capsys):
  workdir = str(tmp_path / config)
  argv = small_args(config, workdir, data_dir, train__steps=STEPS,
                    train__eval_every=STEPS, train__checkpoint_every=STEPS)
  assert train.main(argv) == 0
  out = capsys.readouterr().out
  model_lines = [line for line in out.splitlines()
                 if line.startswith('model: params total ')]
  assert len(model_lines) == 1, out
  assert 'FLOPs/token' in model_lines[0]
  assert 'encoder classifier of 8 classes' in model_lines[0]
  records = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  assert plots.run_task(workdir, records) == 'classify'  # from config.json
  fig = plots.plot_losses(records, str(tmp_path / 'loss.png'),
                          plots.run_task(workdir, records))
  assert fig.axes[0].get_ylabel() == 'cross-entropy (nats / example)'
  assert os.path.getsize(os.path.join(workdir, 'plots', 'loss.png')) > 0
