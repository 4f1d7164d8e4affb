"""The encoder classifier, and the decoder's refusal of non-causal routers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.models import EncoderClassifier, TransformerLM, count_params
from moejax.models import attention_mask
from moejax.models.flops import experts_per_token
from tests.conftest import init_key

SMALL = dict(num_layers=2, d_model=16, num_heads=2, d_ff=32, vocab_size=32)


def test_attention_mask_is_bidirectional_when_not_causal():
  pad = jnp.array([[False, False, True]])
  # Query 0 sees keys 0 and 1 (not the padding key 2); causal sees only 0.
  np.testing.assert_array_equal(attention_mask(3, pad, causal=False)[0, 0, 0],
                                [True, True, False])
  np.testing.assert_array_equal(attention_mask(3, pad)[0, 0, 0],
                                [True, False, False])


@pytest.mark.parametrize('moe', [
    dict(num_experts=4, router='expert_choice', capacity_factor=2.0,
         eval_capacity_factor=2.0),
    dict(num_experts=4, router='soft_moe', slots_per_expert=2),
])
def test_encoder_ignores_padding_and_sees_the_future(moe):
  model = EncoderClassifier(**SMALL, num_classes=5, moe=moe)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
  pad = jnp.zeros((2, 8), bool).at[:, 6:].set(True)
  variables = model.init(init_key(0), tokens, pad)
  logits, aux = model.apply(variables, tokens, pad)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  assert set(aux['layers']) == {'block_0', 'block_1'}
  # Padding ids change nothing.
  other = tokens.at[:, 6:].set(7)
  np.testing.assert_allclose(model.apply(variables, other, pad)[0], logits,
                             rtol=1e-6, atol=1e-6)
  # The last real token changes the prediction (bidirectional, pooled).
  changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % 32)
  assert not np.allclose(model.apply(variables, changed, pad)[0], logits)


@pytest.mark.parametrize('router', ['expert_choice', 'soft_moe'])
def test_decoder_refuses_noncausal_routers(router):
  with pytest.raises(ValueError, match=router):
    TransformerLM(**SMALL, moe=dict(num_experts=4, router=router))
  EncoderClassifier(**SMALL, moe=dict(num_experts=4, router=router))


def test_active_params_follow_the_router():
  # token choice: K * m experts per token; expert choice: cf * m; Soft MoE:
  # E * m * slots / S.
  assert experts_per_token(dict(num_experts=8, top_k=2, granularity=2),
                           64) == 4
  assert experts_per_token(dict(num_experts=8, router='expert_choice',
                                capacity_factor=2.0), 64) == 2
  assert experts_per_token(dict(num_experts=8, router='soft_moe',
                                slots_per_expert=4), 64) == 0.5
  moe = dict(num_experts=4, router='expert_choice', capacity_factor=2.0)
  counts = count_params(EncoderClassifier(**SMALL, moe=moe))
  dense = count_params(EncoderClassifier(**SMALL))
  # Experts: 2 layers x 4 x (16*32 + 32*16) = 8192 params, of which a token
  # uses cf / E = 2/4; routers 2 x 16*4 = 128. Dense FFN: 2 x 1024.
  assert counts['total'] - dense['total'] == 8192 + 128 - 2048
  assert counts['active'] - dense['active'] == 4096 + 128 - 2048
