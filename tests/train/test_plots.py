"""The run plots (moejax.train.plots) from hand-written metrics.jsonl records:
the Bayes floor on loss.png, labels that fit the task, and expert_load.png
as load per expert over training with the uniform 1/E and the drops."""

import json
import os

from matplotlib import collections as mcollections
from matplotlib import image as mimage
import numpy as np
import pytest

from moejax.train import plots


def _train(step, loads, drops, extra=None):
  """A train record: loads {block: [E]}, drops {block: fraction}."""
  record = {'step': step, 'train/lm_loss': 5.0 - 0.01 * step}
  for block, load in loads.items():
    record[f'moe/{block}/expert_load'] = list(load)
    record[f'moe/{block}/drop_fraction'] = drops[block]
  record.update(extra or {})
  return record


def _lm_records():
  """Two MoE layers, E = 4, steps 10..40, two evals (floor 1.75 in both)."""
  loads = {10: ([0.4, 0.3, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1]),
           20: ([0.3, 0.3, 0.2, 0.2], [0.5, 0.2, 0.2, 0.1]),
           30: ([0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1]),
           40: ([0.2, 0.3, 0.25, 0.25], [0.3, 0.3, 0.2, 0.2])}
  records = []
  for step, (l0, l1) in loads.items():
    records.append(_train(step, {'block_0': l0, 'block_1': l1},
                          {'block_0': step / 400, 'block_1': step / 100}))
    if step in (20, 40):
      loss = 3.0 if step == 20 else 2.5
      records.append({'step': step, 'eval/loss': loss,
                      'eval/excess_loss': loss - 1.75,
                      'eval/drop_fraction': 0.05})
  return records, loads


def _width_px(path):
  return mimage.imread(path).shape[1]


def _heat_maps(fig):
  """[(axes, QuadMesh)] of the load heat maps, top to bottom."""
  return [(ax, c) for ax in fig.axes for c in ax.collections
          if isinstance(c, mcollections.QuadMesh)
          and ax.get_ylabel() == 'expert']  # not the colour bars


def test_series_sorts_by_step_and_keeps_the_last_duplicate():
  records = [{'step': 20, 'a': 2.0}, {'step': 10, 'a': 1.0},
             {'step': 20, 'a': 3.0}, {'step': 30, 'b': 9.0}]
  steps, values = plots.series(records, 'a')
  np.testing.assert_array_equal(steps, [10, 20])
  np.testing.assert_array_equal(values, [1.0, 3.0])


def test_bayes_floor_is_eval_loss_minus_excess():
  records, _ = _lm_records()
  assert plots.bayes_floor(records) == pytest.approx(1.75)
  assert plots.bayes_floor([{'step': 1, 'eval/loss': 2.0}]) is None


def test_loss_plot_draws_the_bayes_floor(tmp_path):
  records, _ = _lm_records()
  path = str(tmp_path / 'loss.png')
  fig = plots.plot_losses(records, path, 'lm')
  ax = fig.axes[0]
  floor = [line for line in ax.get_lines()
           if line.get_label().startswith('Bayes floor')]
  assert len(floor) == 1
  np.testing.assert_allclose(floor[0].get_ydata(), 1.75)
  evals = [line for line in ax.get_lines()
           if line.get_label() == 'eval cross-entropy']
  np.testing.assert_allclose(evals[0].get_ydata(), [3.0, 2.5])
  assert ax.get_ylabel() == 'cross-entropy (nats / token)'
  assert '0.750' in ax.get_title()  # final excess over the floor
  assert _width_px(path) >= 900


def test_classifier_loss_plot_is_per_example_with_accuracy(tmp_path):
  records = [{'step': 10, 'train/lm_loss': 1.9},
             {'step': 20, 'train/lm_loss': 0.8},
             {'step': 20, 'eval/loss': 0.9, 'eval/accuracy': 0.625},
             {'step': 30, 'train/lm_loss': 0.4},
             {'step': 30, 'eval/loss': 0.3, 'eval/accuracy': 0.875}]
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump({'model': {'task': 'classify'}}, f)
  assert plots.run_task(str(tmp_path), records) == 'classify'
  plots.plot_run(str(tmp_path), records)
  fig = plots.plot_losses(records, str(tmp_path / 'again.png'), 'classify')
  ax, acc_ax = fig.axes
  assert ax.get_ylabel() == 'cross-entropy (nats / example)'
  texts = [ax.get_ylabel(), ax.get_title()] + [
      t.get_text() for t in ax.get_legend().get_texts()]
  assert not any('token' in t or 'lm_loss' in t for t in texts), texts
  assert not any(t.startswith('Bayes') for t in texts)
  np.testing.assert_allclose(acc_ax.get_lines()[0].get_ydata(),
                             [0.625, 0.875])
  assert acc_ax.get_ylabel() == 'accuracy'
  assert _width_px(str(tmp_path / 'plots' / 'loss.png')) >= 900


