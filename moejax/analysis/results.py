"""Sweep results: one record per run, seed aggregation, CSV and Markdown.

A *run* is one training work dir (one sweep point at one seed). Its record
is read from files the run leaves behind:

  metrics.jsonl   the trainer's records (final eval loss, excess loss, eval
                  drop fraction and max-violation; train drop fraction and
                  tokens/s from the train records);
  analysis.json   `ANALYSIS_FILE`, written after training from the final
                  checkpoint: params total/active and per-layer routing
                  statistics incl. the specialisation NMI.

Runs sharing their overrides except the seed form a *group* (one table row):
every numeric metric becomes its mean and sample standard deviation (ddof 1;
0 with one seed) over the group's successful runs.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

METRICS_FILE = 'metrics.jsonl'
ANALYSIS_FILE = 'analysis.json'
# Numeric metrics of a run, in table order (spec_<layer> columns follow).
METRICS = ('eval_loss', 'excess_loss', 'delta_dense', 'eval_drop_fraction',
           'train_drop_fraction', 'eval_max_violation', 'spec_nmi',
           'spec_chance', 'token_nmi', 'token_chance', 'params_total',
           'params_active', 'tokens_per_sec', 'wall_s', 'active_experts',
           'mod_fraction', 'mod_accuracy')
# Fraction of the final steps whose train records give train_drop_fraction.
TRAIN_TAIL = 0.25


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Records of a JSON-lines file (missing -> []; broken lines skipped)."""
  if not os.path.exists(path):
    return []
  out = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # a line cut by a kill
  return out


