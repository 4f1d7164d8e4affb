"""Command-line trainer.

    python -m experiments.train --config configs/switch.py:tiny \
        --workdir runs/switch_tiny [--config.train.steps=50 ...]

`--config PATH[:VARIANT]` loads `get_config(VARIANT)` from PATH; every
`--config.<dotted.key>=<value>` (or `--config.<key> <value>`) overrides one
key (values are Python literals, `none`/`true`/`false`, or plain strings).
A bad config prints `error: <message naming the key>` to stderr and exits
with code 2 before any data is built or anything compiles. Re-running the
same command in the same workdir resumes from the latest checkpoint; SIGTERM
saves a checkpoint and exits with code 0.

Most of a tiny run's wall time is XLA compilation; setting
JAX_COMPILATION_CACHE_DIR=<dir> (JAX's persistent compilation cache) makes
re-runs and resumes of the same config skip it.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from experiments import config_lib
from experiments.config_lib import build_data  # pylint: disable=unused-import
from experiments.config_lib import build_model  # pylint: disable=unused-import


def parse_args(argv: Optional[Sequence[str]]):
  """Splits argv into (--config, --workdir) and the --config.<key> overrides.

  Args:
    argv: arguments without the program name (None: sys.argv[1:]).

  Returns:
    (argparse namespace with config, workdir; {dotted key: value}).
  """
  parser = argparse.ArgumentParser(
      prog='python -m experiments.train',
      description='Train a dense / MoE Transformer LM.',
      epilog='Override any key with --config.<dotted.key>=<value>.')
  parser.add_argument('--config', required=True,
                      help='config file and variant, e.g. '
                           'configs/switch.py:tiny')
  parser.add_argument('--workdir', required=True,
                      help='run directory (resumed if it has checkpoints)')
  args, rest = parser.parse_known_args(argv)
  overrides, i = {}, 0
  while i < len(rest):
    arg = rest[i]
    if not arg.startswith('--config.'):
      parser.error(f'unrecognized argument {arg!r}')
    key, eq, value = arg[len('--config.'):].partition('=')
    if not eq:
      if i + 1 >= len(rest):
        parser.error(f'{arg} needs a value')
      value, i = rest[i + 1], i + 1
    overrides[key] = config_lib.parse_value(value)
    i += 1
  return args, overrides


def load_and_validate(spec: str, overrides: dict):
  """Loads the config, applies overrides and validates (ValueError if bad).

  Args:
    spec: 'path[:variant]'.
    overrides: {dotted key: value}.

  Returns:
    The validated ConfigDict.
  """
  config = config_lib.load_config(spec)
  config = config_lib.apply_overrides(config, overrides)
  config_lib.validate_config(config)
  return config


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the trainer; returns the process exit code (0 ok, 2 bad config).

  Args:
    argv: arguments without the program name (None: sys.argv[1:]).

  Returns:
    Exit code.
  """
  args, overrides = parse_args(argv)
  start = time.time()
  try:
    config = load_and_validate(args.config, overrides)
    config_lib.check_resume_config(config, args.workdir)
    model = config_lib.build_model(config)
    train_loader, eval_data = config_lib.build_data(config)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  from moejax import train as train_lib  # pylint: disable=g-import-not-at-top
  optimizer, schedule = config_lib.build_optimizer(config)
  t, moe = config.train, config.model.moe
  result = train_lib.train_and_evaluate(
      model, workdir=args.workdir, train_loader=train_loader,
      eval_data=eval_data, steps=t.steps, seed=config.seed,
      optimizer=optimizer, learning_rate_fn=schedule,
      aux_loss_weight=moe.aux_loss_weight, z_loss_weight=moe.z_loss_weight,
      pad_id=config.data.pad_id, log_every=t.log_every,
      eval_every=t.eval_every, checkpoint_every=t.checkpoint_every,
      keep_checkpoints=t.keep_checkpoints,
      config=config_lib.resolved_config(config))
  final = result.last_eval or {}
  summary = ', '.join(f'{k} {v:.4f}' for k, v in final.items()
                      if k in ('eval/loss', 'eval/excess_loss'))
  status = 'stopped by SIGTERM' if result.preempted else 'done'
  print(f'{status}: step {result.step}/{t.steps}'
        f'{", " + summary if summary else ""}, wall {time.time() - start:.1f}s',
        flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
