"""The trainer on a device mesh (run by test_sharding.py, like
multidevice_checks.py): 8 fake CPU devices in this process, and 2 processes
x 4 fake devices on localhost started from here.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 PJRT_NPROC=16 \
      python -m pytest -q tests/sharding/trainer_checks.py

Every run is `experiments.train` on the tiny switch config, shrunk as in
tests/train (L=16, D=32, E=4, V=64) and further to 1 layer (less
compile time) with B=8 (divisible by the 8 batch shards of the (2, 4, 1)
mesh), 5 steps, a checkpoint at 3 and 5, one eval batch. The runs are
cached per module, and a persistent compilation cache lets a run on a mesh
that was compiled before skip compilation.

Meshes change the order of floating-point sums (a psum over devices adds
per-device partial sums; one device adds in another order), so losses on
different meshes agree to float tolerance (1e-5 relative), not bitwise.
A checkpoint restore moves data without arithmetic: it is bitwise exact.
"""

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import config_lib
from experiments import train
from moejax import sharding
from moejax.data import load_source
from moejax.train import Checkpointer
from moejax.train import abstract_train_state
from moejax.train import make_train_step
from tests.sharding.multidevice_checks import _collectives
from tests.train import helpers

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason='needs 8 devices: set XLA_FLAGS=--xla_force_host_platform_'
    'device_count=8 before JAX starts (test_sharding.py does)')

STEPS, SAVED = 5, 3  # checkpoints at 3 and 5; restores resume from 3
RTOL = 1e-5
MESHES = {'one': (1, 1, 1), 'eight': (2, 4, 1)}
_DIRS = {}  # tmp dirs of the module fixtures


@pytest.fixture(scope='module', autouse=True)
def _setup(tmp_path_factory):
  """The dataset, a persistent compilation cache, and the run directory."""
  root = tmp_path_factory.mktemp('trainer')
  _DIRS['data'] = str(root / 'tfds')
  _DIRS['runs'] = str(root / 'runs')
  for split in ('train', 'validation'):
    load_source('synthetic_mixture', split, _DIRS['data'], **helpers.DATA)
  with helpers.persistent_compilation_cache(root / 'jax_cache'):
    yield


def _argv(workdir, mesh, **extra) -> list[str]:
  return helpers.small_args(
      'switch', workdir, _DIRS['data'], train__batch_size=8,
      train__steps=STEPS, train__checkpoint_every=SAVED,
      train__eval_every=STEPS, train__eval_batches=1, mesh__data=mesh[0],
      mesh__expert=mesh[1], mesh__model=mesh[2], model__num_layers=1,
      # one group per sequence: 8 batch shards cannot split the config's
      # group of the whole batch
      model__moe__group_sequences=None, **extra)


def _records(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _losses(records) -> dict[int, float]:
  return {r['step']: r['train/loss'] for r in records if 'train/loss' in r}


@functools.lru_cache(maxsize=None)
def _run(name: str) -> str:
  """Trains run `name` (MESHES) for STEPS steps; returns its work dir."""
  workdir = os.path.join(_DIRS['runs'], name)
  assert train.main(_argv(workdir, MESHES[name])) == 0
  return workdir


def _assert_close(got: dict, want: dict, steps) -> None:
  for s in steps:
    np.testing.assert_allclose(got[s], want[s], rtol=RTOL, err_msg=f'step {s}')


def test_five_steps_on_8_devices_match_1_device():
  one, eight = _records(_run('one')), _records(_run('eight'))
  assert sorted(_losses(one)) == list(range(1, STEPS + 1))
  _assert_close(_losses(eight), _losses(one), range(1, STEPS + 1))
  for key in ('eval/loss', 'eval/aux_loss', 'train/grad_norm'):
    got = [r[key] for r in eight if key in r]
    want = [r[key] for r in one if key in r]
    assert got and len(got) == len(want), key
    np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=key)
  # Its stored config names the mesh (the layout itself is checked by the
  # HLO and restore tests below).
  with open(os.path.join(_run('eight'), 'config.json'), encoding='utf-8') as f:
    assert json.load(f)['mesh'] == {'data': 2, 'expert': 4, 'model': 1}


def _bench_config(kind: str):
  """configs/<kind>.py:tiny shrunk like the runs above (no data needed)."""
  config = config_lib.load_config(f'configs/{kind}.py:tiny')
  for key, value in dict(
      data__seq_len=16, data__example_len=helpers.DATA['example_len'],
      data__vocab_size=helpers.DATA['vocab_size'],
      data__num_train=helpers.DATA['num_train'],
      data__num_eval=helpers.DATA['num_eval'], model__d_model=32,
      model__d_ff=64, model__num_heads=2, model__num_layers=1,
      train__batch_size=8).items():
    section, name = key.split('__')
    config[section][name] = value
  return config


