"""Peak memory of a benchmark row, estimated from shapes before compiling.

Every row of `python -m experiments.benchmark` gets an estimate of the
bytes its program holds at once: arguments (params, inputs), outputs
(gradients) and XLA's temporary buffers. A row whose estimate exceeds the
budget is skipped before anything is compiled; its status says why:

    skipped: estimated 137.9 GiB > budget 11.0 GiB (ragged on CPU is a
    masked dense op: E x the memory of its [N, D] / [N, F] rows)

A row that fits is compiled, and XLA's own count for it
(`compiled.memory_analysis()`: argument + output + temp bytes, which
compiling does not allocate) is held against the budget again before it
runs (`compiled_gate`), so that a wrong estimate cannot crash the machine.

Axis letters: T tokens, S tokens per group, G = T / S groups, E experts,
K experts per token, C capacity, D model width, F expert hidden width,
N = T*K (token, choice) rows.

Layer rows are forward + backward (value_and_grad w.r.t. params and x).
Bytes, with a for the activations: the dtype's size on GPU/TPU, 4 on CPU
(XLA:CPU computes bfloat16 in float32; measured: about the same temp bytes
for both):

    params      2 * P * 4          P = E*2*D*F + D*E (MoE; dense: 2*D*K*F),
                                   the float32 params in, gradients out
    cast        2 * P * b          bfloat16 (b = 2): their copies in it
    tokens      TOKENS * T*D*a     x, y, their gradients, [G, S, D] copies
    router      ROUTER * T*E*4     logits, probabilities, their gradients
    buffers     BUFFERS * G*E*C*(D + F)*a      gather, einsum: expert
                                   buffers [G, E, C, D], hidden [G, E, C, F]
                                   and what the backward keeps of them
                BUFFERS * N*(D + F)*a          ragged, per_token: the
                                   sorted rows [N, D] and hidden [N, F]
                BUFFERS * P*(D + F)*a          blocked: the block-padded
                                   rows [P, D] and pre-activations [P, F],
                                   P = b * Bk (moejax.blocked: b from
                                   default_block_size(N, E), P <= N +
                                   E*(b - 1))
                BUFFERS * T*K*F*a              dense FFN of width K*F
    one_hot     ONE_HOT * G*S*E*C*a            einsum: the one-hot
                                   dispatch / combine tensors [G, S, E, C]
    masked      MASKED * E*N*(D + F)*a         ragged on CPU only:
                                   jax.lax.ragged_dot lowers to a dense dot
                                   over masked [E, N, D] / [E, N, F] copies
                                   of its operands (GPU/TPU have a grouped
                                   kernel: no such term)
    slices      SLICES * N*D*F*a               per_token: lax.map keeps
                                   each choice's [D, F] weight slice of
                                   both matmuls for the backward (CPU,
                                   bfloat16: a + b, in both dtypes)

The coefficients were read off `memory_analysis()` on CPU (jax 0.10.2,
float32 and bfloat16) from T=512, D=64, F=128 up to the default grid
(T=8192, D=512, F=2048, E up to 256): the estimate is 1.0 to 1.9 times
XLA's total, the most (1.7-1.9) for 'ragged' at E <= 8, where the masked
copies are fewer than MASKED (tests/test_bench_memory.py holds rows of
every dispatcher to 2x). On GPU/TPU they are not measured: the
`compiled_gate` covers them. Model rows use experiments.memory_check's
training-step estimate plus the new params and AdamW state the steps
return (3 P; not donated): 1.0 to 1.1 times XLA's total in float32, 0.8
in bfloat16 (tiny and small sizes).

Budget: --memory_budget_gb when given, else a fraction of the memory free
when the run starts: CPU_FRACTION of the host's MemAvailable (capped by a
cgroup's limit minus its usage), since other jobs share the RAM and the
estimate can be 2x off; ACCELERATOR_FRACTION of the device's
`bytes_limit - bytes_in_use` on GPU/TPU.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import ml_collections

from experiments import memory_check
from moejax import blocked

GIB, MIB = 2**30, 2**20
# Saved copies per tensor kind (module docstring), fitted on CPU.
TOKENS, ROUTER, BUFFERS, ONE_HOT, MASKED, SLICES = 8, 6, 3, 3, 4, 2
CPU_FRACTION = 0.5  # other jobs share the RAM; the estimate is within 2x
ACCELERATOR_FRACTION = 0.9  # the device is ours; leave the allocator room

NOTES = {  # part -> why it is large (the reason of a skipped row)
    'params': 'params and their gradients',
    'cast': 'params and gradients in the compute dtype',
    'tokens': 'the [T, D] activations and their gradients',
    'router': 'router logits and probabilities [T, E]',
    'buffers': 'expert buffers and hidden activations',
    'one_hot': 'einsum one-hot dispatch / combine tensors [G, S, E, C]',
    'masked': 'ragged on CPU is a masked dense op: E x the memory of its '
              '[N, D] / [N, F] rows',
    'slices': "per_token keeps every choice's [D, F] weight slices for the "
              'backward: N*D*F',
    'optimizer': 'AdamW state in and out',
    'activations': 'activations the backward keeps',
    'logits': 'logits and their gradients',
    'operands': 'the [N, N] operands and result',
}


@dataclasses.dataclass(frozen=True)
class LayerShape:
  """The shapes of one layer row (module docstring for the letters)."""
  tokens: int  # T
  group_size: int  # S
  num_experts: int  # E
  top_k: int  # K
  capacity: int  # C (unused by 'ragged', 'per_token' and 'blocked')
  d_model: int  # D
  d_ff: int  # F


def activation_itemsize(itemsize: int, platform: str) -> int:
  """a: the dtype's bytes, or 4 on CPU (XLA:CPU computes in float32)."""
  return max(itemsize, 4) if platform == 'cpu' else itemsize


