"""A work dir's stored config.json against a new run's config.

`check_workdir_config` refuses to resume a work dir whose stored config
differs from the new one, listing the differing keys (exit code 2 in
`experiments.train`), unless the user passes --override or --fresh.
`load_stored_config` reads config.json back as a run config (for
`experiments.train --workdir W` without --config, e.g. after
`experiments.convert`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from configs import base as base_config
from experiments.config_lib import flatten
from experiments.config_lib import resolved_config

CONFIG_FILE = 'config.json'
_ABSENT = '<absent>'
# Where a run's arrays live and how its processes meet, not what it
# computes: a work dir may be resumed with other values (another mesh).
LAYOUT_KEYS = ('mesh.', 'distributed.')


def config_diff(stored: dict, new: dict) -> list[tuple[str, Any, Any]]:
  """Differing keys of two resolved configs, as (key, stored, new).

  A key the stored config lacks counts only if the new value is not the
  base default (so configs written before a key was added still match).

  Args:
    stored: the work dir's config.json (nested dict).
    new: the new run's resolved_config (nested dict).

  Returns:
    Sorted [(dotted key, stored value or '<absent>', new value or
    '<absent>')].
  """
  old, cur = flatten(stored), flatten(new)
  defaults = flatten(base_config.get_base_config().to_dict())
  out = []
  for key in sorted(set(old) | set(cur)):
    a, b = old.get(key, _ABSENT), cur.get(key, _ABSENT)
    if a == _ABSENT and key in defaults and b == defaults[key]:
      continue
    if a != b or isinstance(a, bool) != isinstance(b, bool):  # 1 vs True
      out.append((key, a, b))
  return out


def _merged(base: dict, stored: dict) -> dict:
  """`base` with `stored`'s values (recursively; keys only in `stored` are
  kept, so validation names them)."""
  out = dict(base)
  for key, value in stored.items():
    if isinstance(value, dict) and isinstance(out.get(key), dict):
      out[key] = _merged(out[key], value)
    else:
      out[key] = value
  return out


def load_stored_config(workdir: str) -> ml_collections.ConfigDict:
  """The run config stored in `<workdir>/config.json`.

  Keys the file lacks (it was written before they existed) take the base
  default, which is what that run used.

  Args:
    workdir: a run directory.

  Returns:
    The ConfigDict (not validated).

  Raises:
    ValueError: no readable config.json (names --config and the path).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise ValueError(f'--config is required: --workdir {workdir} has no '
                     f'{CONFIG_FILE} to take the config from; allowed: '
                     '--config FILE[:VARIANT], or a work dir made by a run '
                     'or by experiments.convert.')
  try:
    with open(path, encoding='utf-8') as f:
      stored = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'--workdir {workdir}: the stored {path} cannot be '
                     f'read ({e}); allowed: --config FILE[:VARIANT].') from e
  return ml_collections.ConfigDict(
      _merged(base_config.get_base_config().to_dict(), stored))


def untrained(workdir: str) -> bool:
  """Whether no step has been trained in `workdir`: its checkpoints (if
  any) are all of step 0, e.g. an imported model from experiments.convert.
  A new config then mixes nothing."""
  path = os.path.join(workdir, 'checkpoints')
  steps = ([int(n) for n in os.listdir(path) if n.isdigit()]
           if os.path.isdir(path) else [])
  return all(step == 0 for step in steps)


def _fmt(value: Any) -> str:
  return value if value == _ABSENT else repr(value)


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str,
                         override: bool = False) -> list[str]:
  """Refuses a work dir whose stored config.json differs from `config`.

  The LAYOUT_KEYS (`mesh.*`, `distributed.*`) are not compared: a run may
  resume on another mesh or another number of hosts (checkpoints restore
  onto any mesh; results agree to float tolerance).

  Args:
    config: the new run's (validated) config.
    workdir: the run directory (may not exist yet).
    override: accept the differences (the caller continues the run with
      the new config).

  Returns:
    The differing keys as 'key: stored -> new' lines ([] if none or no
    stored config).

  Raises:
    ValueError: the configs differ (or config.json is unreadable) and not
      `override`; the message lists every differing key.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return []
  try:
    with open(path, encoding='utf-8') as f:
      stored = json.load(f)
  except (OSError, ValueError) as e:
    if override:
      return [f'(unreadable {path}: {e})']
    raise ValueError(
        f'--workdir {workdir}: the stored {path} cannot be read ({e}); '
        'allowed: --override to continue with the new config, or --fresh '
        'to move the old run aside and start over.') from e
  lines = [f'  {key}: {_fmt(a)} -> {_fmt(b)}'
           for key, a, b in config_diff(stored, resolved_config(config))
           if not key.startswith(LAYOUT_KEYS)]
  if lines and not override:
    raise ValueError(
        f'--workdir {workdir} holds a run with a different config ({path});'
        ' the differing keys (stored -> new):\n' + '\n'.join(lines) +
        '\nResuming would mix two configs in one run. Allowed: the stored '
        'values (the same command as before); --override to continue this '
        'run with the new config (the stored one is kept as config.<n>.json);'
        ' or --fresh to move the old run aside and start over.')
  return lines