def test_bench_mesh_runs_the_same_step_on_every_mesh():
  """experiments.bench_mesh: the trainer's step of the MoE config on one
  device and on the expert-parallel (2, 4, 1) mesh, the dense config's on
  the mesh; both MoE variants reach the same params after their two steps
  (warm-up and one timed), and every variant gets a timed row."""
  # pylint: disable=import-outside-toplevel
  from experiments import bench_common
  from experiments import bench_mesh
  one, eight = MESHES['one'], MESHES['eight']
  variants = {
      (kind, shape): bench_mesh._variant(  # pylint: disable=protected-access
          bench_mesh.mesh_config(_bench_config(name), shape), shape)
      for kind, name, shape in (('moe', 'switch', one),
                                ('moe', 'switch', eight),
                                ('dense', 'dense', eight))}
  times, states = bench_common.time_train_steps(variants, 1, 1)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=RTOL,
                                 atol=1e-7),
               states['moe', eight].params, states['moe', one].params)
  rows = bench_mesh.table_rows(times, {'moe': 128, 'dense': 128}, [one, eight])
  got = {(r['config'], r['mesh']): r for r in rows}
  assert set(got) == {('moe', '1x1x1'), ('moe', '2x4x1'), ('dense', '2x4x1')}
  assert got['moe', '2x4x1']['ratio_to_dense'] > 0
  assert got['moe', '1x1x1']['ratio_to_dense'] is None  # no dense pair
  with pytest.raises(ValueError, match='mesh 16x1x1 needs 16 devices but 8 '
                     'are available'):
    bench_mesh.mesh_config(_bench_config('switch'), (16, 1, 1))
  with pytest.raises(ValueError, match='train.batch_size=8 must be divisible '
                     'by the batch shards mesh.data \\* mesh.expert = 3'):
    bench_mesh.mesh_config(_bench_config('switch'), (3, 1, 1))


def test_trainers_step_is_expert_parallel():
  # The program the (2, 4, 1) run trained with (same arguments as loop.py:
  # the persistent cache returns it without compiling again).
  workdir = _run('eight')
  args, overrides = train.parse_args(_argv(workdir, MESHES['eight']))
  config = train.load_and_validate(args.config, overrides)
  model = config_lib.build_model(config)
  optimizer, schedule = config_lib.build_optimizer(config)
  mesh = sharding.make_mesh(*MESHES['eight'])
  b, l = config.train.batch_size, config.data.seq_len
  abstract = abstract_train_state(model, optimizer, (b, l), mesh)
  moe = config.model.moe
  step = make_train_step(
      model, optimizer, seed=config.seed, aux_loss_weight=moe.aux_loss_weight,
      z_loss_weight=moe.z_loss_weight, pad_id=config.data.pad_id,
      learning_rate_fn=schedule, mesh=mesh,
      state_shardings=sharding.tree_shardings(abstract, mesh))
  tokens = jax.ShapeDtypeStruct((b, l + 1), jnp.int32,
                                sharding=sharding.batch_sharding(mesh))
  hlo = step.lower(sharding.abstract_with_shardings(abstract, mesh),
                   tokens).compile().as_text()
  counts = _collectives(hlo)
  print('train step on (2, 4, 1):', counts)
  # The expert exchange (forward and its transpose in the backward pass)
  # and the gradient all-reduces over the batch shards; nothing gathered.
  assert counts['all-to-all'] >= 2 and counts['all-reduce'] >= 1, counts
  assert counts['all-gather'] == 0, counts


def _restore(workdir, mesh_shape, step):
  """Checkpoint `step` of `workdir` restored onto a mesh (None: 1 device,
  no shardings asked)."""
  args, overrides = train.parse_args(_argv(workdir, (1, 1, 1)))
  config = train.load_and_validate(args.config, overrides)
  abstract = abstract_train_state(
      config_lib.build_model(config), config_lib.build_optimizer(config)[0],
      (config.train.batch_size, config.data.seq_len))
  target = abstract
  if mesh_shape is not None:
    target = sharding.abstract_with_shardings(
        abstract, sharding.make_mesh(*mesh_shape))
  checkpointer = Checkpointer(workdir, log=lambda m: None)
  try:
    return checkpointer.restore(target, step), target  # CRC-checked
  finally:
    checkpointer.close()


@pytest.mark.parametrize('source,target', [
    ('one', (2, 4, 1)), ('eight', (1, 1, 1)), ('eight', (1, 8, 1))],
    ids=['1_to_8', '8_to_1', '241_to_181'])
