"""Run plots, drawn from the records of metrics.jsonl (matplotlib figures
without pyplot, so importing this module leaves the backend alone).

Axis letters: E experts, T logged steps, N MoE layers.

  loss.png         train loss (line) and eval loss (markers) vs step. For a
                   language model (nats/token) with the Bayes floor of the
                   synthetic data as a dashed line: floor = eval/loss -
                   eval/excess_loss, from the last eval record holding both.
                   For a classifier (`model.task='classify'`) the
                   per-example cross-entropy (nats/example) and, on a
                   second axis, the eval accuracy.
  expert_load.png  per MoE layer (the mean over layers when there are more
                   than MAX_LAYER_PANELS), a heat map of every expert's load
                   (fraction of the layer's token-choices, before capacity)
                   at every logged training step, centred on the uniform
                   load 1/E (white; red above, blue below); beside it the
                   mean load of the last quarter of the logged steps as
                   bars against 1/E; below, every layer's drop fraction
                   over training (train lines, eval markers).

`plot_run(workdir)` redraws both for any run directory. Every plot function
returns its Figure (tests read its artists), after saving it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping, Optional, Sequence

from matplotlib import colors
from matplotlib.figure import Figure
import numpy as np

_LOAD_KEY = re.compile(r'^moe/(block_(\d+))/expert_load$')
MAX_LAYER_PANELS = 4  # more MoE layers: one panel of their mean load
MAX_COLUMNS = 400  # heat map columns; longer runs are averaged into bins
DPI = 100
# Legend labels: 'train/lm_loss' is the task loss without the aux and z
# terms, per token (LM) or per example (classifier).
_LABELS = {'train/lm_loss': 'train cross-entropy',
           'eval/loss': 'eval cross-entropy'}


def series(records: Sequence[Mapping[str, Any]], key: str
           ) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `key`, by step; a step logged twice keeps its last.

  Args:
    records: metrics.jsonl records.
    key: a record key.

  Returns:
    steps [T] int and values [T, ...] float, sorted by step.
  """
  by_step = {r['step']: r[key] for r in records if key in r}
  steps = sorted(by_step)
  return (np.asarray(steps, dtype=int),
          np.asarray([by_step[s] for s in steps], dtype=float))


def run_task(workdir: str, records: Sequence[Mapping[str, Any]]) -> str:
  """'classify' or 'lm': the run's `model.task`.

  Args:
    workdir: run directory; its config.json decides when readable.
    records: metrics.jsonl records; otherwise an 'eval/accuracy' key means
      a classifier.

  Returns:
    'classify' for a classifier run, else 'lm'.
  """
  try:
    with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
      task = json.load(f).get('model', {}).get('task')
    if task in ('classify', 'lm'):
      return task
  except (OSError, ValueError, AttributeError):
    pass
  return ('classify' if any('eval/accuracy' in r for r in records)
          else 'lm')


def bayes_floor(records: Sequence[Mapping[str, Any]]) -> Optional[float]:
  """The data's Bayes floor, eval/loss - eval/excess_loss, or None.

  Args:
    records: metrics.jsonl records.

  Returns:
    The floor of the last eval record holding both keys (the floor is a
    property of the eval set, the same in every eval), else None.
  """
  for r in reversed(records):
    if 'eval/loss' in r and 'eval/excess_loss' in r:
      return float(r['eval/loss']) - float(r['eval/excess_loss'])
  return None