def read_json(path: str) -> Optional[dict[str, Any]]:
  """A JSON file's object, or None if it is missing or unreadable."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def final_eval(records: Sequence[Mapping[str, Any]],
               steps: int) -> Optional[dict[str, Any]]:
  """The eval record of step `steps` (the run's last step), or None."""
  for record in reversed(records):
    if record.get('step') == steps and 'eval/loss' in record:
      return dict(record)
  return None


def run_finished(workdir: str, steps: int) -> bool:
  """A run is finished when metrics.jsonl holds the eval of its last step."""
  return final_eval(read_jsonl(os.path.join(workdir, METRICS_FILE)),
                    steps) is not None


def _train_metrics(records: Sequence[Mapping[str, Any]],
                   steps: int) -> dict[str, float]:
  """train_drop_fraction (mean over the last TRAIN_TAIL of the steps) and
  tokens_per_sec (median over train records: robust to the compile-time
  outlier of the first record after each start)."""
  train = [r for r in records if 'train/loss' in r]
  tail = [r['train/drop_fraction'] for r in train
          if r['step'] > (1 - TRAIN_TAIL) * steps and
          'train/drop_fraction' in r]
  rates = [r['train/tokens_per_sec'] for r in train
           if 'train/tokens_per_sec' in r]
  nan = float('nan')
  return {'train_drop_fraction': float(np.mean(tail)) if tail else nan,
          'tokens_per_sec': float(np.median(rates)) if rates else nan}


def _static_top_k(workdir: str) -> float:
  """K of a plain top-K MoE run (its config.json), else NaN: the experts
  every token asks for when no router reports a varying number."""
  moe = ((read_json(os.path.join(workdir, 'config.json')) or {})
         .get('model', {}).get('moe', {}))
  plain = (moe.get('num_experts', 0) and moe.get('router') == 'topk' and
           not moe.get('num_null_experts', 0))
  return float(moe['top_k']) if plain else float('nan')


def read_run(workdir: str, steps: int) -> dict[str, Any]:
  """Measured metrics of one run dir.

  Args:
    workdir: the run directory.
    steps: its configured number of steps (train.steps).

  Returns:
    {'finished': bool, 'eval_loss', 'excess_loss', 'eval_drop_fraction',
    'eval_max_violation', 'train_drop_fraction', 'tokens_per_sec',
    'params_total', 'params_active', 'spec_nmi' (mean over MoE layers),
    'spec_chance' (mean shuffled-domain NMI), 'spec_layers' {layer: nmi},
    'token_nmi' / 'token_chance' (the final eval's top-1 expert vs input
    token id NMI and its chance level, eval/token_specialisation),
    'expert_load' {layer: [E]}, 'active_experts' (real experts per token
    before capacity at the final eval, mean over MoE layers: the routers
    that vary it report it, else a plain top-K router's K from
    config.json), 'mod_fraction' / 'mod_accuracy' (Mixture-of-Depths: the
    share of tokens its blocks processed, its predictor's accuracy)};
    missing values are NaN, and so are the
    routing metrics of a model without MoE layers (analysis.json
    'moe_layers' = 0).
  """
  nan = float('nan')
  records = read_jsonl(os.path.join(workdir, METRICS_FILE))
  final = final_eval(records, steps) or {}
  out = {'finished': bool(final),
         'eval_loss': final.get('eval/loss', nan),
         'excess_loss': final.get('eval/excess_loss', nan),
         'eval_drop_fraction': final.get('eval/drop_fraction', nan),
         'eval_max_violation': final.get('eval/max_violation', nan),
         'token_nmi': final.get('eval/token_specialisation', nan),
         'token_chance': final.get('eval/token_specialisation_chance', nan),
         'active_experts': final.get('eval/active_experts',
                                     _static_top_k(workdir)),
         'mod_fraction': final.get('eval/mod_fraction', nan),
         'mod_accuracy': final.get('eval/mod_accuracy', nan)}
  out.update(_train_metrics(records, steps))
  analysis = read_json(os.path.join(workdir, ANALYSIS_FILE)) or {}
  layers = analysis.get('layers', {})
  out['params_total'] = analysis.get('params_total', nan)
  out['params_active'] = analysis.get('params_active', nan)
  out['spec_layers'] = {k: v['nmi'] for k, v in layers.items() if 'nmi' in v}
  chance = [v['nmi_shuffled'] for v in layers.values() if 'nmi_shuffled' in v]
  out['spec_nmi'] = (float(np.mean(list(out['spec_layers'].values())))
                     if out['spec_layers'] else nan)
  out['spec_chance'] = float(np.mean(chance)) if chance else nan
  out['expert_load'] = {k: v['expert_load'] for k, v in layers.items()
                        if 'expert_load' in v}
  if analysis.get('moe_layers') == 0:  # dense: routing metrics do not apply
    for key in ('eval_drop_fraction', 'train_drop_fraction',
                'eval_max_violation'):
      out[key] = nan
  return out


def add_baseline_delta(runs: list[dict[str, Any]]) -> None:
  """Sets run['delta_dense'] = eval_loss - the baseline's, same seed.

  Args:
    runs: run records with 'seed', 'eval_loss' and 'baseline' (bool);
      modified in place (NaN for the baseline runs themselves and where the
      same-seed baseline is missing).
  """
  nan = float('nan')
  base = {r['seed']: r['eval_loss'] for r in runs if r.get('baseline')}
  for r in runs:
    r['delta_dense'] = (nan if r.get('baseline') else
                        r['eval_loss'] - base.get(r['seed'], nan))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  """(mean, sample std with ddof 1; 0 for one value) of the finite values."""
  finite = [float(v) for v in values
            if isinstance(v, (int, float)) and math.isfinite(v)]
  if not finite:
    return float('nan'), float('nan')
  std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
  return float(np.mean(finite)), std


def aggregate(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Groups runs by 'group' (first-seen order) and averages over seeds.

  Args:
    runs: run records with 'group', 'overrides', 'baseline', 'status'
      ('ok' counts), the METRICS and 'spec_layers'.

  Returns:
    One row per group: 'group', 'overrides', 'baseline', 'seeds' (runs),
    'seeds_ok', 'status' ('ok', 'failed' or e.g. '1/2 ok'), 'errors'
    [(run name, message)] of the runs not ok or with an 'error' (e.g. a
    failed analysis of a finished run), and for each metric m: m (mean)
    and m + '_std' (over the ok runs; NaN if none); per-layer
    'spec_<layer>' likewise.
  """
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for r in runs:
    groups.setdefault(r['group'], []).append(r)
  rows = []
  for name, members in groups.items():
    ok = [r for r in members if r['status'] == 'ok']
    row = {'group': name, 'overrides': dict(members[0]['overrides']),
           'baseline': bool(members[0].get('baseline')),
           'seeds': len(members), 'seeds_ok': len(ok),
           'errors': [(r['name'], r.get('error') or r['status'])
                      for r in members
                      if r['status'] != 'ok' or r.get('error')]}
    row['status'] = ('ok' if len(ok) == len(members) else 'failed'
                     if not ok else f'{len(ok)}/{len(members)} ok')
    layers = sorted({k for r in ok for k in r.get('spec_layers', {})},
                    key=_layer_key)
    for metric in METRICS:
      row[metric], row[metric + '_std'] = _mean_std(
          [r.get(metric, float('nan')) for r in ok])
    for layer in layers:
      row[f'spec_{layer}'], row[f'spec_{layer}_std'] = _mean_std(
          [r['spec_layers'].get(layer, float('nan')) for r in ok])
    rows.append(row)
  return rows


def _layer_key(name: str):
  head, _, tail = name.rpartition('_')
  return (head, int(tail)) if tail.isdigit() else (name, -1)


def layer_columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
  """'spec_<layer>' for every MoE layer in any row (group rows hold them as
  keys, run records in 'spec_layers'), in layer order."""
  names = set()
  for r in rows:
    names.update(r.get('spec_layers', {}))
    names.update(k[len('spec_'):] for k in r if k.startswith('spec_') and
                 not k.endswith('_std') and k not in METRICS and
                 k != 'spec_layers')
  return [f'spec_{n}' for n in sorted(names, key=_layer_key)]


def short_key(key: str, keys: Sequence[str]) -> str:
  """The last dotted component of `key` if no other key shares it."""
  last = key.rsplit('.', 1)[-1]
  clash = sum(k.rsplit('.', 1)[-1] == last for k in keys) > 1
  return key if clash else last


def format_value(value: Any) -> str:
  """An override value for tables and file names (None -> 'none')."""
  if value is None:
    return 'none'
  if isinstance(value, float):
    return f'{value:g}'
  return str(value)


def write_csv(path: str, rows: Sequence[Mapping[str, Any]],
              keys: Sequence[str], per_run: bool = False) -> None:
  """Writes group rows (or run records with per_run) as CSV.

  Args:
    path: output file.
    rows: from `aggregate` (or run records).
    keys: the swept config keys (one column each, full dotted names).
    per_run: rows are runs: no '_std' columns, plus 'seed'.
  """
  metrics = list(METRICS) + layer_columns(rows)
  head = ['point'] + list(keys) + (['seed', 'status'] if per_run else
                                   ['seeds', 'seeds_ok', 'status'])
  cols = metrics if per_run else [c for m in metrics
                                   for c in (m, m + '_std')]
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(head + cols)
    for r in rows:
      spec = r.get('spec_layers', {})
      values = [r.get('name' if per_run else 'group')]
      values += ['dense baseline' if r.get('baseline') else
                 format_value(r['overrides'].get(k, '')) for k in keys]
      values += ([r['seed'], r['status']] if per_run else
                 [r['seeds'], r['seeds_ok'], r['status']])
      for c in cols:
        if c in r:
          v = r[c]
        elif c.startswith('spec_'):
          v = spec.get(c[len('spec_'):], float('nan'))
        else:
          v = float('nan')
        values.append('' if isinstance(v, float) and math.isnan(v) else v)
      writer.writerow(values)
