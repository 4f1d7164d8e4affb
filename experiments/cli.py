"""The one command-line style of `python -m experiments.X`: argparse.

Every CLI in experiments/ parses its flags with argparse (no absl.flags):
`--flag VALUE` or `--flag=VALUE`, comma lists for several values
(`--num_experts 8,64`), and, where a program takes a run config,
experiments.train's `--config FILE[:VARIANT]` and
`--config.<dotted.key>=<value>` syntax (see `experiments.train.parse_args`).

A mistake on the command line is one line on stderr,
`error: <message> (see --help)`, naming the flag and the allowed values,
and exit code 2 (`EXIT_USER_ERROR`): no usage block, no traceback. `Parser`
does that for argparse's own errors and for `parser.error(...)`; the
`number`, `choice` and `comma_list` helpers below are argparse `type=`
functions whose messages say what is allowed:

    parser = cli.Parser(prog='python -m experiments.demo', ...)
    parser.add_argument('--top_k', type=cli.number(int, 'an int >= 1',
                                                    lambda v: v >= 1))
    # --top_k 0 -> error: argument --top_k: '0' is not allowed; allowed
    #              values: an int >= 1 (see --help)       exit code 2
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, Optional, Sequence

EXIT_USER_ERROR = 2


class Parser(argparse.ArgumentParser):
  """argparse whose errors are one line `error: ...` and exit code 2.

  The description and epilog keep their line breaks (a module docstring
  makes a good description).
  """

  def __init__(self, *args, **kwargs):
    kwargs.setdefault('formatter_class',
                      argparse.RawDescriptionHelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message):
    print(f'error: {message} (see --help)', file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def number(kind: type, allowed: str,
           ok: Optional[Callable[[float], bool]] = None) -> Callable:
  """An argparse `type`: text -> `kind` (int or float), finite, with ok(v).

  Args:
    kind: int or float.
    allowed: the allowed values in words, e.g. 'an int >= 1'.
    ok: value -> bool; None accepts every finite value.

  Returns:
    A function raising argparse.ArgumentTypeError that names `allowed`.
  """

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      value = None
    if (value is None or (kind is float and not math.isfinite(value)) or
        (ok is not None and not ok(value))):
      raise argparse.ArgumentTypeError(
          f'{text!r} is not allowed; allowed values: {allowed}')
    return value

  return parse


def choice(allowed: Sequence[str]) -> Callable:
  """An argparse `type`: text that must be one of `allowed`."""

  def parse(text: str) -> str:
    if text not in allowed:
      raise argparse.ArgumentTypeError(
          f'{text!r} is not allowed; allowed values: {", ".join(allowed)}')
    return text

  return parse


def comma_list(item: Callable, allowed: str) -> Callable:
  """An argparse `type`: 'a,b,c' -> (item('a'), item('b'), item('c')).

  Args:
    item: parses one element; raises ValueError or ArgumentTypeError, on
      '' too (as `number` and `choice` do), so that an empty list or
      element ('8,') is refused.
    allowed: the allowed elements in words, e.g. 'ints >= 1'.

  Returns:
    A function returning a non-empty tuple, or raising
    argparse.ArgumentTypeError that names the bad element and `allowed`.
  """

  def parse(text: str) -> tuple:
    parts = [part.strip() for part in text.split(',')]
    values = []
    for part in parts:
      try:
        values.append(item(part))
      except (ValueError, argparse.ArgumentTypeError):
        where = f' in {text!r}' if len(parts) > 1 else ''
        raise argparse.ArgumentTypeError(
            f'{part!r}{where} is not allowed; allowed values: a '
            f'comma-separated list of {allowed}') from None
    return tuple(values)

  return parse
