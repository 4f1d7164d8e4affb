"""Hugging Face import/export against tiny checkpoints made by transformers.

The fixtures in tests/fixtures/hf/<family>/ were written by
`tools/make_hf_fixtures.py` (torch + transformers, not needed here): HF's
own `save_pretrained` output, and in reference.npz the input ids, HF's
logits and HF's greedy continuation. Routing margins there are >= 1e-3, so
an implementation within 1e-5 of HF picks the same experts.
"""

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from moejax.interop import hf
from moejax.interop import hf_config

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                        'fixtures', 'hf')
FAMILIES = ('mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'deepseek_v3',
            'deepseek_v3_plain_q', 'deepseek_v2')


def _tensors(path):
  """{name: array} of every safetensors file in a model dir."""
  out = {}
  for file in sorted(os.listdir(path)):
    if file.endswith('.safetensors'):
      with safe_open(os.path.join(path, file), framework='np') as f:
        out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


def _leaves(variables):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
          jax.tree_util.tree_flatten_with_path(variables)[0]}


def _assert_same_variables(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert sorted(la) == sorted(lb)
  for key in la:
    assert la[key].dtype == lb[key].dtype, key
    np.testing.assert_array_equal(la[key], lb[key], err_msg=key)


def _copy_fixture(family, tmp_path, tensors=None, config=None):
  """A writable copy of a fixture, optionally with other tensors/config."""
  dst = tmp_path / family
  shutil.copytree(os.path.join(FIXTURES, family), dst)
  if tensors is not None:
    save_file(tensors, str(dst / 'model.safetensors'),
              metadata={'format': 'pt'})
  if config is not None:
    (dst / 'config.json').write_text(json.dumps(config))
  return str(dst)


@pytest.fixture(scope='module', params=FAMILIES)
def imported(request):
  family = request.param
  model, variables = hf.load_pretrained(os.path.join(FIXTURES, family))
  return family, model, variables


def test_logits_match_hf(imported):
  family, model, variables = imported
  ref = np.load(os.path.join(FIXTURES, family, 'reference.npz'))
  with jax.default_matmul_precision('highest'):
    logits, _ = jax.jit(model.apply)(variables, ref['input_ids'])
  diff = np.abs(np.asarray(logits) - ref['logits']).max()
  assert diff <= 1e-4, f'{family}: max |logits - HF| = {diff}'


def test_import_export_reproduces_the_files(imported, tmp_path):
  family, model, variables = imported
  written = hf.save_pretrained(model, variables, str(tmp_path / 'out'))
  assert written == ['config.json', 'model.safetensors']
  original = _tensors(os.path.join(FIXTURES, family))
  exported = _tensors(str(tmp_path / 'out'))
  assert sorted(exported) == sorted(original)
  for name, tensor in original.items():
    assert exported[name].dtype == tensor.dtype, name
    np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
  # The exported config maps back onto the same model.
  config = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert config['model_type'] == hf_config.family_of(model)
  again, variables_again = hf.load_pretrained(str(tmp_path / 'out'))
  assert again == model
  _assert_same_variables(variables_again, variables)


def test_fused_expert_layout_loads_the_same_params(tmp_path):
  """transformers 5's module layout: gate_up_proj [E, 2F, D] (gate rows
  first) and down_proj [E, D, F] instead of one tensor per expert."""
  model, variables = hf.load_pretrained(os.path.join(FIXTURES, 'olmoe'))
  tensors = _tensors(os.path.join(FIXTURES, 'olmoe'))
  for i in range(3):
    p = f'model.layers.{i}.mlp.experts.'
    take = lambda kind: [tensors.pop(f'{p}{e}.{kind}.weight')
                         for e in range(8)]
    gate, up, down = take('gate_proj'), take('up_proj'), take('down_proj')
    tensors[p + 'gate_up_proj'] = np.stack(
        [np.concatenate([g, u]) for g, u in zip(gate, up)])  # [E, 2F, D]
    tensors[p + 'down_proj'] = np.stack(down)  # [E, D, F]
  path = _copy_fixture('olmoe', tmp_path, tensors)
  _, fused = hf.load_pretrained(path)
  _assert_same_variables(fused, variables)
  hf.save_pretrained(model, fused, str(tmp_path / 'out'), fused_experts=True)
  np.testing.assert_array_equal(
      _tensors(str(tmp_path / 'out'))['model.layers.1.mlp.experts.'
                                      'gate_up_proj'],
      tensors['model.layers.1.mlp.experts.gate_up_proj'])


def test_sharded_index_and_bfloat16_round_trip(tmp_path):
  """bfloat16 files -> bf16 params (routers f32) -> the same bf16 files,
  written as shards with an index and read back through it."""
  tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in
             _tensors(os.path.join(FIXTURES, 'deepseek_v3')).items()
             if not k.endswith('e_score_correction_bias')}
  tensors.update({k: v for k, v in _tensors(os.path.join(
      FIXTURES, 'deepseek_v3')).items() if k.endswith('correction_bias')})
  path = _copy_fixture('deepseek_v3', tmp_path, tensors)
  model, variables = hf.load_pretrained(path)
  assert variables['params']['block_1']['ffn']['router']['kernel'].dtype == (
      np.float32)
  assert variables['params']['embed']['embedding'].dtype == ml_dtypes.bfloat16
  files = hf.save_pretrained(model, variables, str(tmp_path / 'sharded'),
                             max_shard_bytes=100_000)
  assert files[1] == 'model.safetensors.index.json' and len(files) > 3
  exported = _tensors(str(tmp_path / 'sharded'))
  for name, tensor in tensors.items():
    assert exported[name].dtype == tensor.dtype, name
    np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
  _, again = hf.load_pretrained(str(tmp_path / 'sharded'))
  _assert_same_variables(again, variables)