def _finish(parts: dict) -> dict:
  parts['total'] = sum(parts.values())
  return parts


def layer_bytes(dispatcher: str, shape: LayerShape, itemsize: int,
                platform: str) -> dict:
  """Estimated bytes of one MoeLayer fwd+bwd row, by part (+ 'total').

  Args:
    dispatcher: 'einsum' | 'gather' | 'ragged' | 'per_token' | 'blocked'
      (a dropless gather or einsum row: capacity C = S).
    shape: the row's T, S, E, K, C, D, F.
    itemsize: bytes of the compute dtype (params are float32).
    platform: jax.default_backend() ('cpu', 'gpu', 'tpu').

  Returns:
    {'params', 'tokens', 'router', 'buffers', ... , 'total'}: ints, bytes.
  """
  t, e, k = shape.tokens, shape.num_experts, shape.top_k
  d, f = shape.d_model, shape.d_ff
  a = activation_itemsize(itemsize, platform)
  groups, n = t // shape.group_size, t * k
  parts = {**_param_parts(e * 2 * d * f + d * e, itemsize),
           'tokens': TOKENS * t * d * a, 'router': ROUTER * t * e * 4}
  if dispatcher in ('ragged', 'per_token'):
    parts['buffers'] = BUFFERS * n * (d + f) * a
  elif dispatcher == 'blocked':
    b = blocked.default_block_size(n, e)
    parts['buffers'] = BUFFERS * b * blocked.num_blocks(n, e, b) * (
        d + f) * a
  else:
    parts['buffers'] = BUFFERS * groups * e * shape.capacity * (d + f) * a
  if dispatcher == 'einsum':
    parts['one_hot'] = (ONE_HOT * groups * shape.group_size * e *
                        shape.capacity * a)
  if dispatcher == 'ragged' and platform == 'cpu':
    parts['masked'] = MASKED * e * n * (d + f) * a
  if dispatcher == 'per_token':  # on CPU kept in the dtype and in float32
    parts['slices'] = SLICES * n * d * f * (
        a + itemsize if platform == 'cpu' and itemsize < 4 else a)
  return _finish(parts)


def _param_parts(num_params: int, itemsize: int) -> dict:
  """float32 params and gradients, and their copies in a narrower
  compute dtype."""
  parts = {'params': 2 * num_params * 4}
  if itemsize < 4:
    parts['cast'] = 2 * num_params * itemsize
  return parts


def dense_bytes(tokens: int, d_model: int, width: int, itemsize: int,
                platform: str) -> dict:
  """Estimated bytes of the dense FFN (hidden `width`) fwd+bwd row."""
  a = activation_itemsize(itemsize, platform)
  return _finish({**_param_parts(2 * d_model * width, itemsize),
                  'tokens': TOKENS * tokens * d_model * a,
                  'buffers': BUFFERS * tokens * width * a})


def matmul_bytes(n: int, itemsize: int) -> dict:
  """Bytes of the [N, N] x [N, N] matmul: two operands and the result."""
  return _finish({'operands': 3 * n * n * itemsize})


