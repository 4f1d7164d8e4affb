"""experiments.memory_check: the train-step memory estimate and the check
that refuses a run before it compiles.

The estimate is pinned three ways: by hand for switch:tiny (the arithmetic
in the comments), against XLA's own accounting of the compiled train step
for two small configs (within 2x), and by the refusal of batch 32768
without any compile.
"""

import time

import jax
import jax.numpy as jnp
import pytest

from experiments import config_lib
from experiments import memory_check
from moejax.train import state as state_lib
from moejax.train import step as step_lib


def _config(name, **overrides):
  config = config_lib.load_config(f'configs/{name}.py:tiny')
  config = config_lib.apply_overrides(config, overrides)
  config_lib.validate_config(config)
  return config, config_lib.build_model(config)


class FakeGpu:
  """A device that reports 16 GiB, as a GPU's memory_stats does."""
  platform, device_kind = 'gpu', 'fake 16 GiB GPU'

  def memory_stats(self):
    return {'bytes_limit': 16 * 2**30, 'bytes_in_use': 0}


@pytest.fixture
def backend_compiles():
  """Backend compilations (XLA) while the test runs."""
  events = []

  def listener(name, duration, **kwargs):
    del duration, kwargs
    if name == '/jax/core/compile/backend_compile_duration':
      events.append(name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  yield events
  jax.monitoring.unregister_event_duration_listener(listener)


def test_switch_tiny_by_hand():
  # B=16, L=64, D=64, F=128, H=4, V=256, E=4, K=1, cf=1.25, 2 MoE blocks,
  # float32 (a=4). Params: embed 256*64 + 2 blocks * (norms 2*64 + attn
  # 4*64*64 + router 64*4 + experts 2*4*64*128) + final norm 64 = 181056.
  config, model = _config('switch')
  est = memory_check.estimate_train_bytes(config, model)
  params = 181056 * 4
  token_d = 10 * (16 * 64) * 64 * 4  # 2621440 per block
  scores = 3 * 16 * 4 * 64 * 64 * 4  # 3145728 per block
  # One group of the whole batch (the config's group_sequences=-1): G=1,
  # S=16*64=1024, C = ceil(1.25 * 1024 * 1 / 4) = 320, E*C = 1280 slots
  # (as many as 16 per-sequence groups of 4*20): buffers
  # 4 * G*E*C * (D + F) * a, router 4 * G*S*E * 4 bytes.
  moe = 4 * 1280 * (64 + 128) * 4 + 4 * 1024 * 4 * 4  # 3997696
  logits = 5 * 16 * 64 * 256 * 4  # 5242880
  assert est['params'] == params and est['optimizer'] == 2 * params
  assert est['attention'] == 2 * scores
  assert est['moe_buffers'] == 2 * moe
  assert est['activations'] == 2 * (token_d + scores + moe)
  assert est['logits'] == logits
  assert est['total'] == (4 * params + 2 * (token_d + scores + moe) + logits
                          + 16 * 65 * 4)  # + the tokens [B, L + 1] int32
  # bfloat16 params with float32 master copies: AdamW's mu, nu and the
  # master at 4 bytes a param, 3 * 4 / 2 = 6x the bfloat16 param bytes
  # (the float32 routers, 2 * 64*4 params, counted as bfloat16 first).
  config16, model16 = _config('switch', **{'model.param_dtype': 'bfloat16',
                                           'train.master_weights': True})
  est16 = memory_check.estimate_train_bytes(config16, model16)
  assert est16['params'] == 181056 * 2 + 2 * 64 * 4 * 2  # routers float32
  assert est16['optimizer'] == 6 * est16['params']
  assert est16['total'] - est16['optimizer'] == (
      est['total'] - 4 * params + 2 * est16['params'])
  # Two batch shards halve the activations; two expert shards halve the
  # expert weights (2 * 2 * 4*64*128 params), not the rest.
  split = memory_check.estimate_train_bytes(config, model, 2, 2)
  assert split['activations'] == est['activations'] // 2
  assert split['params'] == params - 2 * 4 * 64 * 128 * 4


@pytest.mark.parametrize('name,overrides', [
    ('gshard', dict(train__batch_size=8)),  # top-2, E=4: MoE buffers
    # dropless 'blocked': the block-padded sorted rows, not E * S slots
    ('switch', dict(train__batch_size=8, model__moe__capacity_factor=None,
                    model__moe__eval_capacity_factor=None,
                    model__moe__dispatcher='blocked')),
    ('dense', {'data.seq_len': 128, 'data.example_len': 129,
               'train.batch_size': 4}),  # attention scores dominate
])
def test_estimate_is_within_2x_of_the_compiled_step(name, overrides):
  overrides = {k.replace('__', '.'): v for k, v in overrides.items()}
  config, model = _config(name, **overrides)
  optimizer, _ = config_lib.build_optimizer(config)
  b, l = config.train.batch_size, config.data.seq_len
  abstract = state_lib.abstract_train_state(model, optimizer, (b, l))
  step = step_lib.make_train_step(model, optimizer, seed=0)
  compiled = step.lower(abstract, jax.ShapeDtypeStruct(
      (b, l + 1), jnp.int32)).compile()
  memory = compiled.memory_analysis()
  xla = (memory.temp_size_in_bytes + memory.argument_size_in_bytes +
         memory.output_size_in_bytes)
  estimate = memory_check.estimate_train_bytes(config, model)['total']
  assert 0.5 * xla <= estimate <= 2 * xla, (estimate, xla)


def test_batch_32768_is_refused_without_compiling(backend_compiles):
  config, model = _config('switch', **{
      'train.batch_size': 32768, 'data.num_train': 32768,
      'data.num_eval': 32768, 'train.eval_batches': 1})
  memory_check.estimate_train_bytes(config, model)  # JAX's first trace
  start = time.perf_counter()
  with pytest.raises(ValueError) as info:
    memory_check.check_memory(config, model, FakeGpu())
  elapsed = time.perf_counter() - start
  message = str(info.value)
  # 2048 x the activations, logits and tokens of B=16 (test above) + state.
  assert message.startswith('train.batch_size=32768 x data.seq_len=64 needs '
                            'an estimated 47.3 GiB per training step'), message
  assert ('the device (fake 16 GiB GPU) has 16.0 GiB; allowed: a smaller '
          'train.batch_size (about 8192 fits)') in message, message
  assert not backend_compiles
  assert elapsed < 1.0, elapsed  # (~0.05 s; a compile takes minutes)


def test_what_fits_passes_and_device_memory():
  config, model = _config('switch')
  cpu = jax.devices('cpu')[0]
  assert memory_check.check_memory(config, model, cpu)['total'] == (
      memory_check.estimate_train_bytes(config, model)['total'])
  assert memory_check.device_memory_bytes(FakeGpu()) == 16 * 2**30
  host = memory_check.host_memory_bytes()
  assert memory_check.device_memory_bytes(cpu) == host
  with open('/proc/meminfo', encoding='utf-8') as f:
    total = int(f.readline().split()[1]) * 1024  # MemTotal: N kB
  assert 0 < host <= total
