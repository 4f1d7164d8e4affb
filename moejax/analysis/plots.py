"""Sweep plots (matplotlib figures drawn without pyplot, so
importing this module leaves the backend alone).

  metrics_vs_value   final metrics vs the swept value, dense baseline as a
                     horizontal line, error bars = std over seeds;
  loss_curves        eval (and train) loss vs step of every run, the data's
                     Bayes floor (eval/loss - eval/excess_loss) dashed;
                     nats/example for classifier runs (records with
                     eval/accuracy), else nats/token;
  expert_loads       per-layer eval expert load of every point (one heatmap
                     per point, layers x experts), coloured around the
                     uniform load 1/E (white).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import matplotlib
from matplotlib import colors
from matplotlib.figure import Figure
import numpy as np

# (row key, panel title, whether the dense baseline has a meaningful value).
PANELS = (('eval_loss', 'final eval loss (nats/token)', True),
          ('excess_loss', 'excess over Bayes floor', True),
          ('eval_drop_fraction', 'drop fraction (eval)', False),
          ('train_drop_fraction', 'drop fraction (train, last 25%)', False),
          ('eval_max_violation', 'max-violation (eval)', False),
          ('spec_nmi', 'specialisation NMI (mean over layers)', False))


def _nan(v: Any) -> float:
  return float(v) if isinstance(v, (int, float)) else float('nan')


def metrics_vs_value(rows: Sequence[Mapping[str, Any]],
                     labels: Sequence[str], xlabel: str, path: str,
                     baseline: Optional[Mapping[str, Any]] = None) -> None:
  """Final metrics against the swept value (categorical x axis).

  Args:
    rows: `results.aggregate` rows of the swept points (no baseline).
    labels: x tick label per row.
    xlabel: axis label (the swept key or keys).
    path: output .png.
    baseline: the dense baseline row, drawn as a horizontal line where
      meaningful (losses).
  """
  fig = Figure(figsize=(13, 7))
  axes = fig.subplots(2, 3)
  x = np.arange(len(rows))
  for ax, (key, title, base_line) in zip(axes.ravel(), PANELS):
    mean = np.array([_nan(r.get(key)) for r in rows])
    std = np.array([_nan(r.get(key + '_std')) for r in rows])
    ax.errorbar(x, mean, yerr=np.nan_to_num(std), fmt='o-', capsize=3,
                label='MoE')
    if key == 'spec_nmi':
      chance = [_nan(r.get('spec_chance')) for r in rows]
      ax.plot(x, chance, 'x--', color='gray', label='chance (shuffled)')
    if baseline is not None and base_line and math.isfinite(
        _nan(baseline.get(key))):
      ax.axhline(baseline[key], color='k', ls='--', label='dense baseline')
    ax.set_xticks(x, labels=list(labels), rotation=30)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def _bayes_floor(curves) -> Optional[float]:
  """eval/loss - eval/excess_loss of the last eval record that holds both
  (the runs of a sweep share their eval data), or None."""
  for _, records, _ in curves:
    for r in reversed(records):
      if 'eval/loss' in r and 'eval/excess_loss' in r:
        return float(r['eval/loss']) - float(r['eval/excess_loss'])
  return None


def loss_curves(curves: Sequence[tuple[str, Sequence[Mapping[str, Any]],
                                       bool]], path: str) -> Figure:
  """Eval loss (markers) and train task loss (thin) vs step, every run.

  Args:
    curves: (label, metrics.jsonl records, is_baseline) per run.
    path: output .png.

  Returns:
    The saved figure.
  """
  fig = Figure(figsize=(10, 5.5))
  ax = fig.subplots()
  colours = matplotlib.rcParams['axes.prop_cycle'].by_key()['color']
  for i, (label, records, is_baseline) in enumerate(curves):
    colour = 'k' if is_baseline else colours[i % len(colours)]
    style = '--' if is_baseline else '-'
    train = [(r['step'], r['train/lm_loss']) for r in records
             if 'train/lm_loss' in r]
    evals = [(r['step'], r['eval/loss']) for r in records
             if 'eval/loss' in r]
    if train:
      ax.plot(*zip(*train), style, color=colour, alpha=0.25, lw=0.8)
    if evals:
      ax.plot(*zip(*evals), 'o' + style, color=colour, ms=3, label=label)
  floor = _bayes_floor(curves)
  if floor is not None:
    ax.axhline(floor, color='gray', ls=':', lw=1.5,
               label=f'Bayes floor ({floor:.3f})')
  per = ('example' if any('eval/accuracy' in r for _, records, _ in curves
                          for r in records) else 'token')
  ax.set_xlabel('step')
  ax.set_ylabel(f'cross-entropy (nats / {per}); thin: train, markers: eval')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return fig


def expert_loads(loads: Sequence[tuple[str, Mapping[str, Sequence[float]]]],
                 path: str) -> Optional[Figure]:
  """One heatmap (layers x experts) of eval expert load per point.

  Args:
    loads: (label, {layer: load [E]}) per point; points without layers are
      skipped.
    path: output .png.

  Returns:
    The saved figure, or None (nothing written) if no point has MoE layers.
  """
  loads = [(label, layers) for label, layers in loads if layers]
  if not loads:
    return None
  cols = min(3, len(loads))
  nrows = math.ceil(len(loads) / cols)
  fig = Figure(figsize=(4.5 * cols, 2.6 * nrows))
  axes = fig.subplots(nrows, cols, squeeze=False)
  for ax, (label, layers) in zip(axes.ravel(), loads):
    names = sorted(layers, key=lambda n: (len(n), n))
    grid = np.asarray([layers[n] for n in names])  # [layers, E]
    uniform = 1.0 / grid.shape[1]
    norm = colors.TwoSlopeNorm(vmin=0.0, vcenter=uniform,
                               vmax=max(float(grid.max()), 2 * uniform))
    image = ax.imshow(grid, aspect='auto', cmap='RdBu_r', norm=norm)
    ax.set_yticks(range(len(names)), labels=names, fontsize=7)
    ax.set_xlabel('expert', fontsize=8)
    ax.set_title(label, fontsize=8)
    bar = fig.colorbar(image, ax=ax)
    bar.set_ticks([0.0, uniform, norm.vmax])
    bar.set_ticklabels(['0', f'1/E={uniform:.3g}', f'{norm.vmax:.3g}'],
                       fontsize=7)
  for ax in axes.ravel()[len(loads):]:
    ax.axis('off')
  fig.suptitle('eval expert load (fraction of token-choices; white = '
               'uniform 1/E, red = above, blue = below)', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return fig
