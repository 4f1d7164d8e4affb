"""Import time and peak host memory of a large HF checkpoint.

    python -m experiments.hf_import_memory [--dir /tmp/moejax_big_mixtral]

Writes a random Mixtral-shaped checkpoint (default: D=1024, 8 layers,
E=8 experts of F=2816, V=32000, float32, ~2.6 GB in 1 GB shards with an
index) with `save_pretrained`, then imports it with `load_pretrained` in a
fresh Python process and reports the wall time and that process's peak
resident memory (VmHWM) next to the checkpoint's size and the RSS of
the same process before loading (jax and moejax imported). Streaming
tensor by tensor should keep the peak near the loaded params plus one
layer's experts, never two copies of the model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Sequence

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

_DIR = flags.DEFINE_string('dir', '/tmp/moejax_big_mixtral',
                           'Where the checkpoint is written (removed after '
                           'unless --keep).')
_KEEP = flags.DEFINE_boolean('keep', False, 'Keep the checkpoint.')
_LAYERS = flags.DEFINE_integer('num_layers', 8, 'Blocks.')
_D = flags.DEFINE_integer('d_model', 1024, 'D.')
_F = flags.DEFINE_integer('d_ff', 2816, 'F per expert.')
_E = flags.DEFINE_integer('num_experts', 8, 'E.')
_V = flags.DEFINE_integer('vocab_size', 32000, 'V.')

# VmHWM (peak RSS of this process image; unlike ru_maxrss it is not
# inherited from the parent across fork + exec), in kB.
_CHILD = r'''
import json, sys, time
import jax
from moejax.interop import hf
def hwm():
  for line in open('/proc/self/status'):
    if line.startswith('VmHWM:'):
      return int(line.split()[1])
before = hwm()
start = time.perf_counter()
model, variables = hf.load_pretrained(sys.argv[1])
jax.block_until_ready(variables)
seconds = time.perf_counter() - start
peak = hwm()
params = sum(x.nbytes for x in jax.tree.leaves(variables))
print(json.dumps(dict(seconds=seconds, rss_before_kb=before,
                      peak_rss_kb=peak, param_bytes=params)))
'''


def write_checkpoint(path: str) -> int:
  """A random Mixtral-shaped checkpoint at `path`; returns its bytes."""
  from moejax.interop import hf  # pylint: disable=import-outside-toplevel
  from moejax.models import TransformerLM  # pylint: disable=import-outside-toplevel
  model = TransformerLM(
      num_layers=_LAYERS.value, d_model=_D.value, num_heads=8,
      num_kv_heads=2, d_ff=_F.value, vocab_size=_V.value,
      activation='swiglu', tie_embeddings=False, norm_eps=1e-5,
      rope_base=1e6, moe=dict(num_experts=_E.value, top_k=2,
                              renormalize=True, capacity_factor=None,
                              eval_capacity_factor=None))
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, 8), jnp.int32))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
      lambda s: rng.standard_normal(s.shape, np.float32) * 0.02, abstract)
  hf.save_pretrained(model, variables, path, max_shard_bytes=1 << 30)
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
             if f.endswith('.safetensors'))


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  path = _DIR.value
  if os.path.exists(path):
    shutil.rmtree(path)
  size = write_checkpoint(path)
  out = subprocess.run([sys.executable, '-c', _CHILD, path], check=True,
                       capture_output=True, text=True).stdout
  stats = json.loads(out.strip().splitlines()[-1])
  gb = lambda kb: kb / 2**20
  print(f'checkpoint {size / 2**30:.2f} GiB in '
        f'{len([f for f in os.listdir(path) if f.endswith(".safetensors")])}'
        f' shards; params loaded {stats["param_bytes"] / 2**30:.2f} GiB in '
        f'{stats["seconds"]:.1f} s; peak RSS {gb(stats["peak_rss_kb"]):.2f} '
        f'GiB (before loading {gb(stats["rss_before_kb"]):.2f} GiB): '
        f'{(stats["peak_rss_kb"] - stats["rss_before_kb"]) * 1024 / size:.2f}'
        ' x the checkpoint above the baseline')
  if not _KEEP.value:
    shutil.rmtree(path)
  return 0


if __name__ == '__main__':
  app.run(main)
