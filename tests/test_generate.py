"""moejax.generate and the experiments.generate CLI.

Each behaviour is pinned by an independent computation: the cached decode
against the full forward pass (with no cache) of a capacity-free clone the
test builds itself, greedy `generate` against a loop that re-runs that
forward pass, sampling against hand-made distributions, and the CLI
against `generate` on the params `Checkpointer` restores. Models are tiny
(D=32, 2 layers) with random params drawn in numpy (no init compile).
"""

import functools
import json
import os
import re
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import generate as cli
from moejax import generate as gen
from moejax.models import TransformerLM

V = 64
TINY = dict(num_layers=2, d_model=32, num_heads=2, d_ff=64, vocab_size=V)
# cf 0.25, min_capacity 1: C = 1 slot per expert for a 5-token group, so a
# 5-token prefill (10 assignments, 4 experts) must drop: only a generation
# that turns capacity off matches the capacity-free forward pass. group_size
# 4 does not divide a [2, 5] prefill's 10 tokens: it must be turned off too.
MOE = dict(num_experts=4, top_k=2, capacity_factor=0.25,
           eval_capacity_factor=0.25, min_capacity=1, group_size=4,
           selection_bias=True, priority='token')  # causal with a capacity
MLA = dict(q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
           qk_rope_head_dim=4, v_head_dim=8)
CASES = {
    'dense': {},
    'moe_capacity': dict(moe=MOE),
    'gqa_head_norm_bias': dict(num_heads=4, num_kv_heads=2, head_dim=8,
                               qk_norm='head', attn_bias=True),
    'full_qk_norm': dict(qk_norm='full'),
    'mla': dict(attention='mla', mla=MLA, rope_interleave=True),
}
PREFILL, LENGTH = 5, 8
# Tiny programs compile ~2x faster unoptimised; the values match to 1e-7.
FAST_COMPILE = {'xla_backend_optimization_level': 0,
                'xla_llvm_disable_expensive_passes': True}


def random_variables(model, seed=0):
  """Variables of `model` drawn in numpy: embeddings N(0, 1), kernels
  N(0, 1/fan_in), norm scales 1 + N(0, .1), biases and the MoE selection
  bias ('moe_state') N(0, 1) so that they matter."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, LENGTH), jnp.int32))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if 'scale' in name:
      value = 1 + 0.1 * rng.standard_normal(s.shape)
    elif len(s.shape) >= 2 and 'embedding' not in name:
      value = rng.standard_normal(s.shape) / np.sqrt(s.shape[0])
    else:
      value = rng.standard_normal(s.shape)
    return jnp.asarray(value, s.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def capacity_free(model):
  """The test's own clone of `model` with no capacity limit."""
  if model.moe is None:
    return model
  return model.clone(moe={**model.moe, 'capacity_factor': None,
                          'eval_capacity_factor': None, 'group_size': None})


@functools.partial(jax.jit, static_argnums=(0,),
                   compiler_options=FAST_COMPILE)
def full_and_cached(model, variables, tokens):
  """Logits [B, L, V] of the full forward pass of `capacity_free(model)`,
  of `model` itself, and of prefilling PREFILL tokens then decoding the
  rest one at a time through gen's KV cache."""
  full, _ = capacity_free(model).apply(variables, tokens)
  with_capacity, _ = model.apply(variables, tokens)
  cache = gen.init_cache(model, tokens.shape[0], tokens.shape[1])
  first, cache = gen.prefill(model, variables, cache, tokens[:, :PREFILL])

  def step(cache, token):  # token [B]
    logits, cache = gen.decode_step(model, variables, cache, token)
    return cache, logits

  _, rest = jax.lax.scan(step, cache, tokens[:, PREFILL:].T)  # [L-P, B, V]
  return full, with_capacity, jnp.concatenate(
      [first, rest.transpose(1, 0, 2)], axis=1)


@pytest.mark.parametrize('case', list(CASES))
def test_cached_decode_matches_full_forward(case):
  model = TransformerLM(**{**TINY, **CASES[case]})
  variables = random_variables(model)
  tokens = jax.random.randint(jax.random.key(1), (2, LENGTH), 0, V)
  with jax.default_matmul_precision('highest'):
    full, with_capacity, cached = full_and_cached(model, variables, tokens)
  assert cached.shape == (2, LENGTH, V)
  np.testing.assert_allclose(cached, full, atol=1e-5, rtol=1e-5)
  # Every position's logits differ (the comparison is not vacuous).
  assert float(jnp.abs(full[:, 1:] - full[:, :-1]).min()) > 0
  if model.moe is not None:  # the capacity really drops tokens here
    assert float(jnp.abs(with_capacity - full).max()) > 1e-2


