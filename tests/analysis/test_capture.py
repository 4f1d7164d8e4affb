"""Routing capture and routing statistics on a tiny TransformerLM.

One MoE layer, so a token's router input (and so its top-1 expert, chosen
before capacity) does not depend on how tokens are grouped: a model with
one group per sequence, one with groups of 24 tokens across sequences
(padded) and one with position-major groups of 3 whole sequences (padded)
must report the same top-1 expert for every token, which checks the
[G, S] -> [B, L] mapping of the capture for both group orders.
"""

import jax
import numpy as np
import pytest

from moejax.analysis import capture
from moejax.analysis import info
from moejax.analysis import stats
from moejax.models import TransformerLM
from tests.conftest import init_key

B, L, V, E = 4, 16, 32, 4


def _model(**moe):
  return TransformerLM(num_layers=1, d_model=16, num_heads=2, d_ff=32,
                       vocab_size=V, moe=dict(num_experts=E, top_k=1, **moe))


@pytest.fixture(scope='module')
def setup():
  rng = np.random.default_rng(0)
  batches = [{'tokens': rng.integers(0, V, (B, L + 1)).astype(np.int32),
              'domain': rng.integers(0, 3, B).astype(np.int32)}
             for _ in range(2)]
  model = _model()
  params = jax.jit(model.init)(init_key(0),
                               np.zeros((B, L), np.int32))['params']
  return model, params, batches


def test_top1_matches_the_layers_own_load(setup):
  model, params, batches = setup
  result = stats.routing_statistics(model, params, batches, num_shuffles=4)
  assert list(result) == ['block_0']
  layer = result['block_0']
  # K = 1: the layer's expert_load (token-choices per expert, computed by
  # moejax.losses) is the histogram of the captured first choices.
  np.testing.assert_allclose(layer['top1_load'], layer['expert_load'],
                             atol=1e-6)
  assert layer['tokens'] == 2 * B * L
  assert 0.0 <= layer['nmi'] <= 1.0 and 0.0 <= layer['nmi_shuffled'] <= 1.0
  nmi = capture.specialisation(model, params, batches)
  assert nmi == {'block_0': pytest.approx(layer['nmi'])}


def test_capture_is_independent_of_grouping(setup):
  model, params, batches = setup
  experts, valid, _ = capture.routing_outputs(model, params, batches)
  assert experts['block_0'].shape == (2 * B, L) and valid.all()
  assert len(np.unique(experts['block_0'])) > 1  # not a trivial routing
  for layout in (
      # 64 tokens -> 3 groups of 24, sequences cut mid-way: a causal LM
      # must opt in to the leak.
      dict(group_size=24, allow_noncausal_routing=True),
      # 4 sequences -> 2 groups of 3 (one padding sequence), interleaved.
      dict(group_size=3 * L, group_order='position'),
      # the same groups given in sequences
      dict(group_sequences=3, group_order='position')):
    grouped = _model(pad_to_group=True, **layout)
    experts_g, valid_g, _ = capture.routing_outputs(grouped, params, batches)
    np.testing.assert_array_equal(experts['block_0'], experts_g['block_0'])
    np.testing.assert_array_equal(valid, valid_g)


def test_padding_and_missing_domains(setup):
  model, params, batches = setup
  pad_id = int(batches[0]['tokens'][0, 0])
  _, valid, _ = capture.routing_outputs(model, params, batches[:1], pad_id)
  np.testing.assert_array_equal(valid, batches[0]['tokens'][:, :-1] != pad_id)
  unlabelled = [dict(b, domain=np.full(B, -1, np.int32)) for b in batches]
  with pytest.raises(ValueError, match='domain'):
    capture.specialisation(model, params, unlabelled)
  assert 'nmi' not in stats.routing_statistics(model, params, unlabelled)[
      'block_0']
  dense = TransformerLM(num_layers=1, d_model=16, num_heads=2, d_ff=32,
                        vocab_size=V)
  assert capture.specialisation(dense, {}, unlabelled) == {}  # no compile


