"""Logits and greedy-token parity of moejax with Hugging Face, per family.

    python -m experiments.hf_parity [--fixtures tests/fixtures/hf]
        [--out results/hf_parity.md]

For every model directory under --fixtures that holds a `reference.npz`
(made by tools/make_hf_fixtures.py with torch + transformers: HF's logits
on `input_ids` and HF's greedy continuation), loads it with
`moejax.interop.hf.load_pretrained`, and reports the max |logits - HF|
(float32, default and 'highest' matmul precision), whether the 16 greedy
tokens through moejax's KV cache equal HF's, and the import time. Writes
the Markdown table to --out (unless --out '') and prints it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np

from experiments import cli
from moejax import generate
from moejax.interop import hf

REFERENCE_FILE = 'reference.npz'
EPILOG = """\
exit codes:
  0  done
  1  a fixture failed to import or run (its traceback)
  2  a bad flag: one line `error: ...` on stderr naming the flag (e.g.
     --fixtures is not a directory, or holds no model directory with a
     reference.npz), before anything is imported"""


def fixture_names(root: str) -> list[str]:
  """The sorted model directories under `root` that hold a reference.npz."""
  return sorted(d for d in os.listdir(root) if os.path.exists(
      os.path.join(root, d, REFERENCE_FILE)))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  """The flags (argv without the program name; None: sys.argv[1:]).

  A bad flag exits with code 2 and one `error:` line (cli.Parser).
  """
  parser = cli.Parser(prog='python -m experiments.hf_parity',
                      description=__doc__, epilog=EPILOG,
                      allow_abbrev=False)  # as absl: no prefixes
  parser.add_argument('--fixtures', metavar='DIR',
                      default=os.path.join('tests', 'fixtures', 'hf'),
                      help='directory of HF model directories (default '
                           '%(default)s)')
  parser.add_argument('--out', metavar='FILE',
                      default=os.path.join('results', 'hf_parity.md'),
                      help="Markdown table written here; '' writes none "
                           '(default %(default)s)')
  args = parser.parse_args(argv)
  if not os.path.isdir(args.fixtures):
    problem = ('is not a directory' if os.path.exists(args.fixtures) else
               'does not exist')
    parser.error(f'argument --fixtures: {args.fixtures!r} {problem}')
  if not fixture_names(args.fixtures):
    parser.error(f'argument --fixtures: {args.fixtures!r} holds no model '
                 f'directory with a {REFERENCE_FILE} '
                 '(tools/make_hf_fixtures.py writes them)')
  return args


def family_row(path: str) -> dict:
  """Parity figures of one fixture directory."""
  ref = np.load(os.path.join(path, REFERENCE_FILE))
  start = time.perf_counter()
  model, variables = hf.load_pretrained(path)
  load_s = time.perf_counter() - start
  row = dict(name=os.path.basename(path), load_s=load_s,
             model_type=hf.read_config(path)['model_type'])
  for precision in ('default', 'highest'):
    with jax.default_matmul_precision(precision):
      logits, _ = jax.jit(model.apply)(variables, ref['input_ids'])
    row[precision] = float(np.abs(np.asarray(logits) - ref['logits']).max())
  with jax.default_matmul_precision('highest'):
    tokens = np.asarray(generate.generate(model, variables,
                                          ref['input_ids'], 16))
  new = tokens[:, ref['input_ids'].shape[1]:]
  want = ref['greedy'][:, ref['input_ids'].shape[1]:]
  row['greedy_equal'] = int((new == want).sum())
  row['greedy_total'] = int(want.size)
  return row


def table(rows: Sequence[dict]) -> str:
  lines = ['| fixture | model_type | max abs logits diff (default / highest '
           'precision) | greedy tokens equal | import time |',
           '|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["name"]} | {r["model_type"]} | {r["default"]:.1e} /'
                 f' {r["highest"]:.1e} | {r["greedy_equal"]}/'
                 f'{r["greedy_total"]} | {r["load_s"]:.2f} s |')
  return '\n'.join(lines) + '\n'


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Prints (and writes) the parity table; returns 0 (a bad flag exits with
  code 2 first).

  Args:
    argv: arguments without the program name (None: sys.argv[1:]).
  """
  args = parse_args(argv)
  root = args.fixtures
  text = table([family_row(os.path.join(root, n))
                for n in fixture_names(root)])
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(args.out, 'w', encoding='utf-8') as f:
      f.write(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
