"""Import time and peak host memory of a large HF checkpoint.

    python -m experiments.hf_import_memory [--dir /tmp/moejax_big_mixtral]
        [--keep] [--num_layers 8 --d_model 1024 --d_ff 2816 ...]

Writes a random Mixtral-shaped checkpoint (default: D=1024, 8 layers,
E=8 experts of F=2816, V=32000, float32, ~2.6 GB in 1 GB shards with an
index) with `save_pretrained`, then imports it with `load_pretrained` in a
fresh Python process and reports the wall time and that process's peak
resident memory (VmHWM) next to the checkpoint's size and the RSS of
the same process before loading (jax and moejax imported). Streaming
tensor by tensor should keep the peak near the loaded params plus one
layer's experts, never two copies of the model. --dir is emptied first
(removed if it exists) and removed after, unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli

EPILOG = """\
exit codes:
  0  done
  1  writing the checkpoint or the import in the child process failed
     (a traceback)
  2  a bad flag: one line `error: ...` on stderr naming the flag and the
     allowed values, before anything is written"""


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  """The flags (argv without the program name; None: sys.argv[1:]).

  A bad flag exits with code 2 and one `error:` line (cli.Parser).
  """
  positive = cli.number(int, 'an int >= 1', lambda v: v >= 1)
  parser = cli.Parser(prog='python -m experiments.hf_import_memory',
                      description=__doc__, epilog=EPILOG,
                      allow_abbrev=False)  # as absl: no prefixes
  parser.add_argument('--dir', metavar='DIR',
                      default='/tmp/moejax_big_mixtral',
                      help='where the checkpoint is written (removed first '
                           'if it exists, and after unless --keep; default '
                           '%(default)s)')
  parser.add_argument('--keep', action='store_true',
                      help='keep the checkpoint')
  parser.add_argument('--num_layers', metavar='N', type=positive, default=8,
                      help='blocks (default %(default)s)')
  parser.add_argument('--d_model', metavar='D', default=1024,
                      type=cli.number(int, 'an int >= 16 divisible by 16 '
                                      '(8 heads of an even width)',
                                      lambda v: v >= 16 and v % 16 == 0),
                      help='D, model width (8 heads; default %(default)s)')
  parser.add_argument('--d_ff', metavar='F', type=positive, default=2816,
                      help='F per expert (default %(default)s)')
  parser.add_argument('--num_experts', metavar='E', default=8,
                      type=cli.number(int, 'an int >= 2 (top-2 routing)',
                                      lambda v: v >= 2),
                      help='E (default %(default)s)')
  parser.add_argument('--vocab_size', metavar='V', type=positive,
                      default=32000, help='V (default %(default)s)')
  args = parser.parse_args(argv)
  if os.path.exists(args.dir) and not os.path.isdir(args.dir):
    parser.error(f'argument --dir: {args.dir!r} is a file; allowed values: '
                 'a directory (new or to be replaced)')
  return args


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


def write_checkpoint(path: str, args: argparse.Namespace) -> int:
  """A random Mixtral-shaped checkpoint at `path` of the flags' sizes;
  returns its bytes."""
  from moejax.interop import hf  # pylint: disable=import-outside-toplevel
  from moejax.models import TransformerLM  # pylint: disable=import-outside-toplevel
  model = TransformerLM(
      num_layers=args.num_layers, d_model=args.d_model, num_heads=8,
      num_kv_heads=2, d_ff=args.d_ff, vocab_size=args.vocab_size,
      activation='swiglu', tie_embeddings=False, norm_eps=1e-5,
      rope_base=1e6, moe=dict(num_experts=args.num_experts, top_k=2,
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


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Writes, imports and reports; returns 0 (a bad flag exits with code 2
  first).

  Args:
    argv: arguments without the program name (None: sys.argv[1:]).
  """
  args = parse_args(argv)
  path = args.dir
  if os.path.exists(path):
    shutil.rmtree(path)
  size = write_checkpoint(path, args)
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
  if not args.keep:
    shutil.rmtree(path)
  return 0


if __name__ == '__main__':
  sys.exit(main())
