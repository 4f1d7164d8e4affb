"""Checks that transformers reads moejax's exported config.json the same
way as the original: for each fixture family, the HF model loaded from
`<exported>/<family>` gives exactly the logits of the one loaded from
`tests/fixtures/hf/<family>` in the same process (the tensors are
bit-identical by the tests; this checks the config mapping in the other
direction).

    python -c "...save_pretrained each fixture to /tmp/exp/<family>..."
    /work/torchenv/bin/python tools/check_export_in_hf.py /tmp/exp

Needs torch + transformers (not run by CI).
"""

import os
import sys

import numpy as np
import torch
import transformers

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'tests', 'fixtures', 'hf')


def logits(path, ids):
  model = transformers.AutoModelForCausalLM.from_pretrained(
      path, torch_dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


def main(exported):
  failed = 0
  for family in sorted(os.listdir(exported)):
    ref = np.load(os.path.join(FIXTURES, family, 'reference.npz'))
    got = logits(os.path.join(exported, family), ref['input_ids'])
    want = logits(os.path.join(FIXTURES, family), ref['input_ids'])
    diff = float(np.abs(got - want).max())
    print(f'{family}: max |exported - original| logits = {diff:.1e}')
    failed += diff > 0
  return int(failed > 0)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1]))
