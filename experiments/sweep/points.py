"""Sweep points -> runs: loading `get_sweeps`, naming, seeds, baseline.

A run is one training work dir: a sweep point (or the dense baseline) at one
seed. See `experiments.sweep` for the command line.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any, Optional, Sequence

from experiments import config_keys
from experiments import config_lib
from moejax.analysis import results as results_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
_SAFE = re.compile(r'[^A-Za-z0-9._=,+-]')
# Overrides under this prefix are MoE-only: the dense baseline does not get
# them (config_lib rejects MoE settings on a dense model).
MOE_PREFIX = 'model.moe.'
# A point may name itself: {LABEL_KEY: 'ReMoE', 'model.moe.router': 'relu'}.
# The label is the point's directory name and table row, not a config key.
LABEL_KEY = '_label'


@dataclasses.dataclass
class Run:
  """One training run: a sweep point (or the baseline) at one seed."""
  name: str  # directory name, e.g. 'num_experts=8,seed=0'
  group: str  # the name without the seed: one table row
  seed: int
  point: dict[str, Any]  # the point's own overrides (not global, not seed)
  overrides: dict[str, Any]  # everything passed to the trainer
  config: str  # absolute 'path[:variant]'
  workdir: str
  steps: int
  baseline: bool = False


def load_sweeps(spec: str) -> dict[str, list[dict[str, Any]]]:
  """`get_sweeps(variant)` of a config file, checked.

  Args:
    spec: 'path[:variant]' as for --config.

  Returns:
    {sweep name: [point, ...]}, each point a {dotted key: value} dict; {}
    if the file has no get_sweeps.
  """
  path, _, arg = spec.partition(':')
  found = next((p for p in (path, os.path.join(REPO, path))
                if os.path.isfile(p)), None)
  if found is None:
    raise ValueError(f'--config file {path!r} does not exist.')
  module = config_keys.load_file(found, prefix='moejax_sweeps_')
  sweeps = (config_keys.call_in_file(found, module.get_sweeps, arg or None)
            if hasattr(module, 'get_sweeps') else {})
  if not isinstance(sweeps, dict):
    raise ValueError(f'get_sweeps() of {found} returned a '
                     f'{type(sweeps).__name__}; allowed: a dict {{sweep name:'
                     ' [point, ...]}.')
  for name, points in sweeps.items():
    if not (isinstance(points, list) and points and all(
        isinstance(p, dict) and all(isinstance(k, str) for k in p)
        for p in points)):
      raise ValueError(f'get_sweeps() of {found}: sweep {name!r} must be a '
                       'non-empty list of {dotted key: value} dicts.')
  return sweeps


def select_sweep(spec: str, sweep: str) -> list[dict[str, Any]]:
  """The points of --sweep: a declared name, or an ad-hoc 'KEY=v1,v2'."""
  if '=' in sweep:
    key, _, values = sweep.partition('=')
    points = [{key.strip(): config_lib.parse_value(v)}
              for v in values.split(',') if v.strip()]
    if not key.strip() or not points:
      raise ValueError(f'--sweep={sweep!r}: an ad-hoc sweep is KEY=v1,v2,...')
    return points
  sweeps = load_sweeps(spec)
  if sweep not in sweeps:
    allowed = ', '.join(map(repr, sweeps)) or 'none declared'
    raise ValueError(f'--sweep={sweep!r} is not a sweep of {spec}; allowed '
                     f'values: {allowed}, or KEY=v1,v2,... (ad hoc).')
  return sweeps[sweep]


def swept_keys(points: Sequence[dict[str, Any]]) -> list[str]:
  """The config keys any point sets, in first-seen order."""
  keys = []
  for p in points:
    keys += [k for k in p if k not in keys and k != LABEL_KEY]
  return keys


def table_keys(points: Sequence[dict[str, Any]]) -> list[str]:
  """The results table's key columns: none (the labels) if points have
  labels, else `swept_keys`."""
  return [] if any(LABEL_KEY in p for p in points) else swept_keys(points)


def overrides_of(point: dict[str, Any]) -> dict[str, Any]:
  """A point's config overrides (the point without its label)."""
  return {k: v for k, v in point.items() if k != LABEL_KEY}


def point_name(point: dict[str, Any], keys: Sequence[str]) -> str:
  """Filesystem-safe name of a point: its label, else 'top_k=2,d_ff=128'
  ('base' if {})."""
  if LABEL_KEY in point:
    return _SAFE.sub('_', point[LABEL_KEY])
  parts = [f'{results_lib.short_key(k, keys)}={results_lib.format_value(v)}'
           for k, v in point.items()]
  return _SAFE.sub('_', ','.join(parts)) or 'base'