def test_run_task_without_config_json(tmp_path):
  assert plots.run_task(str(tmp_path), [{'step': 1, 'eval/loss': 1.0}]) == 'lm'
  assert plots.run_task(str(tmp_path),
                        [{'step': 1, 'eval/accuracy': 0.5}]) == 'classify'


def test_expert_load_history_orders_blocks_and_dedupes_steps():
  e4 = [0.25] * 4
  records = [
      _train(10, {'block_2': [0.4, 0.2, 0.2, 0.2], 'block_10': e4},
             {'block_2': 0.0, 'block_10': 0.0}),
      _train(20, {'block_2': e4}, {'block_2': 0.0}),  # block_10 missing
      _train(30, {'block_2': [0.1, 0.2, 0.3, 0.4], 'block_10': e4},
             {'block_2': 0.0, 'block_10': 0.0}),
      # A resumed run logs step 30 again: the last record wins.
      _train(30, {'block_2': [0.4, 0.3, 0.2, 0.1], 'block_10': e4},
             {'block_2': 0.0, 'block_10': 0.0}),
  ]
  history = plots.expert_load_history(records)
  assert history.names == ('block_2', 'block_10')  # by index, not text
  np.testing.assert_array_equal(history.steps, [10, 30])
  np.testing.assert_allclose(history.load[0],
                             [[0.4, 0.2, 0.2, 0.2], [0.4, 0.3, 0.2, 0.1]])
  assert history.load.shape == (2, 2, 4)
  assert plots.expert_load_history([{'step': 1, 'train/loss': 1.0}]) is None


def test_expert_load_plot_shows_every_step_uniform_and_drops(tmp_path):
  records, loads = _lm_records()
  path = str(tmp_path / 'expert_load.png')
  fig = plots.plot_expert_load(records, path)
  maps = _heat_maps(fig)
  assert len(maps) == 2  # one per MoE layer
  for layer, (_, mesh) in enumerate(maps):
    shown = np.asarray(mesh.get_array()).reshape(4, 4)  # [E, T]
    expected = np.asarray([loads[s][layer] for s in (10, 20, 30, 40)]).T
    np.testing.assert_allclose(shown, expected)
    # The colour scale is centred on the uniform load.
    assert mesh.norm.vcenter == pytest.approx(0.25)
  # Beside each heat map: the last-quarter mean (step 40) against 1/E.
  bar_axes = [ax for ax in fig.axes if ax.patches]
  assert len(bar_axes) == 2
  widths = [p.get_width() for p in bar_axes[1].patches]
  np.testing.assert_allclose(widths, loads[40][1])
  uniform = [line.get_xdata()[0] for line in bar_axes[1].get_lines()]
  assert uniform == [pytest.approx(0.25)]
  drop_ax = next(ax for ax in fig.axes if ax.get_title().startswith('drop'))
  lines = {line.get_label(): line.get_ydata()
           for line in drop_ax.get_lines()}
  np.testing.assert_allclose(lines['block_1 (train)'], [0.1, 0.2, 0.3, 0.4])
  np.testing.assert_allclose(lines['eval (mean of layers)'], [0.05, 0.05])
  assert _width_px(path) >= 900


def test_many_layers_show_their_mean(tmp_path):
  loads = {f'block_{i}': np.eye(4)[i % 4] for i in range(6)}
  drops = {name: 0.0 for name in loads}
  records = [_train(s, loads, drops) for s in (1, 2)]
  fig = plots.plot_expert_load(records, str(tmp_path / 'load.png'))
  (ax, mesh), = _heat_maps(fig)
  assert ax.get_title().startswith('mean over 6 MoE layers')
  shown = np.asarray(mesh.get_array()).reshape(4, 2)
  np.testing.assert_allclose(shown[:, 0], [2 / 6, 2 / 6, 1 / 6, 1 / 6])


def test_long_runs_are_binned():
  steps = np.arange(1, 1001)
  load = np.stack([steps % 2, 1 - steps % 2], -1).astype(float)  # [T, 2]
  edges, shown = plots._binned(steps, load)  # pylint: disable=protected-access
  assert shown.shape == (plots.MAX_COLUMNS, 2)
  assert len(edges) == plots.MAX_COLUMNS + 1
  assert edges[0] < 1 and edges[-1] > 1000
  np.testing.assert_allclose(shown.mean(0), [0.5, 0.5], atol=1e-3)


def test_plot_run_without_moe_writes_only_the_loss(tmp_path):
  records = [{'step': 1, 'train/lm_loss': 2.0}, {'step': 2,
                                                 'train/lm_loss': 1.5}]
  written = plots.plot_run(str(tmp_path), records)
  assert written == [os.path.join(str(tmp_path), 'plots', 'loss.png')]
  assert not os.path.exists(tmp_path / 'plots' / 'expert_load.png')
