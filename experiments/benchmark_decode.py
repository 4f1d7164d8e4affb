"""Decode latency of an MoE LM and of the dense LM of equal active params.

    python -m experiments.benchmark_decode [--batch_sizes 1,64] [--json FILE]

Axis letters: B batch (sequences decoded together), P prompt length, N new
tokens, D model width, F expert width, E experts, K experts per token.

Models (same attention, depth and vocab; random params):
  dense   one FFN of width K*F per block: the active params of the MoE.
  moe     E experts of width F per block, top-K softmax routing, no
          capacity limit (generation's inference model).
The MoE model's decode step is timed with each dispatcher: 'auto' (what
`moejax.generate` uses: 'per_token' when B*K < E, which gathers each
token's K experts' weights, else the layer's dispatcher), and 'gather'
(buffers [1, E, B, D] with one group per step: every expert runs on B
slots whatever it was chosen for) and 'ragged' (grouped matmuls; on CPU a
masked dense op). Each row reports ms per decode step (B tokens) and its
ratio to the dense model's at the same B.

Timing: per row, greedy `generate` of N tokens after a P-token prompt;
the N - 1 per-token steps are timed after a compiled warm-up step (the
prefill is not timed). Rows of one B are timed round-robin, `--repeats`
rounds, median per row, so ratios compare timings taken side by side.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
from typing import Sequence

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from moejax import generate
from moejax.models import TransformerLM, count_params

_BATCH = flags.DEFINE_list('batch_sizes', ['1', '64'], 'B values.')
_D = flags.DEFINE_integer('d_model', 512, 'D.')
_LAYERS = flags.DEFINE_integer('num_layers', 4, 'Blocks.')
_HEADS = flags.DEFINE_integer('num_heads', 8, 'Attention heads.')
_F = flags.DEFINE_integer('d_ff', 1024, 'F, one expert\'s width.')
_E = flags.DEFINE_integer('num_experts', 8, 'E.')
_K = flags.DEFINE_integer('top_k', 2, 'K.')
_V = flags.DEFINE_integer('vocab_size', 256, 'V.')
_PROMPT = flags.DEFINE_integer('prompt_len', 64, 'P.')
_NEW = flags.DEFINE_integer('new_tokens', 33, 'N (N - 1 timed steps).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Round-robin rounds.')
_DISPATCHERS = flags.DEFINE_list('dispatchers', ['auto', 'gather', 'ragged'],
                                 'Decode-step dispatchers of the MoE rows.')
_JSON = flags.DEFINE_string('json', None, 'Write {"machine", "rows"} here.')


def models() -> dict[str, TransformerLM]:
  """The dense and MoE models of equal active params (module docstring)."""
  common = dict(num_layers=_LAYERS.value, d_model=_D.value,
                num_heads=_HEADS.value, vocab_size=_V.value,
                activation='swiglu', tie_embeddings=False)
  return {
      'dense': TransformerLM(**common, d_ff=_K.value * _F.value),
      'moe': TransformerLM(**common, d_ff=_F.value, moe=dict(
          num_experts=_E.value, top_k=_K.value, capacity_factor=None,
          eval_capacity_factor=None)),
  }


def random_variables(model: TransformerLM, seed: int = 0) -> dict:
  """Params drawn with numpy at the init's shapes (no init to compile)."""
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, 8), jnp.int32))
  rng = np.random.default_rng(seed)
  draw = lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape), s.dtype)
  return jax.tree.map(draw, abstract)


def rows_of_batch(b: int, nets: dict, variables: dict) -> list[dict]:
  """Times every row of one B round-robin; returns the rows."""
  plan = [('dense', 'auto')] + [('moe', d) for d in _DISPATCHERS.value]
  times = {key: [] for key in plan}
  for _ in range(_REPEATS.value):
    for name, dispatcher in plan:
      stats = generate.decode_latency(
          nets[name], variables[name], b, _PROMPT.value, _NEW.value,
          step_dispatcher=dispatcher)
      times[(name, dispatcher)].append(stats['ms_per_token'])
  dense_ms = statistics.median(times[('dense', 'auto')])
  out = []
  for (name, dispatcher), ms in times.items():
    step = dispatcher
    if name == 'moe' and dispatcher == 'auto':
      step = generate.step_model(generate.inference_model(nets['moe']),
                                 b).moe.get('dispatcher', 'gather')
    median = statistics.median(ms)
    out.append(dict(model=name, batch=b, step_dispatcher=step,
                    requested=dispatcher, ms_per_step=median,
                    tokens_per_s=1e3 * b / median,
                    ratio_to_dense=median / dense_ms))
  return out


def print_table(rows: Sequence[dict], params: dict) -> None:
  print(f'params: dense total {params["dense"]["total"]:,}, active '
        f'{params["dense"]["active"]:,}; moe total '
        f'{params["moe"]["total"]:,}, active {params["moe"]["active"]:,}')
  print('| model | B | decode-step dispatcher | ms / step | tokens/s | '
        'vs dense |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    step = r['step_dispatcher']
    if r['requested'] == 'auto' and r['model'] == 'moe':
      step = f'auto ({step})'
    print(f'| {r["model"]} | {r["batch"]} | {step} | '
          f'{r["ms_per_step"]:.2f} | {r["tokens_per_s"]:.0f} | '
          f'{r["ratio_to_dense"]:.2f} |')


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  nets = models()
  variables = {name: random_variables(m) for name, m in nets.items()}
  params = {name: count_params(m) for name, m in nets.items()}
  rows = []
  for b in map(int, _BATCH.value):
    rows += rows_of_batch(b, nets, variables)
  print_table(rows, params)
  if _JSON.value:
    machine = dict(platform=platform.platform(), device=str(jax.devices()[0]),
                   jax=jax.__version__, python=sys.version.split()[0])
    with open(_JSON.value, 'w', encoding='utf-8') as f:
      json.dump({'machine': machine, 'flags': {
          k: flags.FLAGS[k].value for k in (
              'd_model', 'num_layers', 'num_heads', 'd_ff', 'num_experts',
              'top_k', 'vocab_size', 'prompt_len', 'new_tokens', 'repeats')},
                 'params': params, 'rows': rows}, f, indent=1)
  return 0


if __name__ == '__main__':
  app.run(main)