def _check_labels(points: Sequence[dict[str, Any]]) -> None:
  """Labels are all-or-none non-empty strings."""
  labelled = [LABEL_KEY in p for p in points]
  if any(labelled) and not all(labelled):
    raise ValueError(f'sweep points: {LABEL_KEY!r} is set on some points but'
                     ' not all; allowed: on every point or on none.')
  for p in points:
    label = p.get(LABEL_KEY, 'x')
    if not (isinstance(label, str) and label.strip()):
      raise ValueError(f'sweep point {p}: {LABEL_KEY}={label!r} is not '
                       'allowed; allowed values: a non-empty string.')


def cli_value(value: Any) -> str:
  """A Python value as the trainer's --config.k=<text> reads it back."""
  return 'none' if value is None else repr(value)


def _checked_config(spec: str, overrides: dict[str, Any],
                    what: Optional[str] = None):
  """Loads spec with overrides applied (unknown keys raise ValueError).

  With `what` (e.g. 'sweep point 2 of 3 (top_k=8,seed=0)') the config is
  also validated as the trainer will (`config_lib.validate_config`), and an
  error names `what` first.
  """
  try:
    config = config_lib.apply_overrides(config_lib.load_config(spec),
                                        overrides)
    if what:
      config_lib.validate_config(config)
  except ValueError as e:
    raise ValueError(f'{what}: {e}' if what else str(e)) from e
  return config


def make_runs(args, points: Sequence[dict[str, Any]],
              overrides: dict[str, Any]) -> list[Run]:
  """Expands points x seeds (+ baseline) into runs; validates every run.

  Every run's config (point, seed and --config overrides) is validated
  here, before anything trains: a bad value in any point fails the whole
  sweep at once, naming the point and the key.

  Args:
    args: the parsed CLI (config, workdir, seeds, baseline options).
    points: the sweep's points.
    overrides: --config.k=v overrides applied to every run.

  Returns:
    Baseline runs first (with the `overrides` outside model.moe.*), then
    points in declaration order, seeds inner.
  """
  if args.seeds < 1:
    raise ValueError(f'--seeds={args.seeds} is not allowed; allowed values: '
                     'an int >= 1.')
  spec = abs_spec(args.config)
  base = _checked_config(spec, overrides)
  seeds = [base.seed + i for i in range(args.seeds)]
  keys = swept_keys(points)
  _check_labels(points)
  runs, names = [], set()
  for index, point in enumerate(points):
    if 'seed' in point and args.seeds > 1:
      raise ValueError(f'sweep point {point} sets seed, so --seeds must be 1,'
                       f' got {args.seeds}.')
    group = point_name(point, keys)
    if group in names:
      raise ValueError(f'two sweep points are both named {group!r}.')
    names.add(group)
    own = overrides_of(point)
    for seed in ([point['seed']] if 'seed' in point else seeds):
      full = {**overrides, **own, 'seed': seed}
      name = group if 'seed' in point else f'{group},seed={seed}'
      steps = _checked_config(
          spec, full, f'sweep point {index + 1} of {len(points)} ({name})'
      ).train.steps
      runs.append(Run(name, group, seed, own, full, spec,
                      os.path.join(os.path.abspath(args.workdir), name),
                      steps))
  baseline = baseline_spec(args)
  if baseline:
    root = os.path.abspath(args.baseline_root or args.workdir)
    dense = {k: v for k, v in overrides.items()
             if not k.startswith(MOE_PREFIX)}
    runs[:0] = [Run(f'dense,seed={s}', 'dense', s, {},
                    {**dense, 'seed': s}, baseline,
                    os.path.join(root, f'dense,seed={s}'),
                    _checked_config(baseline, {**dense, 'seed': s},
                                    f'the dense baseline (seed={s})'
                                    ).train.steps, baseline=True)
                for s in sorted({r.seed for r in runs})]
  return runs


def abs_spec(spec: str) -> str:
  """'path[:variant]' with an absolute path (tried from the cwd, then the
  repository root)."""
  path, colon, arg = spec.partition(':')
  if not os.path.isfile(path) and os.path.isfile(os.path.join(REPO, path)):
    path = os.path.join(REPO, path)
  return os.path.abspath(path) + colon + arg


def baseline_spec(args) -> Optional[str]:
  """The dense baseline's 'path:variant', or None (no baseline)."""
  if args.no_baseline:
    return None
  path, _, variant = abs_spec(args.config).partition(':')
  spec = args.baseline_config or os.path.join(
      os.path.dirname(path), 'dense.py') + (f':{variant}' if variant else '')
  spec = abs_spec(spec)
  if spec.partition(':')[0] == path:
    return None  # sweeping the dense config itself
  if not os.path.isfile(spec.partition(':')[0]):
    raise ValueError(f'the dense baseline config {spec!r} does not exist; '
                     'allowed values: --baseline_config=PATH[:VARIANT], or '
                     '--no_baseline.')
  return spec


def trainer_command(run: Run) -> list[str]:
  """The plain `experiments.train` argv that reproduces a run."""
  return ([sys.executable, '-m', 'experiments.train', f'--config={run.config}',
           f'--workdir={run.workdir}'] +
          [f'--config.{k}={cli_value(v)}' for k, v in run.overrides.items()])