def _error(tmp_path, tensors=None, config=None, family='mixtral'):
  path = _copy_fixture(family, tmp_path, tensors, config)
  with pytest.raises(ValueError) as e:
    hf.load_pretrained(path)
  return str(e.value)


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
  tensors = _tensors(os.path.join(FIXTURES, 'mixtral'))
  gone = dict(tensors)
  del gone['model.layers.1.self_attn.k_proj.weight']
  assert "lacks tensor 'model.layers.1.self_attn.k_proj.weight'" in _error(
      tmp_path / 'a', gone)
  extra = dict(tensors, **{'model.layers.0.mlp.extra.weight':
                           np.zeros(3, np.float32)})
  assert "unexpected tensor 'model.layers.0.mlp.extra.weight'" in _error(
      tmp_path / 'b', extra)
  bad = dict(tensors)
  bad['model.layers.2.block_sparse_moe.experts.3.w2.weight'] = np.zeros(
      (64, 40), np.float32)
  message = _error(tmp_path / 'c', bad)
  assert "'model.layers.2.block_sparse_moe.experts.3.w2.weight'" in message
  assert '(64, 40)' in message and '(64, 48)' in message


@pytest.mark.parametrize('change,needle', [
    ({'model_type': 'llama4'}, "model_type='llama4' is not supported"),
    ({'rope_parameters': {'rope_type': 'yarn', 'rope_theta': 1e4}},
     "rope_type='yarn'"),
    ({'tie_word_embeddings': True}, 'tie_word_embeddings=True'),
    ({'hidden_act': 'gelu'}, "hidden_act='gelu'"),
])
def test_unsupported_configs_are_refused_by_name(tmp_path, change, needle):
  config = json.loads(open(os.path.join(FIXTURES, 'mixtral', 'config.json'),
                           encoding='utf-8').read())
  assert needle in _error(tmp_path, config={**config, **change})


def test_sliding_window_shorter_than_the_sequence_is_refused(tmp_path):
  config = json.loads(open(os.path.join(FIXTURES, 'mixtral', 'config.json'),
                           encoding='utf-8').read())
  model, variables = hf.load_pretrained(_copy_fixture(
      'mixtral', tmp_path, config={**config, 'sliding_window': 8}))
  model.apply(variables, np.zeros((1, 8), np.int32))  # window == L: fine
  with pytest.raises(ValueError, match='sliding_window=8'):
    model.apply(variables, np.zeros((1, 9), np.int32))


def test_export_refuses_a_model_no_family_computes():
  from moejax.models import TransformerLM  # pylint: disable=import-outside-toplevel
  model = TransformerLM(num_layers=1, d_model=16, num_heads=2, d_ff=32,
                        moe=dict(num_experts=4, top_k=2, priority='token'))
  with pytest.raises(ValueError) as e:
    hf_config.hf_config(model)
  message = str(e.value)
  assert 'capacity_factor=1.25' in message and "activation='gelu'" in message


def test_greedy_tokens_match_hf(imported):
  """16 greedy tokens through moejax's KV cache == HF generate's."""
  from moejax import generate  # pylint: disable=import-outside-toplevel
  family, model, variables = imported
  ref = np.load(os.path.join(FIXTURES, family, 'reference.npz'))
  with jax.default_matmul_precision('highest'):
    tokens = generate.generate(model, variables, ref['input_ids'], 16)
  np.testing.assert_array_equal(tokens, ref['greedy'], err_msg=family)


def test_text_prompt_through_the_tokenizer():
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  from moejax import generate  # pylint: disable=import-outside-toplevel
  path = os.path.join(FIXTURES, 'qwen3_moe')
  ref = np.load(os.path.join(path, 'reference.npz'))
  text = open(os.path.join(path, 'prompt.txt'), encoding='utf-8').read()
  ids = Tokenizer.from_file(os.path.join(path, 'tokenizer.json')).encode(
      text.strip()).ids
  np.testing.assert_array_equal([ids], ref['prompt_ids'])
  model, variables = hf.load_pretrained(path)
  with jax.default_matmul_precision('highest'):
    tokens = generate.generate(model, variables, [ids], 16)
  np.testing.assert_array_equal(tokens, ref['prompt_greedy'])
