"""Generates tokens from a trained run's latest intact checkpoint.

    python -m experiments.generate --workdir runs/switch_tiny \
        --prompt_ids 1,2,3 --max_new_tokens 16 \
        [--temperature 0.8 --top_p 0.9 --seed 0]
    python -m experiments.generate --workdir W --prompt 'Once upon' ...

The work dir is one `experiments.train` wrote: its `config.json` rebuilds
the model (`config_lib.build_model`), and the params and model state
collections (e.g. 'moe_state') of the newest checkpoint that reads back
intact (CRC-checked as `moejax.train.Checkpointer` does) are restored; the
optimizer state is not read, and nothing in the work dir is changed (a
corrupt checkpoint is skipped with a warning, not moved), so a run can be
sampled while it trains. `--prompt TEXT` needs `<workdir>/tokenizer.json`
(a Hugging Face `tokenizers` file; `pip install tokenizers`); with one, the
output is also decoded to text.

Generation is greedy at --temperature 0 (the default), else sampled from
the top-p nucleus; MoE layers run without a capacity limit
(`moejax.generate`). Prints, on stdout:
    checkpoint: <workdir>/checkpoints/<step>
    ids: <prompt ids and new ids, comma-separated>
    new_ids: <the N new ids>
    text: <decoded ids>                        (with tokenizer.json)
    speed: <tokens/s of the per-token steps, compile excluded>

Exit codes: 0 done; 2 a user error (a missing or empty work dir, no
checkpoint or none intact, bad prompt ids, --prompt without tokenizer.json,
bad numbers), reported as one line `error: <message>` on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from experiments import cli
from experiments import config_lib
from moejax import generate as generate_lib
from moejax.train import TrainState
from moejax.train import checkpoint as checkpoint_lib

EXIT_USER_ERROR = cli.EXIT_USER_ERROR
TOKENIZER_FILE = 'tokenizer.json'


class UserError(Exception):
  """A mistake in the command line or the work dir (exit code 2)."""


class _Parser(cli.Parser):
  """cli.Parser whose errors are one `UserError` (main prints it as one
  line `error: ...` and returns 2), not an exit."""

  def error(self, message):
    raise UserError(message)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  """The command line (argv without the program name; None: sys.argv)."""
  parser = _Parser(prog='python -m experiments.generate',
                   description=__doc__)  # usage, output, exit codes
  parser.add_argument('--workdir', required=True,
                      help='run directory (config.json + checkpoints)')
  prompt = parser.add_mutually_exclusive_group(required=True)
  prompt.add_argument('--prompt_ids', help='comma-separated token ids')
  prompt.add_argument('--prompt', help='text (needs <workdir>/tokenizer.json)')
  parser.add_argument('--max_new_tokens', required=True,
                      help='tokens to generate (>= 1)')
  parser.add_argument('--temperature', default='0',
                      help='0 = greedy (default); > 0 samples')
  parser.add_argument('--top_p', default='1',
                      help='nucleus mass in (0, 1] (default 1: no cut)')
  parser.add_argument('--seed', default='0',
                      help='sampling seed (int >= 0; default 0)')
  args = parser.parse_args(argv)
  args.max_new_tokens = _number('--max_new_tokens', args.max_new_tokens, int,
                                'an int >= 1', lambda v: v >= 1)
  args.temperature = _number('--temperature', args.temperature, float,
                             'a number >= 0 (0 = greedy)', lambda v: v >= 0)
  args.top_p = _number('--top_p', args.top_p, float, 'a number in (0, 1]',
                       lambda v: 0 < v <= 1)
  args.seed = _number('--seed', args.seed, int, 'an int in [0, 2**32)',
                      lambda v: 0 <= v < 2**32)
  return args


def _number(flag: str, text: str, kind, allowed: str, ok):
  """Parses `text` as `kind` (int or float) and checks `ok(value)`."""
  try:
    value = kind(text)
  except ValueError:
    value = None
  if value is None or (kind is float and not math.isfinite(value)) or (
      not ok(value)):
    raise UserError(f'{flag}={text!r} is not allowed; allowed values: '
                    f'{allowed}.')
  return value


def parse_prompt_ids(text: str) -> list[int]:
  """'1, 2,3' -> [1, 2, 3]; UserError naming --prompt_ids otherwise."""
  parts = [p.strip() for p in text.split(',')]
  if not all(p.isascii() and p.isdigit() for p in parts):
    raise UserError(f'--prompt_ids={text!r} is not allowed; allowed values: '
                    'one or more comma-separated token ids >= 0, e.g. 1,2,3.')
  return [int(p) for p in parts]


def load_model(workdir: str):
  """The run's model, rebuilt from `<workdir>/config.json`."""
  if not os.path.isdir(workdir):
    problem = 'is not a directory' if os.path.exists(workdir) else (
        'does not exist')
    raise UserError(f'--workdir {workdir} {problem} (allowed: a run '
                    'directory written by experiments.train).')
  if not os.listdir(workdir):
    raise UserError(f'--workdir {workdir} is empty (allowed: a run '
                    'directory written by experiments.train).')
  path = os.path.join(workdir, 'config.json')
  try:
    with open(path, encoding='utf-8') as f:
      config = ml_collections.ConfigDict(json.load(f))
    return config_lib.build_model(config)
  except FileNotFoundError as e:
    raise UserError(f'--workdir {workdir} has no config.json: it is not a '
                    'run directory written by experiments.train.') from e
  except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
    first = (str(e).strip().splitlines() or [''])[0]
    raise UserError(f'{path} does not describe a moejax model '
                    f'({type(e).__name__}: {first}).') from e