def test_eval_step_counts_match_the_post_hoc_score(setup):
  # The trainer's in-eval specialisation (expert x domain counts summed in
  # the jitted eval step, then NMI) equals the post-hoc analysis on the
  # same params and batches; the chance row is the contingency of the
  # captured top-1 experts against the domains rolled by one sequence.
  from moejax.train import loop
  from moejax.train import step as step_lib
  model, params, batches = setup
  batches = [dict(b, optimal_nll=np.zeros(B)) for b in batches]
  n = 3  # domains drawn from {0, 1, 2}
  eval_step = step_lib.make_eval_step(model, num_domains=n)
  record = loop.evaluate(eval_step, params, batches, step=7)
  expected = capture.specialisation(model, params, batches)
  assert record['eval/specialisation/block_0'] == pytest.approx(
      expected['block_0'], abs=1e-12)
  assert record['eval/specialisation'] == pytest.approx(expected['block_0'],
                                                        abs=1e-12)
  experts, _, _ = capture.routing_outputs(model, params, batches)
  top1 = experts['block_0'].reshape(2, B, L)
  rolled = np.stack([np.roll(b['domain'], 1) for b in batches])  # [2, B]
  chance = info.normalized_mutual_information(
      top1.ravel(), np.broadcast_to(rolled[..., None], top1.shape).ravel())
  assert record['eval/specialisation_chance'] == pytest.approx(chance,
                                                               abs=1e-12)
  # Without num_domains nothing is counted.
  plain = loop.evaluate(step_lib.make_eval_step(model), params, batches, 7)
  assert not any('specialisation' in k for k in plain)
  assert plain['eval/loss'] == record['eval/loss']


def test_counts_skip_padding_and_unknown_domains(setup):
  model, params, batches = setup
  tokens = batches[0]['tokens']
  pad_id = int(tokens[0, 0])
  inputs = tokens[:, :-1]
  domain = np.array([0, -1, 2, 1], np.int32)  # sequence 1: unknown domain
  counts = jax.jit(capture.expert_domain_counts, static_argnums=(0, 5))(
      model, {'params': params}, inputs, inputs == pad_id, domain, 3)
  c = np.asarray(counts['block_0'])  # [2, E, 3]
  experts, valid, _ = capture.routing_outputs(model, params, batches[:1],
                                              pad_id)
  # Naive loop: count each valid token of a known-domain sequence.
  expected = np.zeros((2, E, 3))
  for row, dom in enumerate((domain, np.roll(domain, 1))):
    for i in range(B):
      for j in range(L):
        if valid[i, j] and dom[i] >= 0:
          expected[row, experts['block_0'][i, j], dom[i]] += 1
  np.testing.assert_array_equal(c, expected)
  assert c[0].sum() == valid[[0, 2, 3]].sum() < 3 * L  # padding left out


def test_token_specialisation_in_eval_matches_a_direct_nmi(setup):
  # The in-eval token specialisation (top-1 expert x input token id,
  # scatter-added counts) equals the NMI computed directly from the captured
  # top-1 experts and the input ids; its chance level pairs each sequence's
  # experts with its batch neighbour's tokens. Padding is not counted.
  from moejax.train import loop
  from moejax.train import step as step_lib
  model, params, batches = setup
  batches = [dict(b, optimal_nll=np.zeros(B)) for b in batches]
  pad_id = int(batches[0]['tokens'][1, 3])
  eval_step = step_lib.make_eval_step(model, token_vocab=V, pad_id=pad_id)
  record = loop.evaluate(eval_step, params, batches, step=3)
  experts, valid, _ = capture.routing_outputs(model, params, batches, pad_id)
  inputs = np.concatenate([b['tokens'][:, :-1] for b in batches])  # [2B, L]
  rolled = np.concatenate([np.roll(b['tokens'][:, :-1], 1, axis=0)
                           for b in batches])
  top1 = experts['block_0']
  assert not valid.all()  # some padding to leave out
  want = info.normalized_mutual_information(top1[valid], inputs[valid])
  chance = info.normalized_mutual_information(top1[valid], rolled[valid])
  assert record['eval/token_specialisation/block_0'] == pytest.approx(
      want, abs=1e-12)
  assert record['eval/token_specialisation_chance'] == pytest.approx(
      chance, abs=1e-12)
  assert want != pytest.approx(chance)
