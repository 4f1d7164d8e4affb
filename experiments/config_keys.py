"""Small helpers shared by the config modules (no project imports).

`load_file` / `call_in_file` import a config file and call its functions
(`get_config`, `get_sweeps`) so that any failure, from a syntax error to an
exception inside `get_config`, is one ValueError line naming the file, the
line and the problem (`experiments.train` prints it as `error: ...`, exit 2).
"""

from __future__ import annotations

import importlib.util
import os
import re
import traceback
import types
from typing import Any, Callable

import ml_collections


def flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1} (dicts are recursed into, not leaves)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out.update(flatten(dict(value), f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def require(key: str, value: Any, ok: bool, allowed: str) -> None:
  """Raises ValueError naming `key`, `value` and the allowed values unless
  `ok`."""
  if not ok:
    raise ValueError(f'{key}={value!r} is not allowed; allowed values: '
                     f'{allowed}.')


def is_int(value: Any) -> bool:
  """An int that is not a bool."""
  return isinstance(value, int) and not isinstance(value, bool)


def first_line(error: BaseException) -> str:
  """The first line of an exception's message ('(no message)' if empty)."""
  text = str(error).strip()
  return text.splitlines()[0] if text else '(no message)'


def _where(error: BaseException, path: str) -> str:
  """' at line N' of the innermost traceback frame in `path` ('' if none)."""
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if os.path.abspath(f.filename) == os.path.abspath(path)]
  return f' at line {frames[-1].lineno}' if frames else ''


def load_file(path: str, prefix: str = 'moejax_config_') -> types.ModuleType:
  """Imports the Python file `path` as a fresh module.

  Args:
    path: an existing .py file (a config).
    prefix: module name prefix (the name is prefix + the file's stem).

  Returns:
    The module.

  Raises:
    ValueError, one line: "--config file 'x.py' has a syntax error at line
    3: ..." or "--config file 'x.py' raised NameError at line 7 when
    imported: ...".
  """
  stem = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(
      prefix + re.sub(r'\W', '_', stem), path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:  # also IndentationError
    where = ('' if os.path.abspath(e.filename or '') == os.path.abspath(path)
             else f' in {e.filename}')
    code = f' ({e.text.strip()!r})' if (e.text or '').strip() else ''
    raise ValueError(f'--config file {path!r} has a syntax error{where} at '
                     f'line {e.lineno}: {e.msg}{code}.') from e
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'--config file {path!r} raised {type(e).__name__}'
                     f'{_where(e, path)} when imported: {first_line(e)}'
                     ) from e
  return module


def call_in_file(path: str, fn: Callable[..., Any], arg: Any) -> Any:
  """`fn(arg)` (a function of the config file `path`), failures as one line.

  Args:
    path: the file `fn` comes from (for the message and its line number).
    fn: e.g. the module's get_config.
    arg: its argument (the variant string or None).

  Returns:
    What fn returns.

  Raises:
    ValueError naming the file and the call: a ValueError of fn keeps its
    message ("--config file 'x.py': get_config('huge'): config variant
    'huge' is not supported; ..."), any other exception gets its type and
    the line of the file where it was raised.
  """
  call = f'{fn.__name__}({arg!r})'
  try:
    return fn(arg)
  except ValueError as e:
    raise ValueError(f'--config file {path!r}: {call}: {e}') from e
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'--config file {path!r}: {call} raised '
                     f'{type(e).__name__}{_where(e, path)}: {first_line(e)}'
                     ) from e