@pytest.fixture(scope='module')
def moe_model():
  model = TransformerLM(**TINY, moe=MOE)
  return model, random_variables(model, seed=3)


def test_greedy_generate_matches_naive_loop(moe_model):
  model, variables = moe_model
  assert 'moe_state' in variables  # passed through to the routers
  prompt = np.array([[5, 9, 2], [7, 7, 1]], np.int32)
  new = 5
  forward = jax.jit(lambda v, t: capacity_free(model).apply(v, t)[0])
  # Re-run the full forward on the sequence so far; the zeros after it are
  # never seen by the positions read (causal attention, no capacity).
  seq = np.zeros((2, prompt.shape[1] + new), np.int32)
  seq[:, :prompt.shape[1]] = prompt
  with jax.default_matmul_precision('highest'):
    for n in range(prompt.shape[1], seq.shape[1]):
      seq[:, n] = np.argmax(forward(variables, seq)[:, n - 1], axis=-1)
    got = gen.generate(model, variables, prompt, new)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, seq)


def test_sampling_generate_is_seeded(moe_model):
  model, variables = moe_model
  run = functools.partial(gen.generate, model, variables, [[1, 2, 3]], 6,
                          temperature=1.0, top_p=0.9)
  a, b = run(rng=jax.random.key(0)), run(rng=jax.random.key(0))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a[:, :3], [[1, 2, 3]])
  assert ((0 <= a) & (a < V)).all()


def test_decode_latency_reports_speed(moe_model):
  # The greedy test's shapes and precision: its programs are reused.
  with jax.default_matmul_precision('highest'):
    stats = gen.decode_latency(*moe_model, batch_size=2, prompt_len=3,
                               new_tokens=5)
  assert set(stats) == {'ms_per_token', 'tokens_per_s'}
  assert stats['ms_per_token'] > 0  # B = 2 tokens per step:
  np.testing.assert_allclose(stats['tokens_per_s'],
                             2 * 1e3 / stats['ms_per_token'], rtol=1e-9)


# ------------------------------------------------------------------ sampling
def test_greedy_sample_is_argmax():
  logits = jax.random.normal(jax.random.key(0), (16, V))
  np.testing.assert_array_equal(gen.sample_logits(logits, None, 0.0),
                                np.argmax(logits, -1))


def test_tiny_top_p_keeps_only_the_argmax():
  logits = jax.random.normal(jax.random.key(0), (256, V))
  got = gen.sample_logits(logits, jax.random.key(1), temperature=1.0,
                          top_p=1e-6)
  np.testing.assert_array_equal(got, np.argmax(logits, -1))


def _frequencies(probs, temperature, top_p, draws=20000):
  """Token frequencies of `draws` samples of logits = T log(probs), i.e.
  softmax(logits / T) = probs."""
  logits = temperature * jnp.log(jnp.asarray(probs, jnp.float32))
  rows = jnp.broadcast_to(logits, (draws, len(probs)))
  got = gen.sample_logits(rows, jax.random.key(7), temperature, top_p)
  return np.bincount(np.asarray(got), minlength=len(probs)) / draws


def test_temperature_sampling_frequencies():
  # 20000 draws: the std of a frequency is <= 0.0036; tolerance 0.015.
  # Ignoring T would give softmax(2 log p) = [.66, .24, .11].
  freq = _frequencies([.5, .3, .2], temperature=2.0, top_p=1.0)
  np.testing.assert_allclose(freq, [.5, .3, .2], atol=0.015)


def test_top_p_keeps_the_smallest_nucleus():
  # .5 < .75 <= .5 + .3: keep {0, 1}, renormalised to [.625, .375, 0].
  freq = _frequencies([.5, .3, .2], temperature=1.0, top_p=0.75)
  assert freq[2] == 0
  np.testing.assert_allclose(freq, [.625, .375, 0], atol=0.015)


# ---------------------------------------------------------------- validation
def _dense():
  return TransformerLM(**TINY)


@pytest.mark.parametrize('kwargs, match', [
    (dict(max_new_tokens=0), 'max_new_tokens must be an int >= 1'),
    (dict(temperature=-0.5), r'temperature must be a finite number >= 0'),
    (dict(top_p=0.0), r'top_p must be a number in \(0, 1\]'),
    (dict(top_p=1.5), r'top_p must be a number in \(0, 1\]'),
    (dict(prompt_ids=[[1, V]]), rf'allowed values: token ids in \[0, {V}\)'),
    (dict(prompt_ids=[[1, -1]]), r'token ids in \[0, 64\)'),
    (dict(prompt_ids=[[]]), 'prompt_ids must be a non-empty'),
    (dict(prompt_ids=[1, 2]), r'non-empty \[B, P\]'),
    (dict(temperature=1.0), 'rng is required when sampling'),
    (dict(temperature=1.0, rng=3), 'rng must be one jax.random key'),
])
def test_bad_arguments_are_refused_before_compiling(kwargs, match):
  args = dict(prompt_ids=[[1, 2]], max_new_tokens=3)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    gen.generate(_dense(), {'params': {}}, args.pop('prompt_ids'),
                 args.pop('max_new_tokens'), **args)