def _abstract_variables(model):
  """{'params': ..., 'model_state': {collection: ...}} of ShapeDtypeStructs
  (traced, nothing allocated; shapes do not depend on the MoE capacity)."""
  model = generate_lib.inference_model(model)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 1), jnp.int32))
  shapes = dict(shapes)
  return {'params': shapes.pop('params'), 'model_state': shapes}


def _restore_step(directory: str, step: int, target):
  """Reads params + model_state of checkpoint `step` and checks their CRCs
  against its integrity record; returns {'params', 'model_state'}."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restore_args = jax.tree.map(
      lambda _: ocp.ArrayRestoreArgs(sharding=device), target)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as reader:
    restored = reader.restore(
        os.path.join(directory, str(step)), args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(target, restore_args=restore_args,
                                         partial_restore=True),
            integrity=ocp.args.JsonRestore()))
  saved = dict(map(tuple, restored.integrity['crc32']))
  state = restored.state
  got = checkpoint_lib.tree_crc32(TrainState(
      step=None, params=state['params'], opt_state=None,
      model_state=state['model_state']))
  for path, crc in got:
    if path not in saved or saved[path] not in (None, crc):
      raise checkpoint_lib.CheckpointCorruptError(
          f'checkpoint {step}: leaf {path} does not match its saved CRC-32')
  return state


def restore_variables(workdir: str, model, log=print) -> tuple[int, dict]:
  """The newest intact checkpoint's variables, read-only.

  Args:
    workdir: the run directory.
    model: its model (gives the restore target).
    log: where a skipped (unreadable or corrupt) checkpoint is reported.

  Returns:
    (step, {'params': ..., other collections}).
  """
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  steps = sorted((int(n) for n in (os.listdir(directory)
                                   if os.path.isdir(directory) else ())
                  if n.isdigit()), reverse=True)
  if not steps:
    raise UserError(f'--workdir {workdir} has no checkpoint (expected '
                    f'{directory}/<step>); train the run first.')
  target = _abstract_variables(model)
  for step in steps:
    try:
      state = _restore_step(directory, step, target)
    except Exception as e:  # pylint: disable=broad-except
      first = (str(e).strip().splitlines() or [''])[0][:300]
      log(f'warning: skipping checkpoint {step}, unreadable or corrupt '
          f'({type(e).__name__}: {first})')
      continue
    return step, {'params': state['params'], **state['model_state']}
  raise UserError(f'none of the checkpoints {steps} in {directory} can be '
                  'restored intact into the model of config.json.')


def load_tokenizer(workdir: str, required: bool):
  """`tokenizers.Tokenizer` of `<workdir>/tokenizer.json`, or None (no
  file, or the package is missing and the tokenizer only decodes)."""
  path = os.path.join(workdir, TOKENIZER_FILE)
  if not os.path.isfile(path):
    if required:
      raise UserError(f'--prompt needs {path} (a Hugging Face tokenizers '
                      'file); without one, pass --prompt_ids.')
    return None
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    if required:
      raise UserError('--prompt needs the tokenizers package: pip install '
                      'tokenizers') from e
    print('note: pip install tokenizers to decode the ids to text',
          file=sys.stderr)
    return None
  try:
    return tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'{path} cannot be read by tokenizers '
                    f'({type(e).__name__}: {e}).') from e


def _error(message: str, code: int = EXIT_USER_ERROR) -> int:
  first = (str(message).strip().splitlines() or [''])[0]
  print(f'error: {first}', file=sys.stderr, flush=True)
  return code


def _prompt(args, tokenizer) -> list[int]:
  if args.prompt_ids is not None:
    return parse_prompt_ids(args.prompt_ids)
  ids = list(tokenizer.encode(args.prompt).ids)
  if not ids:
    raise UserError(f'--prompt={args.prompt!r} encodes to no tokens; '
                    'allowed: a text of at least one token.')
  return ids


def _report(step_dir: str, tokens, prompt_len: int, stats, tokenizer) -> None:
  ids = [int(t) for t in tokens[0]]
  print(f'checkpoint: {step_dir}')
  print('ids: ' + ','.join(map(str, ids)))
  print('new_ids: ' + ','.join(map(str, ids[prompt_len:])))
  if tokenizer is not None:
    print('text: ' + tokenizer.decode(ids))
  if stats['decode_steps']:
    print(f'speed: {stats["tokens_per_s"]:.1f} tokens/s '
          f'({stats["ms_per_token"]:.2f} ms/token over '
          f'{stats["decode_steps"]} decode steps, compile excluded); '
          f'prefill {1e3 * stats["prefill_s"]:.0f} ms incl. compile')
  else:
    print('speed: n/a (the only new token comes from the prefill, '
          f'{1e3 * stats["prefill_s"]:.0f} ms incl. compile)')


def _quiet_closed_loop_errors() -> None:
  """Drops the "Event loop is closed" RuntimeErrors that tensorstore
  reports (as unraisable) after orbax gave up on a corrupt checkpoint: its
  pending reads finish after orbax's event loop closed. Anything else still
  reaches the previous hook."""
  previous = sys.unraisablehook
  if getattr(previous, 'moejax_quiet', False):
    return

  def hook(unraisable):
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and
            str(value) == 'Event loop is closed'):
      previous(unraisable)

  hook.moejax_quiet = True
  sys.unraisablehook = hook


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the CLI; returns the exit code (0 done, 2 user error)."""
  _quiet_closed_loop_errors()
  try:
    args = parse_args(argv)
    model = load_model(args.workdir)
    tokenizer = load_tokenizer(args.workdir, args.prompt is not None)
    prompt = [_prompt(args, tokenizer)]
    rng = jax.random.key(args.seed) if args.temperature else None
    generate_lib.check_generate_args(model, prompt, args.max_new_tokens,
                                     args.temperature, args.top_p, rng)
    step, variables = restore_variables(
        args.workdir, model, log=lambda m: print(m, file=sys.stderr))
  except (UserError, ValueError) as e:
    return _error(str(e))
  tokens, stats = generate_lib.generate_with_stats(
      model, variables, prompt, args.max_new_tokens,
      temperature=args.temperature, top_p=args.top_p, rng=rng)
  _report(os.path.join(args.workdir, 'checkpoints', str(step)), tokens,
          len(prompt[0]), stats, tokenizer)
  return 0


if __name__ == '__main__':
  sys.exit(main())
