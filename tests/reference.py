"""A naive, loop-based numpy MoE layer: the reference the fast code must match.

It re-derives routing from the parameters with explicit Python loops
(softmax, top-K, choice / token / score priority counting), then applies
each kept choice's expert FFN to its token, one token at a time.
"""

import numpy as np


def _gelu(x):  # tanh approximation, as jax.nn.gelu's default
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _silu(x):
  return x / (1 + np.exp(-x))


def ffn(x, params, e, activation):
  """One expert's FFN on one token x [D]."""
  if activation in ('relu', 'gelu'):
    h = x @ params['wi'][e]
    h = np.maximum(h, 0) if activation == 'relu' else _gelu(h)
  else:
    gate = x @ params['wi_0'][e]
    gate = _silu(gate) if activation == 'swiglu' else _gelu(gate)
    h = gate * (x @ params['wi_1'][e])
  return h @ params['wo'][e]


def route(probs, k, capacity, priority, valid):
  """probs [S, E] -> list over tokens of [(expert, gate, kept)] * K."""
  s, e = probs.shape
  choices = [list(np.argsort(-probs[t], kind='stable')[:k]) for t in range(s)]
  tokens = list(range(s))
  if priority == 'score':
    tokens = sorted(tokens, key=lambda t: -probs[t, choices[t][0]])
  if priority == 'token':
    order = [(t, j) for t in tokens for j in range(k)]
  else:  # 'choice' and 'score' are choice-major
    order = [(t, j) for j in range(k) for t in tokens]
  used = [0] * e
  kept = {}
  for t, j in order:
    if not valid[t]:
      kept[t, j] = False
      continue
    expert = choices[t][j]
    kept[t, j] = used[expert] < capacity
    used[expert] += 1
  return [[(choices[t][j], probs[t, choices[t][j]], kept[t, j])
           for j in range(k)] for t in range(s)]


def _router_probs(x, kernel):
  """Softmax router probabilities of one group: x [S, D] -> [S, E]."""
  logits = x @ kernel
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  return probs / probs.sum(-1, keepdims=True)


def moe_layer(x, valid, params, k, capacity, priority, activation):
  """x [G, S, D], valid [G, S] -> y [G, S, D], by explicit loops."""
  params = {name: np.asarray(v, np.float64) for name, v in params.items()}
  x = np.asarray(x, np.float64)
  y = np.zeros_like(x)
  for g in range(x.shape[0]):
    probs = _router_probs(x[g], params['router'])
    for t, choices in enumerate(route(probs, k, capacity, priority, valid[g])):
      for expert, gate, kept in choices:
        if kept:
          y[g, t] += gate * ffn(x[g, t], params, expert, activation)
  return y


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def deepseek_route(logits, k, bias, num_groups, topk_groups, scale):
  """One token's DeepSeek-V3 routing by explicit loops.

  logits [E] -> list of (expert, gate): sigmoid scores; group score = sum of
  a group's two best biased scores; best `topk_groups` groups; top-K of the
  biased scores inside them; gates = unbiased scores renormalised over the
  K chosen, times `scale`.
  """
  e = len(logits)
  scores = _sigmoid(np.asarray(logits, np.float64))
  biased = scores + bias
  size = e // num_groups
  group_scores = [sorted(biased[i * size:(i + 1) * size])[::-1][:2]
                  for i in range(num_groups)]
  group_scores = [sum(g) for g in group_scores]
  groups = sorted(range(num_groups), key=lambda i: (-group_scores[i], i))
  allowed = [x for i in groups[:topk_groups]
             for x in range(i * size, (i + 1) * size)]
  chosen = sorted(allowed, key=lambda x: (-biased[x], x))[:k]
  total = sum(scores[x] for x in chosen)
  return [(x, scale * scores[x] / total) for x in chosen]


def expert_choice_layer(x, valid, params, capacity, activation):
  """Expert-choice MoE by loops: x [G, S, D] -> y [G, S, D]."""
  params = {name: np.asarray(v, np.float64) for name, v in params.items()}
  x = np.asarray(x, np.float64)
  y = np.zeros_like(x)
  for g in range(x.shape[0]):
    probs = _router_probs(x[g], params['router'])
    for e in range(probs.shape[1]):
      tokens = [t for t in range(x.shape[1]) if valid[g, t]]
      tokens = sorted(tokens, key=lambda t: (-probs[t, e], t))[:capacity]
      for t in tokens:
        y[g, t] += probs[t, e] * ffn(x[g, t], params, e, activation)
  return y


def soft_moe_layer(x, valid, params, activation):
  """Soft MoE by loops: x [G, S, D], phi params['router'] [D, E, C]."""
  params = {name: np.asarray(v, np.float64) for name, v in params.items()}
  x = np.asarray(x, np.float64)
  phi = params['router']
  _, e, c = phi.shape
  y = np.zeros_like(x)
  for g in range(x.shape[0]):
    tokens = [t for t in range(x.shape[1]) if valid[g, t]]
    logits = {t: x[g, t] @ phi.reshape(len(x[g, t]), e * c) for t in tokens}
    slot_out = []
    for n in range(e * c):
      w = np.array([np.exp(logits[t][n]) for t in tokens])
      w /= w.sum()
      slot_in = sum(wi * x[g, t] for wi, t in zip(w, tokens))
      slot_out.append(ffn(slot_in, params, n // c, activation))
    for t in tokens:
      w = np.exp(logits[t] - logits[t].max())
      w /= w.sum()
      y[g, t] = sum(w[n] * slot_out[n] for n in range(e * c))
  return y
