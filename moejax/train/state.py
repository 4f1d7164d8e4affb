"""TrainState (step, params, opt_state, model_state) and its creation.

`abstract_train_state` traces initialisation with `jax.eval_shape`, so the
shapes (and a checkpoint restore target) are known before any parameter is
allocated; `create_train_state` then initialises for real under `jax.jit`.

Model state: every variable collection `model.init` returns besides
'params' (e.g. 'moe_state', where loss-free balancing keeps its per-layer
bias) is non-parameter state. It lives in `TrainState.model_state`, outside
the optimizer (no gradient, no weight decay) but inside the checkpoint; the
train step lets the model update it (`mutable=`), eval reads it.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds.

  Attributes:
    step: int32 scalar, number of optimizer updates done so far.
    params: the model's param tree.
    opt_state: the optimizer state.
    model_state: the model's non-'params' variable collections,
      {collection: tree}, e.g. {'moe_state': {...}}; {} when there are none.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any = flax.struct.field(default_factory=dict)


def init_rng(seed: int) -> jax.Array:
  """The param-init key of a run: the first half of split(key(seed)).

  Args:
    seed: run seed.

  Returns:
    A typed PRNG key.
  """
  return jax.random.split(jax.random.key(seed))[0]


def _init_fn(model: nn.Module, optimizer: optax.GradientTransformation,
             input_shape: tuple[int, int]):
  """Returns rng -> TrainState initialising `model` on a [B, L] dummy."""

  def init(rng: jax.Array) -> TrainState:
    """Params from `rng` plus a fresh optimizer state, at step 0."""
    tokens = jnp.zeros(input_shape, jnp.int32)
    variables = flax.core.unfreeze(
        model.init({'params': rng}, tokens, deterministic=True))
    params = variables.pop('params')
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params),
                      model_state=variables)

  return init


def abstract_train_state(model: nn.Module,
                         optimizer: optax.GradientTransformation,
                         input_shape: tuple[int, int]) -> TrainState:
  """Shapes and dtypes of the TrainState, without allocating anything.

  Args:
    model: the flax module; `model.init(rngs, tokens [B, L])` must work.
    optimizer: the optax transformation.
    input_shape: (B, L) of the dummy init input, e.g. the training batch
      shape (B * L must be a multiple of any MoE group size).

  Returns:
    A TrainState of jax.ShapeDtypeStruct leaves.
  """
  return jax.eval_shape(_init_fn(model, optimizer, input_shape),
                        jax.random.key(0))


def train_state_initializer(model: nn.Module,
                            optimizer: optax.GradientTransformation,
                            input_shape: tuple[int, int]):
  """The jitted rng -> TrainState initialiser of a run.

  `init.eval_shape(rng)` gives the abstract state and a later `init(rng)`
  reuses that trace (one model trace instead of two).

  Args:
    model: the flax module.
    optimizer: the optax transformation.
    input_shape: (B, L) of the dummy init input.

  Returns:
    A jitted function of the init key (see `init_rng`).
  """
  return jax.jit(_init_fn(model, optimizer, input_shape))


def create_train_state(model: nn.Module,
                       optimizer: optax.GradientTransformation,
                       input_shape: tuple[int, int], seed: int,
                       initializer=None) -> TrainState:
  """Initialises params (from `init_rng(seed)`) and the optimizer state.

  Args:
    model: the flax module.
    optimizer: the optax transformation.
    input_shape: (B, L) of the dummy init input.
    seed: run seed.
    initializer: `train_state_initializer(model, optimizer, input_shape)`
      if the caller already has it.

  Returns:
    A TrainState at step 0 (model_state as `model.init` made it), committed
    to the first device.
  """
  init = initializer or train_state_initializer(model, optimizer,
                                                input_shape)
  state = init(init_rng(seed))
  # Commit to the device like restored checkpoints are, so a fresh and a
  # resumed run call the train step with identical input placements (one
  # compiled program, shared by the compilation cache).
  return jax.device_put(state, jax.devices()[0])


def tree_bytes(tree: Any) -> int:
  """Total bytes of the array (or ShapeDtypeStruct) leaves of a pytree."""
  return sum(int(x.size) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))
