"""Logits and greedy-token parity of moejax with Hugging Face, per family.

    python -m experiments.hf_parity [--fixtures tests/fixtures/hf]
        [--out results/hf_parity.md]

For every model directory under --fixtures that holds a `reference.npz`
(made by tools/make_hf_fixtures.py with torch + transformers: HF's logits
on `input_ids` and HF's greedy continuation), loads it with
`moejax.interop.hf.load_pretrained`, and reports the max |logits - HF|
(float32, default and 'highest' matmul precision), whether the 16 greedy
tokens through moejax's KV cache equal HF's, and the import time. Writes
the Markdown table to --out and prints it.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from absl import app, flags
import jax
import numpy as np

from moejax import generate
from moejax.interop import hf

_FIXTURES = flags.DEFINE_string('fixtures', os.path.join('tests', 'fixtures',
                                                         'hf'),
                                'Directory of HF model directories.')
_OUT = flags.DEFINE_string('out', os.path.join('results', 'hf_parity.md'),
                           'Markdown table written here.')


def family_row(path: str) -> dict:
  """Parity figures of one fixture directory."""
  ref = np.load(os.path.join(path, 'reference.npz'))
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


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  root = _FIXTURES.value
  names = sorted(d for d in os.listdir(root) if os.path.exists(
      os.path.join(root, d, 'reference.npz')))
  text = table([family_row(os.path.join(root, n)) for n in names])
  print(text)
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
    with open(_OUT.value, 'w', encoding='utf-8') as f:
      f.write(text)
  return 0


if __name__ == '__main__':
  app.run(main)
