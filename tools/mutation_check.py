"""Mutation check: does the test suite catch one-line semantic bugs?

    python tools/mutation_check.py [--only ID,ID] [--list] [--markdown FILE]

Each mutation below replaces one exact line fragment of the library (the
fragment must occur exactly once in its file) in a temporary copy of the
repository's committed tree (HEAD), runs the named test files (or test
ids) there (`pytest -x`, stopping at the first failure; with the
mutation's extra environment, e.g. the 8 fake devices of the
expert-parallel checks) and records which test caught it. A mutation
that no test catches "survives"; the script prints a table (mutation |
caught by | time) and exits 1 if any survives, 2 if a fragment is not
found (the code moved) or pytest cannot run a named test (exit 4 or 5:
not found, nothing collected): update the list. Not part of the default
test run (it takes tens of minutes on 2 cores).

The copy is imported instead of the checkout: pytest runs with the copy as
its working directory and PYTHONPATH, and the script checks that `moejax`
resolves inside the copy before the first mutation.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROUTING_TESTS = ('tests/test_routing.py', 'tests/test_blind_spots.py',
                 'tests/test_routers.py', 'tests/test_properties.py')
LOSS_TESTS = ('tests/test_losses.py', 'tests/test_blind_spots.py')
LAYER_TESTS = ('tests/test_layer.py', 'tests/test_layer_semantics.py',
               'tests/test_blind_spots.py', 'tests/test_routers.py')
MODEL_TESTS = ('tests/models/test_attention.py', 'tests/interop/test_hf.py',
               'tests/models/test_transformer.py')
# The expert-parallel checks need 8 devices before JAX starts: run
# multidevice_checks.py directly with the environment that
# tests/sharding/test_sharding.py::test_multidevice_checks gives its
# subprocess (without it every check is skipped, and the mutation would
# be reported as surviving, never as caught).
MULTIDEVICE_TESTS = ('tests/sharding/multidevice_checks.py',)
MULTIDEVICE_ENV = (('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                    '--xla_backend_optimization_level=0'),
                   ('PJRT_NPROC', '16'))


@dataclasses.dataclass(frozen=True)
class Mutation:
  """Replace `old` by `new` in `path`; `tests` (pytest arguments: files
  or test ids) should catch it; `env`: extra (name, value) environment
  variables for that pytest run."""
  id: str
  path: str
  old: str
  new: str
  tests: tuple
  env: tuple = ()


M = Mutation
MUTATIONS = (
    # capacity
    M('capacity-floor', 'moejax/capacity.py', 'raw = math.ceil(round(',
      'raw = math.floor(round(', ('tests/test_capacity.py',)),
    M('capacity-no-min', 'moejax/capacity.py',
      'capacity = _round_up(max(min_capacity, raw, 1), multiple_of)',
      'capacity = _round_up(max(raw, 1), multiple_of)',
      ('tests/test_capacity.py',)),
    M('capacity-no-cap-at-S', 'moejax/capacity.py',
      'return min(capacity, upper)', 'return capacity',
      ('tests/test_capacity.py',)),
    M('capacity-multiple-not-passed', 'moejax/layers.py',
      '        self.capacity_multiple_of)', '        1)', LAYER_TESTS),
    # routing
    M('kept-off-by-one', 'moejax/routing.py',
      'kept = request & (slot < capacity)',
      'kept = request & (slot <= capacity)', ROUTING_TESTS),
    M('score-priority-ascending', 'moejax/routing.py',
      'perm = jnp.argsort(-priority_score, axis=1, stable=True)',
      'perm = jnp.argsort(priority_score, axis=1, stable=True)',
      ROUTING_TESTS),
    M('token-priority-as-choice', 'moejax/routing.py',
      "  if priority == 'token':\n    return onehot.reshape(g, s * k, e)",
      "  if priority == 'nothing':\n    return onehot.reshape(g, s * k, e)",
      ROUTING_TESTS),
    M('gates-from-biased-scores', 'moejax/routing.py',
      'gate = jnp.take_along_axis(scores, expert_index, axis=-1)',
      'gate = jnp.take_along_axis(selection, expert_index, axis=-1)',
      ROUTING_TESTS),
    M('loss-free-sign', 'moejax/routing.py',
      'return bias + rate * jnp.sign(counts.mean() - counts)',
      'return bias + rate * jnp.sign(counts - counts.mean())', ROUTING_TESTS),
    M('random-policy-inverted', 'moejax/routing.py',
      'keep = uniform < normalized / threshold',
      'keep = uniform > normalized / threshold', ROUTING_TESTS),
    M('renormalize-after-drops', 'moejax/routing.py',
      '  gate = normalize_gates(gate, renormalize, scale)',
      '  gate = normalize_gates(jnp.where(kept, gate, 0.0), renormalize, '
      'scale)', ROUTING_TESTS),
    M('group-score-top1', 'moejax/routing.py',
      "best_of = 1 if group_score == 'max' else min(2, per_group)",
      'best_of = 1', ROUTING_TESTS),
    M('routed-scaling-not-passed', 'moejax/routers.py',
      'renormalize=layer.renormalize, routed_scaling=layer.routed_scaling,',
      'renormalize=layer.renormalize, routed_scaling=1.0,', LAYER_TESTS),
    M('jitter-in-eval', 'moejax/routing.py',
      'if not deterministic and self.jitter_eps > 0:',
      'if self.jitter_eps > 0:', ROUTING_TESTS),
    # losses
    M('z-loss-not-logsumexp', 'moejax/losses.py',
      'lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)',
      'lse = logits.astype(jnp.float32).max(-1) + jnp.log(logits.shape[-1])',
      LOSS_TESTS),
    M('z-loss-padding-in-denominator', 'moejax/losses.py',
      'return jnp.sum(lse ** 2 * valid_f) / jnp.maximum(valid_f.sum(), 1)',
      'return jnp.sum(lse ** 2 * valid_f) / valid_f.size', LOSS_TESTS),
    M('balance-first-choice-only', 'moejax/losses.py',
      '  onehot = jax.nn.one_hot(decision.expert_index, decision.num_experts,',
      '  onehot = jax.nn.one_hot(decision.expert_index[..., :1], '
      'decision.num_experts,', LOSS_TESTS),
    M('loads-after-capacity', 'moejax/losses.py',
      "  return jnp.einsum('GSKE,GS->GE', onehot, valid.astype(jnp.float32))",
      "  return jnp.einsum('GSKE,GSK->GE', onehot, "
      'decision.kept.astype(jnp.float32))', LOSS_TESTS),
    # dispatch and experts
    M('gather-combine-ignores-drops', 'moejax/dispatch.py',
      '  empty = decision.num_experts * decision.capacity\n',
      '  empty = 0\n', LAYER_TESTS),
    M('einsum-combine-unweighted', 'moejax/dispatch.py',
      "combine = _one_hot_tensors(decision, decision.gate.astype(y.dtype))",
      "combine = _one_hot_tensors(decision, jnp.ones_like(decision.gate, "
      "y.dtype))", LAYER_TESTS),
    # (Dropping ragged_combine's kept mask is an equivalent mutant:
    # ragged_dot already leaves the rows of dropped assignments zero.)
    M('ragged-rows-unsorted', 'moejax/dispatch.py',
      '  inverse = jnp.argsort(plan.order)  # row of each assignment',
      '  inverse = plan.order', LAYER_TESTS),
    M('per-token-wrong-expert', 'moejax/experts.py',
      'idx = expert_index.reshape(n * k).astype(jnp.int32)',
      'idx = (expert_index.reshape(n * k).astype(jnp.int32) + 1) % e',
      LAYER_TESTS),
    M('gated-branches-swapped', 'moejax/ffn_math.py',
      '  h = nonlinearity(hidden[0])\n  if len(hidden) == 2:\n'
      '    h = h * hidden[1]',
      '  h = nonlinearity(hidden[-1])\n  if len(hidden) == 2:\n'
      '    h = h * hidden[0]', LAYER_TESTS),
    M('shared-gate-no-sigmoid', 'moejax/layers.py',
      'gate = jax.nn.sigmoid(jnp.einsum(', 'gate = (jnp.einsum(',
      LAYER_TESTS + ('tests/interop/test_hf.py',)),
    M('shared-experts-on-padding', 'moejax/layers.py',
      'return jnp.where(valid[..., None], y, 0)', 'return y', LAYER_TESTS),
    # attention and models
    M('rope-pairing', 'moejax/models/attention.py',
      '    x1, x2 = xf[..., 0::2], xf[..., 1::2]',
      '    x1, x2 = xf[..., :half], xf[..., half:]', MODEL_TESTS),
    M('gqa-tiled-not-repeated', 'moejax/models/attention.py',
      'k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)',
      'k, v = jnp.tile(k, (1, 1, rep, 1)), jnp.tile(v, (1, 1, rep, 1))',
      MODEL_TESTS),
    M('causal-mask-off', 'moejax/models/attention.py',
      '    allowed = jnp.tril(allowed)', '    allowed = allowed',
      MODEL_TESTS),
    M('decode-sees-the-future', 'moejax/models/attention.py',
      'mask = jnp.arange(m)[None, :] <= positions[:, None]  # [L, M]',
      'mask = jnp.arange(m)[None, :] < m  # [L, M]',
      ('tests/test_generate.py',)),
    # interop
    M('hf-linear-not-transposed', 'moejax/interop/hf_params.py',
      'return [np.ascontiguousarray(arrays[0].T).reshape(shape)]',
      'return [np.ascontiguousarray(arrays[0]).reshape(shape)]',
      ('tests/interop/test_hf.py',)),
    M('hf-fused-gate-up-swapped', 'moejax/interop/hf_params.py',
      '    return [np.ascontiguousarray(both[..., :f]),\n'
      '            np.ascontiguousarray(both[..., f:])]',
      '    return [np.ascontiguousarray(both[..., f:]),\n'
      '            np.ascontiguousarray(both[..., :f])]',
      ('tests/interop/test_hf.py',)),
    # fine-tuning and upcycling
    M('finetune-frozen-grads-in-clip-norm', 'moejax/train/finetune.py',
      '      if kind == FROZEN:\n        return jnp.zeros_like(u)',
      '      if kind == FROZEN:\n        return u',
      ('tests/test_finetune.py',)),
    M('finetune-frozen-leaves-get-adamw', 'moejax/train/optim.py',
      'inner = {finetune.TRAIN: adamw, finetune.FROZEN: optax.set_to_zero()}',
      'inner = {finetune.TRAIN: adamw, finetune.FROZEN: adamw}',
      ('tests/test_finetune.py',)),
    M('lora-only-inverted', 'moejax/train/finetune.py',
      '  if plan.lora_only and not is_lora(name):',
      '  if plan.lora_only and is_lora(name):', ('tests/test_finetune.py',)),
    M('esft-least-used-experts', 'moejax/train/finetune.py',
      'order = np.lexsort((np.arange(len(counts)), -counts))',
      'order = np.lexsort((np.arange(len(counts)), counts))',
      ('tests/test_finetune.py',)),
    M('upcycle-zero-router-ignored', 'moejax/train/upcycle.py',
      "return (np.zeros(leaf.shape, dtype) if router == 'zero'",
      "return (np.zeros(leaf.shape, dtype) if router == 'zeros'",
      ('tests/test_finetune.py',)),
    M('drop-upcycle-units-per-kernel', 'moejax/train/upcycle.py',
      'units = np.random.default_rng([seed, layer, 1 << 20, i]).permutation(',
      'units = np.random.default_rng([seed, layer, leaf, i]).permutation(',
      ('tests/test_finetune.py',)),
    # optimizer, config
    M('no-grad-clipping', 'moejax/train/optim.py',
      'parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []',
      'parts = []', ('tests/test_blind_spots.py',)),
    M('top-k-above-experts-accepted', 'moejax/layers.py',
      '  if layer.top_k > layer.num_experts:',
      '  if layer.top_k > layer.num_experts + 1:',
      ('tests/test_layer_semantics.py', 'tests/models/test_transformer.py')),
    # sharding and expert parallelism
    M('expert-dim-on-data-axis', 'moejax/sharding.py',
      "    ('expert', 'expert'),", "    ('expert', 'data'),",
      ('tests/sharding/test_sharding.py::'
       'test_partition_specs_of_a_train_state',)),
    M('expert-wo-layout-copied-from-wi', 'moejax/sharding.py',
      "    (('wo',), 3, ('expert', 'expert_mlp', 'embed')),  # [E, F, D]",
      "    (('wo',), 3, _EXPERT_IN),  # [E, F, D]",
      ('tests/sharding/test_sharding.py::'
       'test_partition_specs_of_a_train_state',)),
    M('expert-parallel-no-psum-over-model', 'moejax/expert_parallel.py',
      "    return jax.lax.psum(y, 'model').astype(dtype)  # [E', N, D]",
      "    return y.astype(dtype)  # [E', N, D]",
      MULTIDEVICE_TESTS, MULTIDEVICE_ENV),
    M('expert-replica-wrong-expert', 'moejax/expert_parallel.py',
      "      first = jax.lax.axis_index('expert') // reps",
      "      first = jax.lax.axis_index('expert') % reps",
      MULTIDEVICE_TESTS, MULTIDEVICE_ENV),
    # checkpoints and resume
    M('crc-compared-only-when-missing', 'moejax/train/checkpoint.py',
      '    if None not in (want, got) and want != got:',
      '    if None in (want, got) and want != got:',
      ('tests/train/test_units.py',)),
    M('restore-oldest-checkpoint-first', 'moejax/train/checkpoint.py',
      '    for step in reversed(self.all_steps()):',
      '    for step in self.all_steps():', ('tests/train/test_units.py',)),
    M('init-source-crc-key-never-found', 'moejax/train/init_source.py',
      "      want = saved_crc.get(f'.{item}{path}')",
      "      want = saved_crc.get(f'{item}{path}')",
      ('tests/test_convert.py::'
       'test_init_source_skips_a_corrupt_checkpoint_and_leaves_it',)),
    M('resume-data-from-batch-0', 'moejax/train/loop.py',
      '    batches = train_loader.iterate(start) if hasattr(',
      '    batches = train_loader.iterate(0) if hasattr(',
      ('tests/train/test_resume.py',)),
    M('resume-keeps-records-past-checkpoint', 'moejax/train/resume.py',
      '  kept = metrics_lib.truncate_metrics(path, step)',
      '  kept = metrics_lib.truncate_metrics(path, step + 1)',
      ('tests/train/test_reliability.py',)),
    # config validation
    M('pad-id-equal-to-vocab-accepted', 'experiments/config_lib.py',
      '0 <= d.pad_id < vocab_size(config)',
      '0 <= d.pad_id <= vocab_size(config)',
      ('tests/train/test_bad_config.py',)),
    M('adam-beta-one-accepted', 'experiments/config_lib.py',
      "    _require(f'train.{name}', t[name], 0 <= t[name] < 1, '[0, 1)')",
      "    _require(f'train.{name}', t[name], 0 <= t[name] <= 1, '[0, 1)')",
      ('tests/train/test_bad_config.py',)),
    M('task-classify-not-allowed', 'experiments/model_config.py',
      "TASKS = ('lm', 'classify')", "TASKS = ('lm',)",
      ('tests/train/test_bad_config.py',)),
    # Routing groups across sequences (moejax/grouping.py).
    M('position-groups-not-interleaved', 'moejax/grouping.py',
      'x = x.reshape((-1, k, l) + rest).swapaxes(1, 2)  # [G, L, k, ...]',
      'x = x.reshape((-1, k, l) + rest)  # [G, L, k, ...]',
      ('tests/test_grouping.py',)),
    M('cross-sequence-leak-allowed', 'moejax/grouping.py',
      "if order == 'sequence' and seq_len % s:",
      "if order == 'sequence' and seq_len % s and s < seq_len:",
      ('tests/test_grouping.py',)),
    M('capture-ignores-group-order', 'moejax/analysis/capture.py',
      "moe.get('group_order', 'sequence'))", "'sequence')",
      ('tests/analysis/test_capture.py',
       'tests/analysis/test_routing_capture.py')),
    # blocked dropless dispatcher (issue 18)
    # (Sorting dropped choices into the blocks too is no bug: their combine
    # weight is 0, so only work is wasted; a mutation of that survives.)
    M('blocked-block-expert-off-by-one', 'moejax/blocked.py',
      "block_expert = jnp.searchsorted(block_end, jnp.arange(bk), "
      "side='right')",
      "block_expert = jnp.searchsorted(block_end, jnp.arange(bk), "
      "side='left')", ('tests/test_blocked_dispatch.py',)),
    M('blocked-weight-grad-not-accumulated', 'moejax/blocked.py',
      'acc, jax.lax.dynamic_index_in_dim(acc, e, 0, False) + g, e, 0),',
      'acc, g, e, 0),', ('tests/test_blocked_dispatch.py',)),
    M('blocked-last-block-skipped', 'moejax/blocked.py',
      'return jax.lax.cond(i < used_blocks, compute, skip)',
      'return jax.lax.cond(i + 1 < used_blocks, compute, skip)',
      ('tests/test_blocked_dispatch.py',)),
    # ReMoE, null experts, Mixture-of-Depths (issue 19)
    M('remoe-controller-sign', 'moejax/relu_router.py',
      'step = jnp.sign(density - target_k / num_experts)',
      'step = jnp.sign(target_k / num_experts - density)',
      ('tests/test_remoe.py',)),
    M('remoe-zero-gate-requests', 'moejax/relu_router.py',
      'request = valid[..., None] & (gates > 0)',
      'request = valid[..., None] & (gates >= 0)', ('tests/test_remoe.py',)),
    M('null-choice-takes-a-slot', 'moejax/routing.py',
      '    request = request & (expert_index < e)',
      '    request = request & (expert_index <= e)',
      ('tests/test_null_experts.py',)),
    M('null-balance-over-real-only', 'moejax/routing.py',
      "    scored = (decision.replace(num_experts=probs.shape[-1])",
      "    scored = (decision.replace(num_experts=decision.num_experts)",
      ('tests/test_null_experts.py',)),
    M('mod-capacity-floor', 'moejax/models/mod.py',
      'return min(length, max(1, math.ceil(round(capacity * length, 9))))',
      'return min(length, max(1, math.floor(round(capacity * length, 9))))',
      ('tests/test_mod.py',)),
    M('mod-router-weight-dropped', 'moejax/models/mod.py',
      '    update = weight * _block_update(x_sel, x_attn, y)',
      '    update = _block_update(x_sel, x_attn, y)', ('tests/test_mod.py',)),
    M('mod-decode-ignores-predictor', 'moejax/models/mod.py',
      '      selected = (p > 0) & real',
      '      selected = targets', ('tests/test_mod.py',)),
    # gradient accumulation (issue 17)
    M('accumulate-step-counts-dropped', 'moejax/train/step.py',
      '  read_only = None if counts is None else {routing.STEP_COUNTS: '
      'counts}', '  read_only = None', ('tests/train/test_accumulate.py',)),
    M('accumulate-share-ignored', 'moejax/train/step.py',
      '            share * sum(extra))', '            sum(extra))',
      ('tests/train/test_accumulate.py',)),
    M('accumulate-group-share-by-tokens', 'moejax/train/step.py',
      '  aux_shares = _aux_shares(model, toks, pad_id)  # [M] or None',
      '  aux_shares = None', ('tests/train/test_accumulate.py',)),
    # groups of whole sequences (issue 17)
    M('group-sequences-ignored', 'moejax/layers.py',
      '    return grouping.group_tokens(self.group_size, self.group_sequences,',
      '    return grouping.group_tokens(self.group_size, None,',
      ('tests/test_grouping.py',)),
    M('whole-batch-as-one-sequence', 'moejax/grouping.py',
      '  return batch\n', '  return 1\n', ('tests/test_grouping.py',)),
    M('whole-batch-accumulation-allowed', 'experiments/model_config.py',
      '  if k == grouping.WHOLE_BATCH and micro > 1:',
      '  if False:', ('tests/train/test_bad_config.py',)),
    M('switch-default-per-sequence', 'configs/switch.py',
      "SWITCH_GROUPS = dict(group_sequences=-1, group_order='position')",
      "SWITCH_GROUPS = dict(group_sequences=None, group_order='sequence')",
      ('tests/test_sweep.py',)),
    M('master-copy-not-stored', 'moejax/train/optim.py',
      '        lambda m, p, u, k: m - p.astype(jnp.float32) if k else u, new,',
      '        lambda m, p, u, k: u, new,',
      ('tests/train/test_master_weights.py',)),
    M('mod-rows-unchecked', 'experiments/model_config.py',
      '  if set(model.moe_layers) & mod_layers:', '  if False:',
      ('tests/train/test_bad_config.py',)),
    M('remoe-step-counts-ignored', 'moejax/relu_router.py',
      '    step = self._step_counts(gates, valid, deterministic)\n',
      '    step = None\n',
      ('tests/train/test_accumulate.py', 'tests/test_remoe.py')),
    # causal routing: choice-major order with 2+ choices (issue 17)
    M('choice-order-leak-allowed', 'moejax/routers.py',
      "  if layer.priority != 'choice' or choices < 2 or not capped:",
      "  if True:",
      ('tests/test_layer_semantics.py', 'tests/test_grouping.py',
       'tests/test_blind_spots.py')),
)


def copy_repo(dst: str) -> None:
  """The committed tree (HEAD) of the checkout, into dst: the check is
  about what is committed, not about uncommitted edits."""
  archive = subprocess.run(['git', 'archive', 'HEAD'], cwd=REPO, check=True,
                           capture_output=True).stdout
  subprocess.run(['tar', '-x', '-C', dst], input=archive, check=True)


def _fail(message: str) -> None:
  """Exits with code 2: the list (or the tests it names) needs updating."""
  print(message, file=sys.stderr, flush=True)
  sys.exit(2)


def _env(root: str, extra: tuple = ()) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith('PYTEST_')}
  env['PYTHONPATH'] = root + os.pathsep + env.get('PYTHONPATH', '')
  env.setdefault('JAX_PLATFORMS', 'cpu')
  env.update(dict(extra))
  return env


def check_imports_copy(root: str) -> None:
  out = subprocess.run([sys.executable, '-c', 'import moejax; '
                        'print(moejax.__file__)'], cwd=root, env=_env(root),
                       check=True, capture_output=True, text=True).stdout
  if not os.path.realpath(out.strip()).startswith(os.path.realpath(root)):
    _fail(f'error: the copy imports moejax from {out.strip()}, not from '
          f'{root}; cannot run mutations safely.')


def run_tests(root: str, tests: tuple,
              env: tuple = ()) -> tuple[bool, str]:
  """(caught, first failing test id or '') for the named test files."""
  cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider',
         '-p', 'no:randomly', *tests]
  proc = subprocess.run(['timeout', '-s', 'KILL', '1200'] + cmd, cwd=root,
                        env=_env(root, env), capture_output=True, text=True)
  if proc.returncode == 0:
    return False, ''
  if proc.returncode in (4, 5):  # usage error (e.g. a test id not found),
    # no test collected: nothing ran, so nothing was caught.
    _fail(f'error: pytest could not run {" ".join(tests)} (exit '
          f'{proc.returncode}: {proc.stdout.strip()[-300:]}); update '
          'tools/mutation_check.py.')
  for line in proc.stdout.splitlines():
    if line.startswith('FAILED ') or line.startswith('ERROR '):
      return True, line.split()[1]
  return True, f'exit {proc.returncode}'


def apply(root: str, m: Mutation) -> str:
  """Mutates the copy; returns the original text of the file."""
  path = os.path.join(root, m.path)
  text = open(path, encoding='utf-8').read()
  if text.count(m.old) != 1:
    _fail(f'error: mutation {m.id}: the fragment occurs '
          f'{text.count(m.old)} times in {m.path} (need exactly once); '
          'update tools/mutation_check.py.')
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text.replace(m.old, m.new))
  return text


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', default='', help='comma-separated ids')
  parser.add_argument('--list', action='store_true', help='list and exit')
  parser.add_argument('--markdown', default='', help='write the table here')
  args = parser.parse_args()
  chosen = [m for m in MUTATIONS
            if not args.only or m.id in args.only.split(',')]
  if args.list:
    for m in chosen:
      print(f'{m.id:32s} {m.path}')
    return 0
  rows, survived = [], 0
  with tempfile.TemporaryDirectory(prefix='moejax_mutants_') as root:
    copy_repo(root)
    check_imports_copy(root)
    for m in chosen:
      original = apply(root, m)
      start = time.perf_counter()
      try:
        caught, by = run_tests(root, m.tests, m.env)
      finally:
        with open(os.path.join(root, m.path), 'w', encoding='utf-8') as f:
          f.write(original)
      seconds = time.perf_counter() - start
      survived += not caught
      rows.append(f'| {m.id} | {by or "**survived**"} | {seconds:.0f} s |')
      print(rows[-1], flush=True)
  table = ('| mutation | caught by | time |\n|---|---|---|\n' +
           '\n'.join(rows) + '\n')
  print(f'\n{len(rows) - survived}/{len(rows)} mutations caught')
  if args.markdown:
    with open(args.markdown, 'w', encoding='utf-8') as f:
      f.write(table + f'\n{len(rows) - survived}/{len(rows)} caught\n')
  return 1 if survived else 0


if __name__ == '__main__':
  sys.exit(main())
