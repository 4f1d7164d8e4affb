"""Run plots: loss curves and expert load (matplotlib figures drawn without
pyplot, so importing this module leaves the backend alone).

Both read the records of metrics.jsonl, so they can be redrawn for any run
directory with `plot_run(workdir)`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional, Sequence

from matplotlib.figure import Figure
import numpy as np

_LOAD_KEY = re.compile(r'^moe/(block_(\d+))/expert_load$')


def plot_losses(records: Sequence[Mapping[str, Any]], path: str) -> None:
  """Train loss and eval loss vs step (and eval excess loss if present).

  Args:
    records: metrics.jsonl records.
    path: output .png.
  """
  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  for key, style in (('train/lm_loss', '-'), ('eval/loss', 'o-'),
                     ('eval/excess_loss', 's--')):
    points = [(r['step'], r[key]) for r in records if key in r]
    if points:
      steps, values = zip(*points)
      ax.plot(steps, values, style, label=key, markersize=4)
  ax.set_xlabel('step')
  ax.set_ylabel('loss (nats / token)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def latest_expert_load(records: Sequence[Mapping[str, Any]]
                       ) -> Optional[tuple[list[str], np.ndarray]]:
  """The last logged per-layer expert load.

  Args:
    records: metrics.jsonl records.

  Returns:
    (block names sorted by index, load [num_moe_layers, E]) from the last
    record holding any `moe/<block>/expert_load`; None if there is none.
  """
  for record in reversed(records):
    found = sorted((int(m.group(2)), m.group(1), v) for k, v in record.items()
                   if (m := _LOAD_KEY.match(k)))
    if found:
      return [f[1] for f in found], np.asarray([f[2] for f in found])
  return None


def plot_expert_load(names: Sequence[str], load: np.ndarray,
                     path: str, step: Optional[int] = None) -> None:
  """Heatmap of the fraction of tokens per (layer, expert).

  Args:
    names: the MoE block names (rows).
    load: [num_layers, E] load fractions.
    path: output .png.
    step: step the load was measured at (for the title).
  """
  fig = Figure(figsize=(1.2 + 0.6 * load.shape[1],
                        1.2 + 0.5 * load.shape[0]))
  ax = fig.subplots()
  image = ax.imshow(load, aspect='auto', cmap='viridis', vmin=0.0)
  ax.set_xticks(range(load.shape[1]))
  ax.set_yticks(range(load.shape[0]), labels=list(names))
  ax.set_xlabel('expert')
  ax.set_title('expert load' + (f' at step {step}' if step is not None
                                else ''))
  fig.colorbar(image, ax=ax, label='fraction of tokens')
  fig.tight_layout()
  fig.savefig(path, dpi=100)


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
  plot_losses(records, written[0])
  latest = latest_expert_load(records)
  if latest is not None:
    step = max((r['step'] for r in records
                if any(_LOAD_KEY.match(k) for k in r)), default=None)
    written.append(os.path.join(out, 'expert_load.png'))
    plot_expert_load(*latest, written[1], step)
  return written
