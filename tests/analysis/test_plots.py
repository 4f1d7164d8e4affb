"""Sweep plots (moejax.analysis.plots): the Bayes floor and task-fitting
units on loss_curves, and heat maps coloured around the uniform load."""

import numpy as np
import pytest

from moejax.analysis import plots


def _run(scale, accuracy=False):
  """Records of one run: train and eval loss, floor 1.5 when LM."""
  records = [{'step': 10, 'train/lm_loss': 3.0 * scale}]
  evals = {'step': 10, 'eval/loss': 2.5 * scale}
  if accuracy:
    evals['eval/accuracy'] = 0.5
  else:
    evals['eval/excess_loss'] = 2.5 * scale - 1.5
  return records + [evals]


def test_loss_curves_draw_the_bayes_floor(tmp_path):
  fig = plots.loss_curves([('E=4', _run(1.0), False),
                           ('dense', _run(1.2), True)],
                          str(tmp_path / 'loss.png'))
  ax = fig.axes[0]
  floor = [line for line in ax.get_lines()
           if line.get_label().startswith('Bayes floor')]
  assert len(floor) == 1
  np.testing.assert_allclose(floor[0].get_ydata(), 1.5)
  assert 'nats / token' in ax.get_ylabel()


def test_loss_curves_of_classifiers_are_per_example(tmp_path):
  fig = plots.loss_curves([('E=4', _run(1.0, accuracy=True), False)],
                          str(tmp_path / 'loss.png'))
  ax = fig.axes[0]
  assert 'nats / example' in ax.get_ylabel()
  assert not any(line.get_label().startswith('Bayes')
                 for line in ax.get_lines())


def test_expert_loads_are_centred_on_uniform(tmp_path):
  loads = [('E=4', {'block_0': [0.4, 0.2, 0.2, 0.2]}),
           ('E=8', {'block_0': [0.125] * 8, 'block_1': [0.3] + [0.1] * 7}),
           ('dense', {})]
  fig = plots.expert_loads(loads, str(tmp_path / 'load.png'))
  images = [ax.images[0] for ax in fig.axes if ax.images]
  assert len(images) == 2  # the dense point has no layers
  assert [im.norm.vcenter for im in images] == [pytest.approx(0.25),
                                                pytest.approx(0.125)]
  assert plots.expert_loads([('dense', {})], str(tmp_path / 'x.png')) is None
