"""What a device mesh costs: the trainer's train step on data / expert /
model meshes, MoE against dense.

    python -m experiments.bench_mesh [--config configs/switch.py:small]
        [--dense_config configs/dense.py:small]
        [--meshes 1x1x1,8x1x1,1x8x1,2x4x1,4x1x2] [--steps 3] [--repeats 3]
        [--json FILE]

A mesh is DATAxEXPERTxMODEL (mesh.data, mesh.expert, mesh.model: README
"Scaling out"). For every mesh, the trainer's own jitted train step
(`moejax.train.make_train_step` on the mesh, the state created with the
trainer's shardings, the batch split over the batch axes) of the MoE config
and of the dense config: with mesh.expert > 1 the MoE layers run
expert-parallel (an all_to_all of the expert buffers). Every variant is
compiled and run once first; then --repeats rounds run --steps steps of
each in turn (round-robin, so a slow spell of a shared machine hits them
all), blocking on every step. Reported: the median seconds per step,
tokens/s, the MoE step's ratio to the dense step on the same mesh (Switch
top-1 at the dense model's d_ff has the dense model's active FLOPs up to
the router), and each step's ratio to the same config on the first mesh.

Devices: on a multi-GPU or TPU host, the real ones. On CPU, fake ones,
which must exist before JAX starts:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 PJRT_NPROC=16 \\
        python -m experiments.bench_mesh

They share the host's cores, so a CPU row measures what partitioning and
the collectives add to the same total work, not a speed-up. A config's
group of the whole batch (`group_sequences=-1`, the Switch configs'
default) becomes one group per sequence: a batch shard cannot hold it
(`bench_common.per_sequence_groups`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Optional, Sequence

import jax
import numpy as np

from experiments import bench_common
from experiments import cli
from experiments import config_lib
from experiments import model_config
from experiments import train as train_cli
from moejax import sharding
from moejax.train import make_train_step
from moejax.train import create_train_state

EPILOG = """exit codes: 0 ok, 2 bad flag, config or mesh (one line on stderr,
  e.g. error: mesh 1x8x1 needs 8 devices but 1 are available; ...)."""
DEFAULT_MESHES = ((1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 4, 1), (4, 1, 2))


def _mesh_shape(text: str) -> tuple[int, int, int]:
  """'2x4x1' -> (2, 4, 1); argparse error naming the allowed form."""
  parts = text.split('x')
  if len(parts) != 3 or not all(p.isdigit() and int(p) >= 1 for p in parts):
    raise argparse.ArgumentTypeError(
        f'{text!r} is not allowed; allowed values: DATAxEXPERTxMODEL with '
        'ints >= 1, e.g. 2x4x1')
  return tuple(int(p) for p in parts)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  """The flags (see the module doc); a bad one exits 2 with one line."""
  parser = cli.Parser(prog='python -m experiments.bench_mesh',
                      description=__doc__, epilog=EPILOG)
  positive = cli.number(int, 'an int >= 1', lambda v: v >= 1)
  parser.add_argument('--config', default='configs/switch.py:small',
                      metavar='FILE[:VARIANT]', help='the MoE run config')
  parser.add_argument('--dense_config', default='configs/dense.py:small',
                      metavar='FILE[:VARIANT]',
                      help="the dense run config ('' for none)")
  parser.add_argument('--meshes', type=cli.comma_list(
      _mesh_shape, 'DATAxEXPERTxMODEL shapes, e.g. 1x1x1,2x4x1'),
                      default=DEFAULT_MESHES, metavar='DxExM[,...]',
                      help='the meshes, the first one the reference')
  bench_common.add_step_timing_flags(parser, positive, steps=3)
  args = parser.parse_args(argv)
  bench_common.check_json_flag(parser, args)
  return args


def _name(shape: Sequence[int]) -> str:
  return 'x'.join(map(str, shape))


def mesh_config(base, shape: Sequence[int]):
  """`base` on mesh `shape`, validated as the trainer would (ValueError
  naming the key, or the devices the mesh needs), before any compile."""
  config = base.copy_and_resolve_references()
  bench_common.per_sequence_groups(config)
  config.mesh.data, config.mesh.expert, config.mesh.model = shape
  needed = int(np.prod(shape))
  if needed > jax.device_count():
    hint = (f'; on CPU start with XLA_FLAGS=--xla_force_host_platform_'
            f'device_count={needed} PJRT_NPROC={2 * needed}'
            if jax.default_backend() == 'cpu' else '')
    raise ValueError(f'mesh {_name(shape)} needs {needed} devices but '
                     f'{jax.device_count()} are available; allowed: meshes '
                     f'of at most {jax.device_count()} devices{hint}.')
  config_lib.validate_config(config)
  config_lib.check_mesh_fit(config, tuple(shape))
  return config


def _variant(config, shape: Sequence[int]):
  """(step fn, state, tokens) of one config on one mesh, as the trainer
  builds them."""
  mesh = sharding.make_mesh(*shape)  # the first devices
  model = config_lib.build_model(config)
  optimizer, _ = config_lib.build_optimizer(config)
  b, l = config.train.batch_size, config.data.seq_len
  state = create_train_state(model, optimizer, (b, l), seed=0, mesh=mesh)
  shardings = jax.tree.map(lambda a: a.sharding, state)
  moe = config.model.moe
  step = make_train_step(model, optimizer, seed=0,
                         aux_loss_weight=moe.aux_loss_weight,
                         z_loss_weight=moe.z_loss_weight, mesh=mesh,
                         state_shardings=shardings)
  host = np.random.default_rng(1).integers(
      0, model_config.model_vocab_size(config), (b, l + 1), dtype=np.int32)
  tokens = sharding.shard_batch({'tokens': host}, mesh, b)['tokens']
  return step, state, tokens


def table_rows(times: dict, tokens_per_step: dict, meshes) -> list:
  """Rows (config, mesh, seconds_per_step, tokens_per_s, ratio_to_dense,
  ratio_to_first_mesh) from the round times of each (config, mesh)."""
  median = {key: statistics.median(t) for key, t in times.items()}
  rows = []
  for (kind, shape), seconds in median.items():
    dense = median.get(('dense', shape))
    first = median.get((kind, meshes[0]))
    rows.append({
        'config': kind, 'mesh': _name(shape), 'seconds_per_step': seconds,
        'tokens_per_s': tokens_per_step[kind] / seconds,
        'ratio_to_dense': (seconds / dense
                           if kind == 'moe' and dense else None),
        'ratio_to_first_mesh': seconds / first if first else None})
  return rows


def _print(rows: list) -> None:
  fmt = lambda v: '' if v is None else f'{v:.2f}'
  print(f'{"config":<6} {"mesh":<7} {"s/step":>8} {"tok/s":>8} '
        f'{"vs dense":>8} {"vs 1st":>7}')
  for r in rows:
    print(f'{r["config"]:<6} {r["mesh"]:<7} {r["seconds_per_step"]:>8.3f} '
          f'{r["tokens_per_s"]:>8.0f} {fmt(r["ratio_to_dense"]):>8} '
          f'{fmt(r["ratio_to_first_mesh"]):>7}')


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  specs = {'moe': args.config}
  if args.dense_config:
    specs['dense'] = args.dense_config
  try:
    bases = {k: train_cli.load_and_validate(v, {}) for k, v in specs.items()}
    configs = {(k, shape): mesh_config(base, shape)
               for k, base in bases.items() for shape in args.meshes}
  except ValueError as e:  # before anything compiles
    print(f'error: {e}', file=sys.stderr)
    return cli.EXIT_USER_ERROR
  tokens_per_step = {k: c.train.batch_size * c.data.seq_len
                     for k, c in bases.items()}
  variants = {key: _variant(config, key[1])
              for key, config in configs.items()}
  times, _ = bench_common.time_train_steps(variants, args.steps,
                                           args.repeats)
  rows = table_rows(times, tokens_per_step, list(args.meshes))
  _print(rows)
  if args.json:
    bench_common.write_rows_json(args.json, {
        'config': args.config, 'dense_config': args.dense_config,
        'steps': args.steps, 'repeats': args.repeats}, rows)
  return 0


if __name__ == '__main__':
  sys.exit(main())