def test_checkpoint_restores_on_another_mesh(source, target, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(_run(source), workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', str(STEPS)))
  # Restoring is exact and lays every leaf out as the target mesh says.
  state, wanted = _restore(workdir, target, SAVED)
  plain, _ = _restore(workdir, None, SAVED)
  helpers.assert_bitwise_equal(state, plain)
  for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(wanted)):
    assert leaf.sharding.is_equivalent_to(want.sharding, leaf.ndim)
  wi = state.params['block_0']['ffn']['experts']['wi']  # [E, D, F] = [4,..]
  # E over 'expert' when the axis divides E = 4; on (1, 8, 1) (2 devices per
  # expert) the expert weights are replicated.
  assert wi.sharding.spec[0] == ('expert' if 4 % target[1] == 0 else None)
  assert len(wi.sharding.device_set) == np.prod(target)
  # Training continues on the target mesh with the source run's losses.
  assert train.main(_argv(workdir, target)) == 0
  got, want = _losses(_records(workdir)), _losses(_records(_run(source)))
  assert sorted(got) == list(range(1, STEPS + 1))
  assert [got[s] for s in range(1, SAVED + 1)] == [
      want[s] for s in range(1, SAVED + 1)]  # records kept from the source
  _assert_close(got, want, range(SAVED + 1, STEPS + 1))


# The coordinator's port. jax.distributed takes an address, not a socket,
# so a free port must be closed again before process 0's coordinator binds
# it, and in between any other program on the machine may take it: a race
# no choice of port closes. So a start whose coordinator could not bind its
# port (these lines in its log) is retried, on a fresh port and work dir,
# up to START_ATTEMPTS times; any other failure fails at once.
_BIND_FAILED = re.compile(r'Failed to add port to server|Failed to start RPC '
                          r'server|[Aa]ddress already in use')
START_ATTEMPTS = 3


def _free_port() -> int:
  """A port that is free now on every address: the coordinator listens on
  [::] (IPv6 and IPv4); IPv4 only where the host has no IPv6."""
  for family, host in ((socket.AF_INET6, '::'), (socket.AF_INET, '')):
    try:
      with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
    except OSError:
      continue
  raise OSError('no free port on :: or 0.0.0.0')


def _start_processes(workdir, logdir, port, count=2):
  """`count` trainer processes of 4 fake devices each, one jax.distributed
  job with its coordinator at localhost:`port`, on the (2, 4, 1) mesh over
  their 8 devices; each logs to `logdir`/process_<i>.log."""
  env = dict(helpers.cache_env(), JAX_PLATFORMS='cpu', PJRT_NPROC='8',
             XLA_FLAGS='--xla_force_host_platform_device_count=4 '
                       '--xla_backend_optimization_level=0')
  procs = []
  for i in range(count):
    argv = _argv(workdir, MESHES['eight'],
                 distributed__coordinator_address=f'localhost:{port}',
                 distributed__num_processes=count, distributed__process_id=i)
    with open(os.path.join(logdir, f'process_{i}.log'), 'w') as log:
      procs.append(subprocess.Popen(
          [sys.executable, '-m', 'experiments.train'] + argv,
          cwd=helpers.REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _wait_all(procs, timeout) -> list[int]:
  """Waits for every process; on a timeout or a failure kills the rest (by
  PID, SIGKILL: JAX traps SIGTERM). Returns the exit codes."""
  deadline = time.time() + timeout
  try:
    while any(p.poll() is None for p in procs) and time.time() < deadline:
      if any(p.poll() not in (None, 0) for p in procs):
        break  # one failed: the others would wait for it forever
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait(timeout=30)
  return [p.returncode for p in procs]


def _train_two_processes(root, timeout, count=2) -> tuple[str, str]:
  """The 2-process run, retried on a coordinator port taken by another
  program (see _BIND_FAILED); returns (work dir, log dir) of the attempt
  that finished."""
  for attempt in range(1, START_ATTEMPTS + 1):
    logdir = os.path.join(root, f'attempt_{attempt}')
    os.makedirs(logdir)
    workdir = os.path.join(logdir, 'run')
    port = _free_port()
    codes = _wait_all(_start_processes(workdir, logdir, port, count),
                      timeout)
    if codes == [0] * count:
      return workdir, logdir
    logs = []
    for i in range(count):
      with open(os.path.join(logdir, f'process_{i}.log')) as f:
        logs.append(f.read())
    if not any(map(_BIND_FAILED.search, logs)):
      break
    print(f'attempt {attempt}: the coordinator could not bind port {port}')
  tails = ''.join(log[-3000:] for log in logs)
  pytest.fail(f'attempt {attempt} of {START_ATTEMPTS}: exit codes {codes} '
              f'(timeout {timeout}s):\n{tails}')


def test_two_processes_match_one_process(tmp_path):
  workdir, logdir = _train_two_processes(str(tmp_path), 240)
  got = _losses(_records(workdir))  # written by process 0 only
  assert sorted(got) == list(range(1, STEPS + 1))
  _assert_close(got, _losses(_records(_run('one'))), range(1, STEPS + 1))
  _assert_close(got, _losses(_records(_run('eight'))), range(1, STEPS + 1))
  for i in range(2):
    with open(os.path.join(logdir, f'process_{i}.log')) as f:
      log = f.read()
    assert f'process {i} of 2, 4 local of 8 devices' in log, log[-2000:]
  # Both processes wrote their shards of one checkpoint: it restores here
  # (one process, 8 devices). The step-3 state matches the 1-process run's
  # to float tolerance (Adam's first updates are ~learning rate x sign).
  state, _ = _restore(workdir, MESHES['eight'], SAVED)
  want, _ = _restore(_run('eight'), MESHES['eight'], SAVED)
  assert int(state.step) == SAVED
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
