"""Parameter and FLOP accounting (moejax.models.flops) of the
EncoderClassifier, by hand: no output projection over V, the head [D, N]
once per example, expert choice's cf experts per token, Soft MoE's slot
logits and dense dispatch / combine."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from moejax.models import EncoderClassifier, TransformerLM
from moejax.models import flops

D, F, V, N, T, LAYERS = 16, 32, 32, 5, 8, 2
SMALL = dict(num_layers=LAYERS, d_model=D, num_heads=2, d_ff=F,
             vocab_size=V, num_classes=N)
EXPERT_CHOICE = dict(num_experts=4, router='expert_choice',
                     capacity_factor=2.0, eval_capacity_factor=2.0)
SOFT = dict(num_experts=4, router='soft_moe', slots_per_expert=2)
ATTN = 4 * D * D  # query, key, value, out [D, D] each, per layer
FFN = 2 * D * F  # wi [D, F] + wo [F, D]
HEAD = 2 * D * N / T  # [D, N] once per example, per token
ATTN_SCORES = 4 * LAYERS * T * D


@pytest.mark.parametrize('moe', [None, EXPERT_CHOICE, SOFT],
                         ids=['dense', 'expert_choice', 'soft_moe'])
def test_total_params_match_the_initialised_tree(moe):
  model = EncoderClassifier(**SMALL, moe=moe)
  variables = model.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))
  actual = sum(x.size for x in jax.tree.leaves(variables['params']))
  counts = flops.param_breakdown(model, T)
  assert counts['total'] == actual
  assert counts['classifier_head'] == D * N + N
  assert counts['embedding'] == V * D


@pytest.mark.parametrize('moe,expected', [
    # N_mm = layers x (attention + FFN); no output projection over V.
    (None, 3 * (2 * LAYERS * (ATTN + FFN) + ATTN_SCORES + HEAD)),
    # cf = 2 experts of 2*D*F each per token; router logits 2*D*E.
    (EXPERT_CHOICE, 3 * (2 * LAYERS * (ATTN + 2 * FFN) + ATTN_SCORES +
                         LAYERS * 2 * D * 4 + HEAD)),
    # E*C/S = 4*2/8 = 1 slot per token; slot logits 2*D*E*C; dispatch and
    # combine 2*D*E*C each.
    (SOFT, 3 * (2 * LAYERS * (ATTN + FFN) + ATTN_SCORES +
                LAYERS * (2 * D * 8 + 4 * D * 8) + HEAD)),
], ids=['dense', 'expert_choice', 'soft_moe'])
def test_flops_per_token_by_hand(moe, expected):
  model = EncoderClassifier(**SMALL, moe=moe)
  assert flops.flops_per_token(model, T) == round(expected)


def test_the_head_counts_once_per_example():
  # Doubling T halves the head's share per token; nothing else changes
  # but the attention scores.
  model = EncoderClassifier(**SMALL)
  diff = flops.flops_per_token(model, T) - flops.flops_per_token(model,
                                                                 2 * T)
  assert diff == round(3 * (HEAD / 2 - ATTN_SCORES))


def test_summary_line_of_a_classifier():
  model = EncoderClassifier(**SMALL, moe=EXPERT_CHOICE)
  line = flops.summary(model, T)
  per_token = flops.flops_per_token(model, T)
  assert line.startswith('params total ') and 'FLOPs/token' in line
  assert f'({flops._human(per_token * T)}/example)' in line  # pylint: disable=protected-access
  assert line.endswith('2/2 MoE layers, encoder classifier of 5 classes')
  lm_line = flops.summary(TransformerLM(**{k: v for k, v in SMALL.items()
                                           if k != 'num_classes'}), T)
  assert 'example' not in lm_line and 'classifier' not in lm_line


def test_supports_the_two_model_kinds_only():
  assert flops.supports(EncoderClassifier(**SMALL))
  assert flops.supports(TransformerLM(num_layers=1, d_model=D, num_heads=2,
                                      d_ff=F, vocab_size=V))
  assert not flops.supports(nn.Dense(3))