def plot_losses(records: Sequence[Mapping[str, Any]], path: str,
                task: str = 'lm') -> Figure:
  """Train and eval loss vs step, with the Bayes floor or the accuracy.

  Args:
    records: metrics.jsonl records.
    path: output .png.
    task: 'lm' (nats/token, Bayes floor) or 'classify' (nats/example,
      eval accuracy on a second y axis).

  Returns:
    The saved figure.
  """
  classify = task == 'classify'
  fig = Figure(figsize=(10, 5.5))
  ax = fig.subplots()
  for key, style in (('train/lm_loss', '-'), ('eval/loss', 'o-')):
    steps, values = series(records, key)
    if steps.size:
      ax.plot(steps, values, style, label=_LABELS[key], markersize=4,
              lw=1.0 if key.startswith('train') else 1.5)
  title = 'classification loss' if classify else 'language-model loss'
  floor = None if classify else bayes_floor(records)
  if floor is not None:
    ax.axhline(floor, color='k', ls='--', lw=1.2,
               label=f'Bayes floor of the data ({floor:.3f})')
    _, excess = series(records, 'eval/excess_loss')
    title += f': final eval excess over the floor {excess[-1]:.3f}'
  ax.set_xlabel('step')
  ax.set_ylabel('cross-entropy (nats / example)' if classify
                else 'cross-entropy (nats / token)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  handles, names = ax.get_legend_handles_labels()
  steps, accuracy = series(records, 'eval/accuracy')
  if classify and steps.size:
    acc_ax = ax.twinx()
    line, = acc_ax.plot(steps, accuracy, 's--', color='tab:green',
                        markersize=4, label='eval accuracy')
    acc_ax.set_ylim(0.0, 1.02)
    acc_ax.set_ylabel('accuracy')
    handles, names = handles + [line], names + ['eval accuracy']
    ax.set_title(f'{title}: final eval accuracy {accuracy[-1]:.3f}')
  if handles:  # below the axes: the curves fill the plot's corners
    ax.legend(handles, names, loc='upper center', ncol=len(names),
              bbox_to_anchor=(0.5, -0.12), frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  return fig


@dataclasses.dataclass(frozen=True)
class LoadHistory:
  """Per-expert load of every MoE layer at every logged training step."""
  names: tuple[str, ...]  # [N] MoE block names, by block index
  steps: np.ndarray  # [T] int, ascending
  load: np.ndarray  # [N, T, E] fraction of each layer's token-choices


def expert_load_history(records: Sequence[Mapping[str, Any]]
                        ) -> Optional[LoadHistory]:
  """The `moe/<block>/expert_load` of every logged step.

  Args:
    records: metrics.jsonl records.

  Returns:
    A LoadHistory over the steps where every MoE layer logged its load (a
    step logged twice keeps its last record), or None without any.
  """
  blocks = {}
  for r in records:
    for k in r:
      if m := _LOAD_KEY.match(k):
        blocks[m.group(1)] = int(m.group(2))
  if not blocks:
    return None
  names = tuple(sorted(blocks, key=blocks.get))
  keys = [f'moe/{n}/expert_load' for n in names]
  by_step = {r['step']: [r[k] for k in keys] for r in records
             if all(k in r for k in keys)}
  steps = sorted(by_step)
  load = np.asarray([by_step[s] for s in steps], dtype=float)  # [T, N, E]
  return LoadHistory(names, np.asarray(steps, dtype=int),
                     load.transpose(1, 0, 2))


def _panels(history: LoadHistory) -> list[tuple[str, np.ndarray]]:
  """(title, load [T, E]) per heat map: each layer, or their mean."""
  n = len(history.names)
  if n <= MAX_LAYER_PANELS:
    panels = [(f'{name}: expert load (train)', history.load[i])
              for i, name in enumerate(history.names)]
  else:
    panels = [(f'mean over {n} MoE layers: expert load (train)',
               history.load.mean(0))]
  # Expert choice and Soft MoE fill every expert by construction.
  return [(title + (', uniform at every step'
                    if np.allclose(load, 1.0 / load.shape[1]) else ''),
           load) for title, load in panels]


def _binned(steps: np.ndarray, load: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
  """At most MAX_COLUMNS columns: consecutive steps averaged.

  Returns:
    (x edges [T'+1] for pcolormesh, load [T', E]).
  """
  chunks = np.array_split(np.arange(len(steps)),
                          min(len(steps), MAX_COLUMNS))
  load = np.stack([load[c].mean(0) for c in chunks])
  centres = np.asarray([steps[c].mean() for c in chunks], dtype=float)
  if len(centres) == 1:
    return np.asarray([centres[0] - 0.5, centres[0] + 0.5]), load
  mids = (centres[1:] + centres[:-1]) / 2
  edges = np.concatenate([[2 * centres[0] - mids[0]], mids,
                          [2 * centres[-1] - mids[-1]]])
  return edges, load


def _heat_map(fig: Figure, axes, steps: np.ndarray, load: np.ndarray,
              title: str, vmax: float) -> None:
  """One layer: load [T, E] over steps, and its last-quarter mean as bars.

  The colour scale runs 0 .. 1/E .. vmax (vmax > 1/E), the same in every
  panel.
  """
  ax, bar_ax = axes
  num_experts = load.shape[1]
  uniform = 1.0 / num_experts
  norm = colors.TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=vmax)
  edges, shown = _binned(steps, load)
  mesh = ax.pcolormesh(edges, np.arange(num_experts + 1) - 0.5, shown.T,
                       cmap='RdBu_r', norm=norm)
  ax.set_ylabel('expert')
  ax.set_ylim(num_experts - 0.5, -0.5)
  if num_experts <= 16:
    ax.set_yticks(range(num_experts))
  ax.set_title(title, fontsize=10)
  bar = fig.colorbar(mesh, ax=bar_ax, pad=0.15, fraction=0.25)
  bar.set_ticks([0.0, uniform, vmax])
  bar.set_ticklabels(['0', f'1/E = {uniform:.3g}', f'{vmax:.3g}'])
  last = load[-max(1, len(load) // 4):].mean(0)  # [E]
  bar_ax.barh(np.arange(num_experts), last, color='tab:blue', height=0.8)
  bar_ax.axvline(uniform, color='k', ls='--', lw=1.2)
  bar_ax.set_xlabel('last-quarter mean\n(dashed: uniform 1/E)', fontsize=9)
  bar_ax.tick_params(labelleft=False)


def _drop_panel(ax, records: Sequence[Mapping[str, Any]],
                names: Sequence[str]) -> None:
  """Drop fraction of every layer over training, and eval's."""
  for name in names:
    steps, values = series(records, f'moe/{name}/drop_fraction')
    if steps.size:
      ax.plot(steps, values, lw=1.2, label=f'{name} (train)')
  steps, values = series(records, 'eval/drop_fraction')
  if steps.size:
    ax.plot(steps, values, 'ko', markersize=4, label='eval (mean of layers)')
  expert_choice = any(f'moe/{names[0]}/tokens_by_0_experts' in r
                      for r in records)
  ax.set_title('drop fraction' + (
      ': tokens no expert took (expert choice)' if expert_choice
      else ': token-choices that found no slot'), fontsize=10)
  ax.set_xlabel('step')
  ax.set_ylabel('fraction')
  ax.set_ylim(bottom=0.0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, ncol=min(len(names) + 1, 4))


def plot_expert_load(records: Sequence[Mapping[str, Any]],
                     path: str) -> Optional[Figure]:
  """Load per expert over training, the uniform 1/E, and drops.

  Args:
    records: metrics.jsonl records.
    path: output .png.

  Returns:
    The saved figure, or None (nothing written) without MoE load records.
  """
  history = expert_load_history(records)
  if history is None:
    return None
  panels = _panels(history)
  fig = Figure(figsize=(12, 2.6 * len(panels) + 3.0))
  grid = fig.add_gridspec(len(panels) + 1, 2, width_ratios=(4, 1),
                          height_ratios=[2.6] * len(panels) + [3.0])
  drop_ax = fig.add_subplot(grid[len(panels), 0])
  num_experts = history.load.shape[-1]
  vmax = max(max(float(load.max()) for _, load in panels), 2.0 / num_experts)
  for row, (title, load) in enumerate(panels):
    ax = fig.add_subplot(grid[row, 0], sharex=drop_ax)
    bar_ax = fig.add_subplot(grid[row, 1], sharey=ax)
    _heat_map(fig, (ax, bar_ax), history.steps, load, title, vmax)
  _drop_panel(drop_ax, records, history.names)
  fig.suptitle('expert load over training: fraction of token-choices per '
               'expert (white = uniform 1/E, red = above, blue = below)',
               fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  return fig


def plot_run(workdir: str, records: Sequence[Mapping[str, Any]]
             ) -> list[str]:
  """Writes `<workdir>/plots/loss.png` and, for MoE runs, `expert_load.png`.

  Args:
    workdir: run directory.
    records: its metrics.jsonl records.

  Returns:
    Paths written.
  """
  out = os.path.join(workdir, 'plots')
  os.makedirs(out, exist_ok=True)
  written = [os.path.join(out, 'loss.png')]
  plot_losses(records, written[0], run_task(workdir, records))
  load_path = os.path.join(out, 'expert_load.png')
  if plot_expert_load(records, load_path) is not None:
    written.append(load_path)
  return written