def test_sliding_window_shorter_than_sequence_is_refused():
  model = TransformerLM(**TINY, sliding_window=6)
  with pytest.raises(ValueError, match=r'sliding_window=6 .* = 7 positions'):
    gen.generate(model, {'params': {}}, [[1, 2, 3, 4]], 3)


def test_non_lm_and_noncausal_router_are_refused():
  with pytest.raises(ValueError, match='model must be a causal'):
    gen.generate(object(), {'params': {}}, [[1]], 2)
  model = TransformerLM(**TINY, moe=dict(
      num_experts=4, router='expert_choice', allow_noncausal_routing=True,
      top_k=1))
  with pytest.raises(ValueError, match="allowed value for generation: "
                     "router='topk'"):
    gen.generate(model, {'params': {}}, [[1]], 2)


# ----------------------------------------------------------------------- CLI
@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A switch:tiny run (helpers.small_args sizes) trained for 2 steps,
  with checkpoints at steps 1 and 2."""
  # pylint: disable=g-import-not-at-top
  from experiments import train
  from moejax.data import load_source
  from tests.train import helpers
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  for split in ('train', 'validation'):
    load_source('synthetic_mixture', split, data_dir, **helpers.DATA)
  path = str(tmp_path_factory.mktemp('generate') / 'run')
  argv = helpers.small_args('switch', path, data_dir, train__steps=2,
                            train__warmup_steps=2, train__eval_every=2,
                            train__checkpoint_every=1)
  assert train.main(argv) == 0
  return path, argv


def _run(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def _ids(out: str, key: str) -> list[int]:
  line = next(l for l in out.splitlines() if l.startswith(key + ': '))
  return [int(t) for t in line[len(key) + 2:].split(',')]


def test_cli_generates_from_the_latest_checkpoint(workdir, capsys):
  # pylint: disable=g-import-not-at-top
  from tests.train import helpers
  path, argv = workdir
  code, out, err = _run(capsys, '--workdir', path, '--prompt_ids', '1,2,3',
                        '--max_new_tokens', '4')
  assert code == 0, err
  assert 'checkpoints/2' in out
  new = _ids(out, 'new_ids')
  assert len(new) == 4 and _ids(out, 'ids') == [1, 2, 3] + new
  assert 'tokens/s' in out
  state, _ = helpers.final_state(argv)  # Checkpointer's own restore
  # On the CLI's device placement, so its compiled programs are reused.
  variables = jax.device_put({'params': state.params, **state.model_state},
                             jax.devices()[0])
  want = gen.generate(cli.load_model(path), variables, [[1, 2, 3]], 4)
  assert new == [int(t) for t in want[0, 3:]]


def test_cli_skips_a_corrupt_checkpoint(workdir, tmp_path, capsys):
  path = str(tmp_path / 'run')
  shutil.copytree(workdir[0], path)
  for root, _, files in os.walk(os.path.join(path, 'checkpoints', '2')):
    for name in files:  # every file of the newest checkpoint
      with open(os.path.join(root, name), 'r+b') as f:
        f.write(b'\xff' * 64)
  code, out, err = _run(capsys, '--workdir', path, '--prompt_ids', '1,2,3',
                        '--max_new_tokens', '4')
  assert code == 0, err
  assert 'warning: skipping checkpoint 2' in err
  assert 'checkpoints/1' in out and len(_ids(out, 'new_ids')) == 4


def _user_error_cases(run_dir, tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  fresh = tmp_path / 'fresh'  # config.json only: no checkpoint yet
  fresh.mkdir()
  shutil.copy(os.path.join(run_dir, 'config.json'), fresh)
  ok = ['--prompt_ids', '1,2', '--max_new_tokens', '2']
  return {
      'bad_prompt_ids': (['--workdir', run_dir, '--prompt_ids', '1,x',
                          '--max_new_tokens', '2'], '--prompt_ids='),
      'prompt_id_out_of_vocab': (['--workdir', run_dir, '--prompt_ids',
                                  f'1,{V}', '--max_new_tokens', '2'],
                                 rf'token ids in \[0, {V}\)'),
      'missing_workdir': (['--workdir', str(tmp_path / 'nope')] + ok,
                          'does not exist'),
      'empty_workdir': (['--workdir', str(empty)] + ok, 'is empty'),
      'no_checkpoint': (['--workdir', str(fresh)] + ok, 'has no checkpoint'),
      'prompt_without_tokenizer': (['--workdir', run_dir, '--prompt', 'hi',
                                    '--max_new_tokens', '2'],
                                   'tokenizer.json'),
      'bad_max_new_tokens': (['--workdir', run_dir, '--prompt_ids', '1',
                              '--max_new_tokens', 'many'],
                             '--max_new_tokens='),
      'bad_temperature': (['--workdir', run_dir, '--temperature', '-1'] + ok,
                          '--temperature='),
      'bad_top_p': (['--workdir', run_dir, '--top_p', '0'] + ok, '--top_p='),
      'no_prompt': (['--workdir', run_dir, '--max_new_tokens', '2'],
                    '--prompt_ids --prompt is required'),
  }


def test_cli_user_errors_are_one_line(workdir, tmp_path, capsys):
  for name, (argv, match) in _user_error_cases(workdir[0], tmp_path).items():
    code, out, err = _run(capsys, *argv)
    assert code == 2, name
    assert out == '', name
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), (name, err)
    assert re.search(match, lines[0]), (name, err)


@pytest.mark.parametrize('argv, match', [
    (['--prompt_ids', '1', '--max_new_tokens', '2'],
     'the following arguments are required: --workdir'),
    (['--workdir', 'w', '--prompt_ids', '1', '--prompt', 'a',
      '--max_new_tokens', '2'], 'not allowed with argument --prompt_ids'),
    (['--workdir', 'w', '--prompt_ids', '1', '--max_new_tokens', '2',
      '--top_k', '5'], 'unrecognized arguments: --top_k 5'),
    (['--workdir', 'w', '--prompt_ids', '1', '--max_new_tokens', '0'],
     "--max_new_tokens='0' is not allowed; allowed values: an int >= 1"),
    (['--workdir', 'w', '--prompt_ids', '1', '--max_new_tokens', '2',
      '--seed', '-1'], "--seed='-1' is not allowed"),
])
def test_cli_flag_errors_are_one_line_before_the_workdir(capsys, argv, match):
  # cli.Parser's style, but returned (exit code 2), not raised.
  code, out, err = _run(capsys, *argv)
  assert code == 2 and out == ''
  lines = err.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  assert match in lines[0], err


class _FakeTokenizer:
  """Stands in for tokenizers.Tokenizer: one id per character."""

  @classmethod
  def from_file(cls, path):
    assert path.endswith('tokenizer.json')
    return cls()

  def encode(self, text):
    return types.SimpleNamespace(ids=[ord(c) % V for c in text])

  def decode(self, ids):
    return '|'.join(map(str, ids))


def test_cli_prompt_text_with_tokenizer(workdir, tmp_path, capsys,
                                        monkeypatch):
  path = str(tmp_path / 'run')
  shutil.copytree(workdir[0], path)
  with open(os.path.join(path, 'tokenizer.json'), 'w') as f:
    json.dump({}, f)
  monkeypatch.setitem(sys.modules, 'tokenizers', types.SimpleNamespace(
      Tokenizer=_FakeTokenizer))
  code, out, err = _run(capsys, '--workdir', path, '--prompt', 'ABC',
                        '--max_new_tokens', '4')
  assert code == 0, err
  ids = _ids(out, 'ids')
  assert ids[:3] == [ord(c) % V for c in 'ABC'] and len(ids) == 7
  assert 'text: ' + '|'.join(map(str, ids)) in out.splitlines()
  monkeypatch.setitem(sys.modules, 'tokenizers', None)  # not installed
  code, out, err = _run(capsys, '--workdir', path, '--prompt', 'ABC',
                        '--max_new_tokens', '4')
  assert code == 2 and err.strip().endswith('pip install tokenizers')
  assert len(err.splitlines()) == 1


def test_step_model_gathers_expert_weights_only_for_few_tokens():
  # B * K < E: 1 * 2 < 8 and 3 * 2 < 8 -> 'per_token'; 4 * 2 = 8 -> kept.
  model = TransformerLM(num_layers=1, d_model=16, num_heads=2, d_ff=16,
                        moe=dict(num_experts=8, top_k=2, priority='token'))
  model = gen.inference_model(model)
  for b, want in ((1, 'per_token'), (3, 'per_token'), (4, 'gather')):
    assert gen.step_model(model, b).moe.get('dispatcher', 'gather') == want, b
  dense = TransformerLM(num_layers=1, d_model=16, num_heads=2, d_ff=16)
  assert gen.step_model(dense, 1) is dense