def traced(fn: Callable[[], Any]) -> Any:
  """fn()'s Python result, computed under jax.eval_shape: the arrays it
  builds (e.g. a PRNG key for model.init's shapes) are traced, so nothing
  is compiled (--dry_run, and the gate of an over-budget row)."""
  out = []
  jax.eval_shape(lambda: out.append(fn()))
  return out[0]


def model_bytes(model, batch_size: int, seq_len: int) -> dict:
  """Estimated bytes of a model row's jitted training steps.

  experiments.memory_check's step estimate (params, AdamW state,
  gradients, activations, logits) plus the new params and AdamW state the
  steps return (3 P: the benchmark does not donate them). Nothing is
  compiled: the param shapes come from jax.eval_shape.
  """
  config = ml_collections.ConfigDict({'data': {'seq_len': seq_len},
                                      'train': {'batch_size': batch_size}})
  step = traced(lambda: memory_check.estimate_train_bytes(config, model))
  return _finish({'params': 2 * step['params'],
                  'optimizer': 4 * step['params'],
                  'activations': step['activations'] + step['params'],
                  'logits': step['logits']})


def size_text(num_bytes: float) -> str:
  """'31.2 GiB', or '8.3 MiB' below 1 GiB."""
  if num_bytes >= GIB:
    return f'{num_bytes / GIB:.1f} GiB'
  return f'{num_bytes / MIB:.1f} MiB'


def gate(estimate: dict, budget: Optional[int], dry_run: bool = False) -> str:
  """A row's status before compiling: 'ok', 'skipped: ...' with the reason
  (over budget), or 'fits (--dry_run: not run)'."""
  if budget is not None and estimate['total'] > budget:
    largest = max((k for k in estimate if k != 'total'), key=estimate.get)
    return (f'skipped: estimated {size_text(estimate["total"])} > budget '
            f'{size_text(budget)} ({NOTES[largest]})')
  return 'fits (--dry_run: not run)' if dry_run else 'ok'


def compiled_bytes(compiled) -> Optional[int]:
  """XLA's argument + output + temp - alias bytes of a compiled program;
  None where the backend has no memory_analysis."""
  try:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes +
            m.temp_size_in_bytes - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def compiled_gate(compiled_mib: Optional[float],
                  budget: Optional[int]) -> Optional[str]:
  """None, or 'skipped: ...' when XLA's count is over the budget."""
  if compiled_mib is None or budget is None or compiled_mib * MIB <= budget:
    return None
  return (f'skipped: compiled {size_text(compiled_mib * MIB)} > budget '
          f'{size_text(budget)} (XLA memory_analysis; the estimate was '
          'lower)')


def _meminfo_available() -> Optional[int]:
  try:
    with open('/proc/meminfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _cgroup_free() -> Optional[int]:
  """A cgroup v2 limit minus its usage, if a limit is set."""
  try:
    with open('/sys/fs/cgroup/memory.max', encoding='utf-8') as f:
      limit = f.read().strip()
    with open('/sys/fs/cgroup/memory.current', encoding='utf-8') as f:
      used = int(f.read().strip())
  except (OSError, ValueError):
    return None
  return int(limit) - used if limit.isdigit() else None


def host_available_bytes() -> int:
  """Free host RAM: MemAvailable (else os.sysconf's free pages), capped by
  a cgroup's free memory."""
  free = _meminfo_available()
  if free is None:
    free = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_AVPHYS_PAGES')
  cgroup = _cgroup_free()
  return min(free, cgroup) if cgroup is not None else free


def memory_budget(budget_gb: float, device: Any) -> tuple:
  """(budget bytes or None, where it comes from) for `device`.

  Args:
    budget_gb: --memory_budget_gb; 0 reads the device (module docstring).
    device: a JAX device.

  Returns:
    (bytes, text); bytes is None (no limit) when the device does not say.
  """
  if budget_gb:
    return int(budget_gb * GIB), '--memory_budget_gb'
  if getattr(device, 'platform', 'cpu') == 'cpu':
    free = host_available_bytes()
    return (int(CPU_FRACTION * free),
            f'{CPU_FRACTION} x host MemAvailable {size_text(free)}')
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  if 'bytes_limit' not in stats:
    return None, 'unknown: the device does not report its memory'
  free = stats['bytes_limit'] - stats.get('bytes_in_use', 0)
  return (int(ACCELERATOR_FRACTION * free),
          f'{ACCELERATOR_FRACTION} x device free {size_text(free)}')


def mib(num_bytes: Optional[float]) -> Optional[float]:
  """Bytes -> MiB rounded to 0.01 (None stays None)."""
  return None if num_bytes is None else round(num_bytes / MIB, 2)

