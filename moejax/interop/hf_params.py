"""The tensor table: HF safetensors names <-> moejax variable paths.

A `Link` ties one or more HF tensors to one or more moejax leaves with a
transform and its exact inverse (transposes, reshapes, stacks, splits: no
arithmetic, so both directions are bit for bit). `links(model, names)`
lists the links of a TransformerLM, family-specific only in the names of
the MoE block; `names` (the tensors in the checkpoint) decides between the
per-expert layout of released checkpoints (`experts.{e}.gate_proj.weight`,
Mixtral `experts.{e}.w1.weight`) and the fused layout of transformers 5's
in-memory modules (`experts.gate_up_proj` [E, 2F, D], gate rows first, and
`experts.down_proj` [E, D, F]).

HF `nn.Linear` weights are [out, in]; moejax kernels are [in..., out...]
(e.g. attn/query [D, H, Dh] <- q_proj.weight [H*Dh, D]).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

Path = tuple  # ('params', 'block_0', 'attn', 'query')
KINDS = ('copy', 'linear', 'experts', 'fused_gate_up', 'fused_down')


@dataclasses.dataclass(frozen=True)
class Link:
  """HF tensors `hf` <-> moejax leaves `jax` by `kind`.

  kind: 'copy' (reshape only; HF side 1-D when n_in == 1), 'linear' ([out, in] <-> [in..., out...],
  `n_in` leading input axes), 'experts' (E tensors [out, in] <-> one
  [E, in, out]), 'fused_gate_up' ([E, 2F, D] <-> wi_0, wi_1 [E, D, F]),
  'fused_down' ([E, D, F] <-> wo [E, F, D]).
  """
  hf: tuple[str, ...]
  jax: tuple[Path, ...]
  kind: str
  n_in: int = 1


def _linear(hf: str, path: Path, n_in: int = 1) -> Link:
  return Link((hf,), (path,), 'linear', n_in)


def _copy(hf: str, path: Path, flatten: bool = True) -> Link:
  """A reshape-only link; the HF side is 1-D if `flatten` (biases [H*Dh],
  norm weights), else the moejax shape (the embedding)."""
  return Link((hf,), (path,), 'copy', int(flatten))


# ------------------------------------------------------------- transforms
def to_moejax(link: Link, arrays: Sequence[np.ndarray],
              shapes: Sequence[tuple]) -> list[np.ndarray]:
  """HF arrays of `link` -> its moejax leaves, shaped `shapes`.

  Raises:
    ValueError naming the HF tensor whose shape does not fit.
  """
  def fail(i, expected):
    raise ValueError(f'tensor {link.hf[i]!r} has shape '
                     f'{tuple(arrays[i].shape)}, but the model needs '
                     f'{tuple(expected)} (from config.json).')
  shape = tuple(shapes[0])
  if link.kind == 'copy':
    if arrays[0].size != math.prod(shape):
      fail(0, shape)
    return [arrays[0].reshape(shape)]
  if link.kind == 'linear':
    want = (math.prod(shape[link.n_in:]), math.prod(shape[:link.n_in]))
    if arrays[0].shape != want:
      fail(0, want)
    return [np.ascontiguousarray(arrays[0].T).reshape(shape)]
  if link.kind == 'experts':
    want = shape[:0:-1]  # [out, in]
    for i, a in enumerate(arrays):
      if a.shape != want:
        fail(i, want)
    return [np.stack([a.T for a in arrays])]
  if link.kind == 'fused_gate_up':
    e, d, f = shape
    if arrays[0].shape != (e, 2 * f, d):
      fail(0, (e, 2 * f, d))
    both = arrays[0].transpose(0, 2, 1)  # [E, D, 2F]
    return [np.ascontiguousarray(both[..., :f]),
            np.ascontiguousarray(both[..., f:])]
  if link.kind == 'fused_down':
    if arrays[0].shape != shape[::2] + shape[1:2]:  # [E, D, F]
      fail(0, (shape[0], shape[2], shape[1]))
    return [np.ascontiguousarray(arrays[0].transpose(0, 2, 1))]
  raise ValueError(f'unknown link kind {link.kind!r}; allowed: {KINDS}.')


def to_hf(link: Link, leaves: Sequence[np.ndarray]) -> list[np.ndarray]:
  """moejax leaves of `link` -> its HF arrays (the inverse of to_moejax)."""
  if link.kind == 'copy':
    leaf = np.ascontiguousarray(leaves[0])
    return [leaf.reshape(-1) if link.n_in else leaf]
  if link.kind == 'linear':
    w = leaves[0]
    n_in = math.prod(w.shape[:link.n_in])
    return [np.ascontiguousarray(w.reshape(n_in, -1).T)]
  if link.kind == 'experts':
    return [np.ascontiguousarray(w.T) for w in leaves[0]]
  if link.kind == 'fused_gate_up':
    both = np.concatenate(list(leaves[:2]), axis=-1)  # [E, D, 2F]
    return [np.ascontiguousarray(both.transpose(0, 2, 1))]
  if link.kind == 'fused_down':
    return [np.ascontiguousarray(leaves[0].transpose(0, 2, 1))]
  raise ValueError(f'unknown link kind {link.kind!r}; allowed: {KINDS}.')


# ------------------------------------------------------------------ tables
def _attention(model, i: int) -> list[Link]:
  p, a = f'model.layers.{i}.self_attn.', ('params', f'block_{i}', 'attn')
  if model.attention == 'mla':
    mla = dict(model.mla)
    out = [_linear(p + 'kv_a_proj_with_mqa.weight', a + ('kv_a',)),
           _copy(p + 'kv_a_layernorm.weight', a + ('kv_a_norm', 'scale')),
           _linear(p + 'kv_b_proj.weight', a + ('kv_b',)),
           _linear(p + 'o_proj.weight', a + ('out',), n_in=2)]
    if mla['q_lora_rank'] is None:
      return [_linear(p + 'q_proj.weight', a + ('query',))] + out
    return [_linear(p + 'q_a_proj.weight', a + ('q_a',)),
            _copy(p + 'q_a_layernorm.weight', a + ('q_a_norm', 'scale')),
            _linear(p + 'q_b_proj.weight', a + ('q_b',))] + out
  out = [_linear(p + f'{hf}_proj.weight', a + (name,))
         for hf, name in (('q', 'query'), ('k', 'key'), ('v', 'value'))]
  out.append(_linear(p + 'o_proj.weight', a + ('out',), n_in=2))
  if model.attn_bias:
    out += [_copy(p + f'{hf}_proj.bias', a + (f'{name}_bias',))
            for hf, name in (('q', 'query'), ('k', 'key'), ('v', 'value'))]
  if model.qk_norm != 'none':
    out += [_copy(p + 'q_norm.weight', a + ('query_norm', 'scale')),
            _copy(p + 'k_norm.weight', a + ('key_norm', 'scale'))]
  return out


def _ffn(prefix: str, path: Path, names=('gate', 'up', 'down')) -> list[Link]:
  """A SwiGLU MLP (gate_proj, up_proj, down_proj) <-> wi_0, wi_1, wo."""
  gate, up, down = (f'{prefix}{n}_proj.weight' for n in names)
  return [_linear(gate, path + ('wi_0',)), _linear(up, path + ('wi_1',)),
          _linear(down, path + ('wo',))]


def _experts(moe_prefix: str, path: Path, num_experts: int, fused: bool,
             mixtral: bool) -> list[Link]:
  p = moe_prefix + 'experts.'
  if fused:
    return [Link((p + 'gate_up_proj',), (path + ('wi_0',), path + ('wi_1',)),
                 'fused_gate_up'),
            Link((p + 'down_proj',), (path + ('wo',),), 'fused_down')]
  names = (('w1', 'wi_0'), ('w3', 'wi_1'), ('w2', 'wo')) if mixtral else (
      ('gate_proj', 'wi_0'), ('up_proj', 'wi_1'), ('down_proj', 'wo'))
  return [Link(tuple(f'{p}{e}.{hf}.weight' for e in range(num_experts)),
               (path + (name,),), 'experts') for hf, name in names]


def _moe(model, i: int, family: str, fused: bool) -> list[Link]:
  moe = dict(model.moe)
  mixtral = family == 'mixtral'
  p = f'model.layers.{i}.' + ('block_sparse_moe.' if mixtral else 'mlp.')
  path = ('params', f'block_{i}', 'ffn')
  out = [_linear(p + 'gate.weight', path + ('router', 'kernel'))]
  out += _experts(p, path + ('experts',), moe['num_experts'], fused, mixtral)
  if moe.get('num_shared_experts'):
    shared = 'shared_experts.' if family.startswith('deepseek') else (
        'shared_expert.')
    out += _ffn(p + shared, path + ('shared',))
  if moe.get('shared_gate'):
    out.append(_linear(p + 'shared_expert_gate.weight',
                       path + ('shared_gate',)))
  if moe.get('selection_bias'):
    out.append(_copy(p + 'gate.e_score_correction_bias',
                     ('moe_state', f'block_{i}', 'ffn', 'router', 'bias')))
  return out


def is_fused(names: Sequence[str]) -> bool:
  """Whether a checkpoint stores experts fused (`experts.gate_up_proj`)."""
  return any(n.endswith('experts.gate_up_proj') for n in names)


def links(model, family: str, fused: bool = False) -> list[Link]:
  """Every link of a TransformerLM of an HF `family`, in file order.

  Args:
    model: the TransformerLM.
    family: HF model_type (moejax.interop.hf_config.FAMILIES).
    fused: experts in the fused layout (see module docstring).

  Returns:
    Links covering every moejax leaf exactly once.
  """
  out = [_copy('model.embed_tokens.weight', ('params', 'embed', 'embedding'),
               flatten=False)]
  moe_layers = set(model.moe_layers)
  for i in range(model.num_layers):
    p = f'model.layers.{i}.'
    out.append(_copy(p + 'input_layernorm.weight',
                     ('params', f'block_{i}', 'attn_norm', 'scale')))
    out += _attention(model, i)
    out.append(_copy(p + 'post_attention_layernorm.weight',
                     ('params', f'block_{i}', 'ffn_norm', 'scale')))
    if i in moe_layers:
      out += _moe(model, i, family, fused)
    else:
      out += _ffn(p + 'mlp.', ('params', f'block_{i}', 'ffn'))
  out.append(_copy('model.norm.weight', ('params', 'final_norm', 'scale')))
  out.append(_linear('lm_head.weight', ('params', 'head', 'kernel')))
  return out


def ignorable(name: str, num_layers: int) -> bool:
  """Checkpoint tensors that are not part of the model and may be skipped:
  RoPE caches and DeepSeek's multi-token-prediction layers (indices >=
  num_hidden_layers)."""
  if name.endswith('rotary_emb.inv_freq'):
    return True
  parts = name.split('.')
  return (len(parts) > 2 and parts[:2] == ['model', 'layers'] and
          parts[2].isdigit() and int(parts[2]) >= num_layers)


def leaf_getter(tree) -> Callable[[Path], np.ndarray]:
  """path -> the leaf of a nested dict `tree` (e.g. variables)."""
  def get(path):
    node = tree
    for key in path:
      node = node[key]
    return node
  return get
