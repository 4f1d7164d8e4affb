"""Routing groups across sequences (moejax.grouping): layouts, drops, and
what a token's routing can see in a causal model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import grouping
from moejax.models import TransformerLM
from tests.conftest import init_key


def _labels(b, l):
  """[B, L, 1] float: token (b, t) carries 10 * b + t."""
  return (10 * np.arange(b)[:, None] + np.arange(l)[None])[..., None].astype(
      np.float32)


def test_layouts_by_hand():
  x = _labels(4, 3)  # sequences 0..3 of 3 positions
  valid = np.ones((4, 3), bool)
  seq, _ = grouping.to_groups(jnp.asarray(x), jnp.asarray(valid), 6)
  pos, _ = grouping.to_groups(jnp.asarray(x), jnp.asarray(valid), 6,
                              'position')
  # 'sequence': the tokens in memory order, cut every 6.
  np.testing.assert_array_equal(seq[..., 0], [[0, 1, 2, 10, 11, 12],
                                              [20, 21, 22, 30, 31, 32]])
  # 'position': sequences (0, 1) and (2, 3), position by position.
  np.testing.assert_array_equal(pos[..., 0], [[0, 10, 1, 11, 2, 12],
                                              [20, 30, 21, 31, 22, 32]])
  for order, grouped in (('sequence', seq), ('position', pos)):
    back = grouping.from_groups(grouped, 4, 3, 6, order)
    np.testing.assert_array_equal(back, x)


def test_position_layout_pads_whole_sequences():
  x, valid = _labels(3, 2), np.ones((3, 2), bool)
  valid[1, 1] = False  # a padding token of the batch stays invalid
  with pytest.raises(ValueError, match=r"group_size=4 with group_order="):
    grouping.to_groups(jnp.asarray(x), jnp.asarray(valid), 4, 'position')
  xg, vg = grouping.to_groups(jnp.asarray(x), jnp.asarray(valid), 4,
                              'position', pad_to_group=True)
  # 3 sequences -> 2 groups of 2; the 4th sequence is padding (label 0,
  # invalid).
  np.testing.assert_array_equal(xg[..., 0], [[0, 10, 1, 11], [20, 0, 21, 0]])
  np.testing.assert_array_equal(vg, [[1, 1, 1, 0], [1, 0, 1, 0]])
  np.testing.assert_array_equal(
      grouping.from_groups(xg, 3, 2, 4, 'position'), x)


@pytest.mark.parametrize('group_size,order,leaks', [
    (None, 'sequence', False),  # one group per sequence
    (4, 'sequence', False),  # chunks of one sequence (L = 8)
    (16, 'sequence', True),  # sequence 1 after all of sequence 0
    (12, 'sequence', True),  # S does not divide L: groups straddle
    (8, 'position', False),
    (24, 'position', False),
])
def test_causal_group_leak(group_size, order, leaks):
  assert bool(grouping.causal_group_leak(group_size, order, 8)) == leaks


def test_bad_layouts_name_the_argument():
  with pytest.raises(ValueError, match="group_order='rows'.*'sequence', "
                     "'position'"):
    moejax.MoeLayer(num_experts=2, d_ff=4, group_order='rows')
  with pytest.raises(ValueError, match='multiple of the sequence length 8'):
    grouping.check_layout(12, 'position', 8)


def _steered_layer(**kwargs):
  """E = 2, K = 1, D = 2: a token [1, 0] picks expert 0, [0, 1] expert 1."""
  layer = moejax.MoeLayer(num_experts=2, d_ff=8, min_capacity=1, **kwargs)
  x = jnp.zeros((2, 4, 2))
  variables = jax.jit(layer.init)(init_key(0), x)
  params = variables['params']
  params['router']['kernel'] = jnp.eye(2) * 4.0
  params['experts']['wi'] = jnp.abs(params['experts']['wi']) + 0.1
  params['experts']['wo'] = jnp.abs(params['experts']['wo']) + 0.1
  return layer, variables


def _kept(layer, variables, x):
  """[B, L] bool: tokens whose MoE output is non-zero (kept)."""
  y, _ = jax.jit(layer.apply)(variables, x)
  return np.asarray(jnp.abs(y).sum(-1) > 0)


def test_cross_sequence_groups_drop_other_tokens():
  # Sequence 0 wants expert 0 at all 4 positions; sequence 1 wants expert 0
  # at positions 0, 1 and expert 1 at 2, 3.
  zero, one = [1.0, 0.0], [0.0, 1.0]
  x = jnp.asarray([[zero] * 4, [zero, zero, one, one]])
  # Per sequence (S = 4): C = ceil(0.75 * 4 * 1 / 2) = 2: sequence 0 keeps
  # positions 0, 1; sequence 1 keeps all (2 requests per expert).
  per_seq = _steered_layer(capacity_factor=0.75, eval_capacity_factor=0.75)
  np.testing.assert_array_equal(_kept(*per_seq, x), [[1, 1, 0, 0],
                                                     [1, 1, 1, 1]])
  # Across both sequences (S = 8): C = ceil(0.75 * 8 / 2) = 3 for the 6
  # requests for expert 0. 'sequence' order claims (0,0) (0,1) (0,2) and
  # drops (0,3) (1,0) (1,1); 'position' order claims (0,0) (1,0) (0,1) and
  # drops (1,1) (0,2) (0,3). Expert 1's 2 requests fit.
  for order, expected in (('sequence', [[1, 1, 1, 0], [0, 0, 1, 1]]),
                          ('position', [[1, 1, 0, 0], [1, 0, 1, 1]])):
    layer = _steered_layer(capacity_factor=0.75, eval_capacity_factor=0.75,
                           group_size=8, group_order=order)
    np.testing.assert_array_equal(_kept(*layer, x), expected)


B, L, D = 4, 6, 8


def _random_x(seed=0):
  return jax.random.normal(jax.random.key(seed), (B, L, D))


def _later_change(x, seq, pos):
  """x with the token at (seq, pos) replaced."""
  return x.at[seq, pos].set(jax.random.normal(jax.random.key(9), (D,)) * 3)


# (priority, K) settings a causal layer allows with a capacity. 'choice'
# with K >= 2 lets a 2nd choice see later 1st choices: refused (see below).
CAUSAL_SETTINGS = [('token', 1), ('token', 2), ('choice', 1)]


@pytest.mark.parametrize('priority,k', CAUSAL_SETTINGS)
def test_position_order_never_sees_later_positions(priority, k):
  layer = moejax.MoeLayer(
      num_experts=4, d_ff=16, top_k=k, priority=priority, min_capacity=1,
      capacity_factor=0.5, eval_capacity_factor=0.5, group_size=2 * L,
      group_order='position', causal=True)
  x = _random_x()
  variables = layer.init(init_key(1), x)
  y, aux = layer.apply(variables, x)
  assert float(aux['drop_fraction']) > 0.2  # capacity binds
  for pos in range(1, L):
    for seq in range(B):  # a later token of each sequence in turn
      y2, _ = layer.apply(variables, _later_change(x, seq, pos))
      # Every token before `pos`, of every sequence, is routed the same.
      np.testing.assert_array_equal(y2[:, :pos], y[:, :pos])


ZERO, ONE = [1.0, 0.0], [0.0, 1.0]  # steered tokens: expert 0 / expert 1


def _output_changes(layer, variables, x, changed, where):
  """Whether the MoE output at token `where` differs between x and changed."""
  y, _ = layer.apply(variables, jnp.asarray(x))
  y2, _ = layer.apply(variables, jnp.asarray(changed))
  return not np.array_equal(y[where], y2[where])


def test_the_leaking_layouts_do_leak():
  """The layouts a causal layer refuses (or documents) really leak."""
  # 'sequence' order, S = 8 over two sequences of L = 4, C = ceil(0.75 * 8 /
  # 2) = 3. Expert 0 is asked by (0,0) (0,1) (0,3) and then (1,0), which is
  # dropped; turning the later token (0,3) to expert 1 frees the slot for
  # (1,0): position 3 of sequence 0 decides position 0 of sequence 1.
  layer, variables = _steered_layer(
      capacity_factor=0.75, eval_capacity_factor=0.75, group_size=8,
      group_order='sequence')
  with pytest.raises(ValueError, match="group_order='position'"):
    layer.clone(causal=True).init(init_key(1), jnp.zeros((2, 4, 2)))
  x = [[ZERO, ZERO, ONE, ZERO], [ZERO] * 4]
  changed = [[ZERO, ZERO, ONE, ONE], [ZERO] * 4]
  assert _output_changes(layer, variables, x, changed, (1, 0))
  # 'choice' priority with K = 2, even position-major: every 1st choice
  # claims before any 2nd choice. C = max(1, ceil(0.125 * 8 * 2 / 2)) = 1:
  # (0,0)'s 2nd choice (expert 1) gets expert 1's slot, unless a later
  # token's 1st choice, (1,3) here, takes it first. A causal layer refuses
  # it unless told to accept the leak.
  leaky = dict(top_k=2, capacity_factor=0.125, eval_capacity_factor=0.125,
               group_size=8, group_order='position', causal=True)
  with pytest.raises(ValueError, match="priority='choice' with 2 choices"):
    moejax.MoeLayer(num_experts=2, d_ff=8, min_capacity=1, **leaky)
  layer, variables = _steered_layer(**leaky, allow_noncausal_routing=True)
  x = [[ZERO] * 4, [ZERO] * 4]
  changed = [[ZERO] * 4, [ZERO] * 3 + [ONE]]
  assert _output_changes(layer, variables, x, changed, (0, 0))
  token = layer.clone(priority='token')  # the strictly causal order
  assert not _output_changes(token, variables, x, changed, (0, 0))


def test_causal_lm_with_position_groups_sees_no_later_token():
  model = TransformerLM(
      num_layers=2, d_model=16, num_heads=2, d_ff=32, vocab_size=32,
      moe=dict(num_experts=4, top_k=1, capacity_factor=0.5,
               eval_capacity_factor=0.5, min_capacity=1, group_size=3 * L,
               group_order='position', pad_to_group=True))
  tokens = np.random.default_rng(0).integers(0, 32, (5, L)).astype(np.int32)
  variables = model.init(init_key(0), tokens)
  apply = jax.jit(lambda t: model.apply(variables, t)[0])
  logits = apply(tokens)
  for pos in (2, 4):
    changed = tokens.copy()
    changed[3, pos:] = (changed[3, pos:] + 7) % 32  # another sequence
    again = apply(changed)
    np.testing.assert_array_equal(again[:, :pos], logits[:, :pos])
    assert not np.array_equal(again[3, pos:], logits[3, pos:])
  with pytest.raises(ValueError, match='causal model must not see'):
    model.clone(moe=dict(model.moe, group_order='sequence')).init(
        init_key(0), tokens)


def test_param_shapes_fit_any_group_layout():
  """flops.param_shapes builds a dummy batch that whole groups divide, so
  counting params works for groups of whole sequences too."""
  from moejax.models import flops  # pylint: disable=import-outside-toplevel
  base = dict(num_layers=1, d_model=8, num_heads=2, d_ff=16, vocab_size=16)
  plain = TransformerLM(**base, moe=dict(num_experts=2))
  want = jax.tree.map(lambda a: a.shape, flops.param_shapes(plain, 8))
  for layout in (dict(group_size=32, group_order='position'),  # B = 4
                 dict(group_size=12, allow_noncausal_routing=True),  # B = 3
                 dict(group_sequences=4, group_order='position'),  # B = 4
                 dict(group_sequences=-1, group_order='position')):  # B = 1
    model = TransformerLM(**base, moe=dict(num_experts=2, **layout))
    got = jax.tree.map(lambda a: a.shape, flops.param_shapes(model, 8))
    assert got == want


def test_group_tokens_by_hand():
  assert grouping.group_tokens(None, None, 5) is None  # one per sequence
  assert grouping.group_tokens(7, None, 5) == 7  # tokens, as given
  assert grouping.group_tokens(None, 3, 5) == 15  # 3 sequences of 5
  assert grouping.group_tokens(None, 3, 2) == 6  # ... of 2 (e.g. MoD's Lc)
  with pytest.raises(ValueError, match='group_size=6 and group_sequences=3 '
                     'both set'):
    grouping.group_tokens(6, 3, 2)
  with pytest.raises(ValueError, match='group_size=8 and group_sequences=2'):
    moejax.MoeLayer(num_experts=2, d_ff=4, group_size=8, group_sequences=2)
  # -1: the whole batch, k = B: 4 sequences of 5.
  assert grouping.group_tokens(None, grouping.WHOLE_BATCH, 5, 4) == 20
  with pytest.raises(ValueError, match='needs the batch size B'):
    grouping.group_tokens(None, -1, 5)
  for bad in (0, -2):
    with pytest.raises(ValueError, match=f'group_sequences must be None '
                       f'.*, an int >= 1, or -1 .*; got {bad}'):
      moejax.MoeLayer(num_experts=2, d_ff=4, group_sequences=bad)
  with pytest.raises(ValueError, match="not supported with router='soft_"):
    moejax.MoeLayer(num_experts=2, d_ff=4, router='soft_moe',
                    group_sequences=-1)


@pytest.mark.parametrize('order', ['sequence', 'position'])
def test_group_sequences_equals_group_size_of_whole_sequences(order):
  """group_sequences=k routes exactly as group_size=k*L; with capacity 0.5
  the groups' drops make the layout visible (one group per sequence
  differs)."""
  b, l = 4, 6
  x = jax.random.normal(jax.random.key(3), (b, l, 8))
  layer = moejax.MoeLayer(num_experts=4, d_ff=16, capacity_factor=0.5,
                          eval_capacity_factor=0.5, group_size=2 * l,
                          group_order=order)
  variables = jax.jit(layer.init)(init_key(0), x)
  run = lambda m: jax.jit(m.apply)(variables, x)[0]
  want = run(layer)
  got = run(layer.clone(group_size=None, group_sequences=2))
  np.testing.assert_array_equal(got, want)
  per_seq = run(layer.clone(group_size=None))
  assert not np.array_equal(per_seq, want)


def test_whole_batch_group_follows_the_batch():
  """group_sequences=-1 is one group of every row the layer is called on:
  group_sequences=B at B = 4, and at B = 2 (half the rows) the same as
  group_sequences=2; capacity 0.5 makes the layout visible (groups of 2
  sequences differ from one group of 4)."""
  b, l = 4, 6
  x = jax.random.normal(jax.random.key(3), (b, l, 8))
  layer = moejax.MoeLayer(num_experts=4, d_ff=16, capacity_factor=0.5,
                          eval_capacity_factor=0.5, group_sequences=-1,
                          group_order='position')
  variables = jax.jit(layer.init)(init_key(0), x)
  run = lambda m, v: jax.jit(m.apply)(variables, v)[0]
  whole = run(layer, x)
  np.testing.assert_array_equal(whole, run(layer.clone(group_sequences=4), x))
  assert not np.array_equal(whole, run(layer.clone(group_sequences=2), x))
  np.testing.assert_array_equal(run(layer, x[:2]),
                                run(layer.clone(group_sequences=2), x[:2]))


def test_mod_blocks_group_whole_selected_sequences():
  """In a Mixture-of-Depths block the MoE FFN sees [B, Lc] rows: groups of
  k sequences hold k * Lc tokens there and k * L in the other blocks, where
  a group_size fits one of the two only."""
  b, l, k = 4, 16, 2
  moe = dict(num_experts=4, top_k=1, capacity_factor=1.0,
             eval_capacity_factor=1.0, min_capacity=1, group_sequences=k,
             group_order='position')
  model = TransformerLM(num_layers=2, d_model=16, num_heads=2, d_ff=32,
                        vocab_size=32, moe=moe,
                        mod={'every': 2, 'capacity': 0.25})  # block 1: MoD
  tokens = np.random.default_rng(0).integers(0, 32, (b, l)).astype(np.int32)
  variables = jax.eval_shape(model.init, init_key(0), tokens)
  _, state = jax.eval_shape(
      lambda v, t: model.apply(v, t, mutable=['intermediates']), variables,
      tokens)
  shapes = {path[0].key: leaf.shape for path, leaf in
            jax.tree_util.tree_flatten_with_path(state['intermediates'])[0]
            if 'dispatched' in str(path)}
  # Block 0: G = B / k = 2 groups of S = 2 * 16 = 32 tokens, C = 32 / 4 = 8
  # slots per expert; block 1 (MoD, Lc = 0.25 * 16 = 4): 2 groups of
  # S = 2 * 4 = 8 tokens, C = 8 / 4 = 2.
  assert shapes['block_0'][:3] == (2, 4, 8), shapes
  assert shapes['block_1'][:3] == (2, 4, 2), shapes
  tokens_layout = dict(moe, group_sequences=None, group_size=k * l)
  with pytest.raises(ValueError, match='group_size=32 .* groups 8 whole '
                     'sequences, which does not divide the 4 sequences'):
    jax.eval_shape(model.clone(moe=tokens_layout).init, init_key(0), tokens)
