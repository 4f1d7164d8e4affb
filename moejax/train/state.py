"""TrainState (step, params, opt_state, model_state) and its creation.

`abstract_train_state` traces initialisation with `jax.eval_shape`, so the
shapes (and a checkpoint restore target) are known before any parameter is
allocated; `create_train_state` then initialises for real under `jax.jit`,
and `state_from_variables` wraps params made elsewhere (an imported
checkpoint, another run's) with a fresh optimizer state at step 0.

On a device mesh (`mesh=`), every leaf is created directly with its
NamedSharding from `moejax.sharding.tree_shardings` (nothing is gathered on
one device first), and the model is traced under `jax.set_mesh(mesh)` so
its MoE layers run expert-parallel. The init key is a threefry key
(`jax.random.key`, partitionable threefry: JAX's default), whose draws do
not depend on how they are partitioned: the initial values are the same on
every mesh.

Model state: every variable collection `model.init` returns besides
'params' (e.g. 'moe_state', where loss-free balancing keeps its per-layer
bias) is non-parameter state. It lives in `TrainState.model_state`, outside
the optimizer (no gradient, no weight decay) but inside the checkpoint; the
train step lets the model update it (`mutable=`), eval reads it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from moejax import sharding


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


def in_mesh(mesh: Optional[jax.sharding.Mesh]):
  """`jax.set_mesh(mesh)`, or a no-op context for mesh=None."""
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def abstract_train_state(model: nn.Module,
                         optimizer: optax.GradientTransformation,
                         input_shape: tuple[int, int],
                         mesh: Optional[jax.sharding.Mesh] = None
                         ) -> TrainState:
  """Shapes and dtypes of the TrainState, without allocating anything.

  Args:
    model: the flax module; `model.init(rngs, tokens [B, L])` must work.
    optimizer: the optax transformation.
    input_shape: (B, L) of the dummy init input, e.g. the training batch
      shape (B * L must be a multiple of any MoE group size).
    mesh: trace under this mesh (raises the MoE layers' ValueErrors when the
      model does not fit it); the shapes do not depend on it.

  Returns:
    A TrainState of jax.ShapeDtypeStruct leaves (no shardings; see
    `sharding.abstract_with_shardings`).
  """
  with in_mesh(mesh):
    return jax.eval_shape(_init_fn(model, optimizer, input_shape),
                          jax.random.key(0))


def train_state_initializer(model: nn.Module,
                            optimizer: optax.GradientTransformation,
                            input_shape: tuple[int, int],
                            shardings: Optional[TrainState] = None):
  """The jitted rng -> TrainState initialiser of a run.

  `init.eval_shape(rng)` gives the abstract state and a later `init(rng)`
  reuses that trace (one model trace instead of two).

  Args:
    model: the flax module.
    optimizer: the optax transformation.
    input_shape: (B, L) of the dummy init input.
    shardings: a TrainState of NamedShardings (`sharding.tree_shardings`
      of the abstract state) to create the leaves with; call the
      initialiser under `jax.set_mesh` of their mesh.

  Returns:
    A jitted function of the init key (see `init_rng`).
  """
  return jax.jit(_init_fn(model, optimizer, input_shape),
                 out_shardings=shardings)


def create_train_state(model: nn.Module,
                       optimizer: optax.GradientTransformation,
                       input_shape: tuple[int, int], seed: int,
                       initializer=None,
                       mesh: Optional[jax.sharding.Mesh] = None
                       ) -> TrainState:
  """Initialises params (from `init_rng(seed)`) and the optimizer state.

  Args:
    model: the flax module.
    optimizer: the optax transformation.
    input_shape: (B, L) of the dummy init input.
    seed: run seed.
    initializer: `train_state_initializer(model, optimizer, input_shape)`
      if the caller already has it (with mesh: made with the mesh's
      shardings).
    mesh: create the state sharded over this mesh
      (`sharding.tree_shardings`); the values do not depend on it.

  Returns:
    A TrainState at step 0 (model_state as `model.init` made it), committed
    to the first device, or laid out over `mesh`.
  """
  if mesh is not None:
    if initializer is None:
      abstract = abstract_train_state(model, optimizer, input_shape, mesh)
      initializer = train_state_initializer(
          model, optimizer, input_shape,
          sharding.tree_shardings(abstract, mesh))
    with jax.set_mesh(mesh):
      return initializer(init_rng(seed))
  init = initializer or train_state_initializer(model, optimizer,
                                                input_shape)
  state = init(init_rng(seed))
  # Commit to the device like restored checkpoints are, so a fresh and a
  # resumed run call the train step with identical input placements (one
  # compiled program, shared by the compilation cache).
  return jax.device_put(state, jax.devices()[0])


def state_from_variables(params: Any, model_state: Any,
                         optimizer: optax.GradientTransformation,
                         shardings: Optional[TrainState] = None,
                         mesh: Optional[jax.sharding.Mesh] = None
                         ) -> TrainState:
  """A step-0 TrainState around given params (imported, or another run's)
  with a fresh optimizer state.

  Args:
    params: the model's param tree (placed as `shardings.params` says).
    model_state: its non-'params' collections ({} if none).
    optimizer: the optax transformation; its state comes from
      `optimizer.init(params)`.
    shardings: a TrainState of NamedShardings (`sharding.tree_shardings`);
      None: the first device.
    mesh: the mesh of `shardings` (traced under `jax.set_mesh`).

  Returns:
    TrainState(step=0, params, optimizer.init(params), model_state).
  """
  if shardings is None:
    device = jax.devices()[0]
    params, model_state = jax.device_put((params, model_state), device)
    init = jax.jit(optimizer.init)
    step = jax.device_put(jnp.zeros((), jnp.int32), device)
  else:
    init = jax.jit(optimizer.init, out_shardings=shardings.opt_state)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  with in_mesh(mesh):
    opt_state = init(params)
  return TrainState(step=step, params=params, opt_state=opt_state,
                    model_state=dict(model_state or {}))


def tree_bytes(tree: Any) -> int:
  """Total bytes of the array (or ShapeDtypeStruct) leaves of a pytree."""
  return sum(int(x.size) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))
