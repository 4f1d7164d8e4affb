"""Markdown report of a sweep (results.md) from `results.aggregate` rows.

The part a README quotes (command, machine, wall time, main table, legend)
sits between `SUMMARY_BEGIN` and `SUMMARY_END`, so a script can copy it
(`experiments/readme_table.py`).
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

from moejax.analysis import results as results_lib

SUMMARY_BEGIN = '<!-- moejax-sweep-summary:begin -->'
SUMMARY_END = '<!-- moejax-sweep-summary:end -->'

LEGEND = (
    'eval loss / excess: final eval cross-entropy (nats/token) and its '
    'excess over the Bayes floor of the synthetic data; Δ dense: eval loss '
    'minus the dense baseline\'s at the same seed (negative = better than '
    'dense); drop: fraction of expert assignments dropped at eval (eval '
    'capacity factor) and in training (mean over the last quarter of the '
    'steps); max-viol.: max_e load_e / mean load - 1 at eval, mean over MoE '
    'layers; spec.: NMI between top-1 expert and domain on the eval split, '
    'mean over MoE layers, with the shuffled-domain chance level in '
    'parentheses; token NMI: the same between top-1 expert and input token '
    'id (final eval, mean over MoE layers), with its chance level (token '
    'ids paired with another sequence\'s experts); params: total / active '
    'per token; experts/token: real experts a token asks for before '
    'capacity (final eval; shown when a router varies it); MoD tokens: the '
    'share of tokens the Mixture-of-Depths blocks process (its predictor\'s '
    'accuracy vs the top-k choice in parentheses); tok/s: median training '
    'throughput; wall: training + analysis seconds of one run. Values are '
    'mean ± sample std over seeds.')


def _human(n: float) -> str:
  """1234567 -> '1.23M'."""
  if not math.isfinite(n):
    return '—'
  for unit, scale in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
    if abs(n) >= scale:
      return f'{n / scale:.3g}{unit}'
  return f'{n:.0f}'


def cell(row: Mapping[str, Any], metric: str, digits: int = 3) -> str:
  """'mean ± std' (just the mean with one ok seed); '—' if missing."""
  mean = row.get(metric, float('nan'))
  if not math.isfinite(mean):
    return '—'
  text = f'{mean:.{digits}f}'
  std = row.get(metric + '_std', float('nan'))
  if row.get('seeds_ok', 0) > 1 and math.isfinite(std):
    text += f' ± {std:.{digits}f}'
  return text


def point_label(row: Mapping[str, Any], key: str) -> str:
  """Table label of a row's value for one swept key."""
  if row['baseline']:
    return 'dense baseline'
  value = row['overrides'].get(key)
  if value is None and key.endswith('capacity_factor'):
    return 'none (dropless)'
  return results_lib.format_value(value) if key in row['overrides'] else ''


def _seeds_cell(row: Mapping[str, Any]) -> str:
  if row['status'] == 'ok':
    return str(row['seeds'])
  return f'{row["seeds_ok"]}/{row["seeds"]} ok'


def _with_chance(row: Mapping[str, Any], metric: str, chance: str) -> str:
  """'mean ± std (chance)' of an NMI column; '—' if missing."""
  text = cell(row, metric)
  level = row.get(chance, float('nan'))
  if text != '—' and math.isfinite(level):
    text += f' ({level:.3f})'
  return text


def _reported(rows: Sequence[Mapping[str, Any]], metric: str) -> bool:
  return any(math.isfinite(r.get(metric, float('nan'))) for r in rows)


def _optional_columns(rows: Sequence[Mapping[str, Any]]) -> list[tuple]:
  """(heading, row -> cell) of the columns only some sweeps have: experts
  per token when the rows differ in it (top-k sweeps, ReMoE, null experts),
  MoD tokens when a row has Mixture-of-Depths blocks."""
  cols = []
  experts = {r['active_experts'] for r in rows
             if math.isfinite(r.get('active_experts', float('nan')))}
  if len(experts) > 1:
    cols.append(('experts/token', lambda r: cell(r, 'active_experts', 2)))
  if _reported(rows, 'mod_fraction'):
    cols.append(('MoD tokens (acc.)', lambda r: _with_chance(
        r, 'mod_fraction', 'mod_accuracy')))
  return cols


