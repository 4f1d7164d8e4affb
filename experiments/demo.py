"""Routes one random batch through an MoeLayer and prints what happened.

    python -m experiments.demo [--num_experts 8] [--top_k 2] [--capacity_factor 1.0]

Prints the effective capacity, the per-expert load, the drop fractions and
both dispatchers' agreement. A smoke test of an installation, not training.
"""

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import moejax

_E = flags.DEFINE_integer('num_experts', 8, 'E, number of experts.')
_K = flags.DEFINE_integer('top_k', 2, 'K, experts chosen per token.')
_CF = flags.DEFINE_float('capacity_factor', 1.0, 'Training capacity factor.')
_PRIORITY = flags.DEFINE_enum('priority', 'choice', list(moejax.PRIORITIES),
                              'Overflow priority.')


def main(argv):
  del argv
  b, l, d = 4, 64, 32
  layer = moejax.MoeLayer(num_experts=_E.value, d_ff=64, top_k=_K.value,
                          capacity_factor=_CF.value, priority=_PRIORITY.value)
  x = jax.random.normal(jax.random.key(0), (b, l, d))
  variables = layer.init(jax.random.key(1), x)
  y, aux = jax.jit(layer.apply, static_argnames='deterministic')(
      variables, x, deterministic=False)
  y_ref, _ = layer.clone(dispatcher='einsum').apply(variables, x,
                                                    deterministic=False)
  print(f'MoeLayer E={_E.value} K={_K.value} cf={_CF.value} '
        f'priority={_PRIORITY.value}: x {x.shape} -> y {y.shape}')
  print(f'  capacity C = {int(aux["capacity"])} slots per expert per group '
        f'(S = {l})')
  print('  expert load:', np.round(np.asarray(aux['expert_load']), 3))
  for name in ('aux_loss', 'z_loss', 'max_violation', 'drop_fraction',
               'fully_dropped_fraction', 'router_entropy', 'top1_prob'):
    print(f'  {name:24s} {float(aux[name]):.4f}')
  print(f'  gather vs einsum max |diff| = '
        f'{float(jnp.abs(y - y_ref).max()):.2e}')


if __name__ == '__main__':
  app.run(main)