def main_table(rows: Sequence[Mapping[str, Any]],
               keys: Sequence[str]) -> list[str]:
  """Markdown lines of the main table: one row per point (group)."""
  names = [results_lib.short_key(k, keys) for k in keys]
  optional = _optional_columns(rows)
  head = (names or ['point']) + [
      'eval loss', 'excess', 'Δ dense', 'drop eval', 'drop train',
      'max-viol.', 'spec. NMI (chance)', 'token NMI (chance)',
      *[h for h, _ in optional], 'params total / active', 'tok/s', 'wall s',
      'seeds']
  lines = ['| ' + ' | '.join(head) + ' |',
           '|' + '---|' * len(head)]
  for r in rows:
    spec = _with_chance(r, 'spec_nmi', 'spec_chance')
    token = _with_chance(r, 'token_nmi', 'token_chance')
    values = [point_label(r, k) for k in keys] or [r['group']]
    values += [cell(r, 'eval_loss'), cell(r, 'excess_loss'),
               cell(r, 'delta_dense'), cell(r, 'eval_drop_fraction'),
               cell(r, 'train_drop_fraction'), cell(r, 'eval_max_violation'),
               spec, token, *[f(r) for _, f in optional],
               f'{_human(r["params_total"])} / '
               f'{_human(r["params_active"])}',
               cell(r, 'tokens_per_sec', 0), cell(r, 'wall_s', 0),
               _seeds_cell(r)]
    lines.append('| ' + ' | '.join(values) + ' |')
  return lines


def layer_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """Markdown lines of the per-layer specialisation table ([] if dense)."""
  cols = results_lib.layer_columns(rows)
  moe_rows = [r for r in rows if any(math.isfinite(r.get(c, float('nan')))
                                     for c in cols)]
  if not cols or not moe_rows:
    return []
  head = ['point'] + [c[len('spec_'):] for c in cols] + ['chance (mean)']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in moe_rows:
    lines.append('| ' + ' | '.join(
        [f'`{r["group"]}`'] + [cell(r, c) for c in cols] +
        [cell(r, 'spec_chance')]) + ' |')
  return lines


def failure_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """Markdown lines listing every failed run with its message."""
  lines = []
  for r in rows:
    for name, message in r['errors']:
      lines += [f'- `{name}`:', '', '  ```',
                *[f'  {m}' for m in (message or 'no message').splitlines()],
                '  ```']
  return lines


def markdown_report(title: str, rows: Sequence[Mapping[str, Any]],
                    keys: Sequence[str], header: Sequence[str],
                    plots: Sequence[str]) -> str:
  """The whole results.md.

  Args:
    title: first heading.
    rows: `results.aggregate` rows (baseline first, if any).
    keys: swept config keys (full dotted names), one column each.
    header: lines put above the table inside the summary block (command,
      machine, wall time).
    plots: plot paths relative to results.md.

  Returns:
    Markdown text.
  """
  lines = [f'# {title}', '', SUMMARY_BEGIN, *header, '',
           *main_table(rows, keys), '', LEGEND, SUMMARY_END, '']
  layers = layer_table(rows)
  if layers:
    lines += ['## Specialisation per MoE layer (NMI, top-1 expert vs domain)',
              '', *layers, '']
  failures = failure_lines(rows)
  if failures:
    lines += ['## Failed runs', '', *failures, '']
  if plots:
    lines += ['## Plots', '', *[f'![{p}]({p})' for p in plots], '']
  return '\n'.join(lines)


def write_sweep_outputs(out: str, records: list[dict[str, Any]],
                        keys: Sequence[str],
                        curves: Sequence[tuple[str, Sequence[Mapping], bool]],
                        header: Sequence[str], title: str) -> str:
  """Writes results.csv, runs.csv, results.md and plots/ of a sweep.

  Args:
    out: the sweep directory.
    records: run records (see `results.aggregate`), baseline runs first.
    keys: the swept config keys (dotted).
    curves: (run name, metrics.jsonl records, is_baseline) per run.
    header: the lines above the table (command, machine, wall time).
    title: heading of results.md.

  Returns:
    The path of results.md.
  """
  from moejax.analysis import plots  # pylint: disable=g-import-not-at-top
  rows = results_lib.aggregate(records)
  results_lib.write_csv(os.path.join(out, 'results.csv'), rows, keys)
  results_lib.write_csv(os.path.join(out, 'runs.csv'), records, keys,
                        per_run=True)
  os.makedirs(os.path.join(out, 'plots'), exist_ok=True)
  swept = [r for r in rows if not r['baseline']]
  base = next((r for r in rows if r['baseline']), None)
  labels = [','.join(results_lib.format_value(r['overrides'][k])
                     for k in keys if k in r['overrides']) or r['group']
            for r in swept]
  names = ['plots/metrics_vs_value.png', 'plots/loss_curves.png']
  plots.metrics_vs_value(
      swept, labels, ' / '.join(results_lib.short_key(k, keys) for k in keys),
      os.path.join(out, names[0]), base)
  plots.loss_curves(curves, os.path.join(out, names[1]))
  loads = [(g['group'], next((r['expert_load'] for r in records
                              if r['group'] == g['group'] and
                              r['status'] == 'ok'), {})) for g in swept]
  if plots.expert_loads(loads, os.path.join(out, 'plots/expert_load.png')):
    names.append('plots/expert_load.png')
  path = os.path.join(out, 'results.md')
  with open(path, 'w', encoding='utf-8') as f:
    f.write(markdown_report(title, rows, keys, header, names))
  return path
