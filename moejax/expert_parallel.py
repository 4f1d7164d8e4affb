"""Expert parallelism: ExpertBank's experts over the 'expert' mesh axis,
with an all_to_all of the expert buffers (explicit `jax.shard_map`).

Axis letters: G groups, E experts, C capacity, D model width, F expert
hidden width, N rows of one expert (groups x slots), R devices per expert.
Mesh axis sizes: Pd = 'data', Pe = 'expert', Pm = 'model'. The mesh, its
checks and the layouts are in `moejax.sharding`, which re-exports the
three names of this module (`sharding.expert_parallel_ffn` etc.).

Under `jax.set_mesh(mesh)`, a mesh with an 'expert'
axis and more than one device, `ExpertBank` calls `expert_parallel_ffn`
instead of its plain einsums. Inside `jax.shard_map`, each device holds the
buffers of its own groups, [G/(Pd*Pe), E, C, D]; an all_to_all over
'expert' gives it the slots of its own experts from all its 'expert' peers,
it runs them with its own weight shard (F split over 'model', a psum over
'model' after `wo`; LoRA adapters split like their kernels, see
`expert_parallel_ffn`), and the inverse all_to_all sends the results back.

  Pe <= E (E % Pe == 0): device x owns experts [x*E/Pe, (x+1)*E/Pe); the
    expert weights are sharded over 'expert'.
  Pe > E (Pe % E == 0): each expert has R = Pe/E replicas. C is padded to
    a multiple of R (zero slots, sliced off after) and split in R chunks;
    device x computes chunk x % R of expert x // R. The expert weights are
    replicated over 'expert' (E is smaller than the axis), each device
    slices its expert, and shard_map's transpose sums their gradients.
Every slot is computed once, with the same weights: results equal the
single-device ones up to float summation order.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import ffn_math
from moejax import sharding


def expert_parallel_mesh() -> Optional[jax.sharding.AbstractMesh]:
  """The context mesh when ExpertBank should run expert-parallel, else None.

  Returns the abstract mesh of `jax.set_mesh(...)` if it has an 'expert'
  axis, more than one device, and none of MESH_AXES is already manual (an
  enclosing shard_map).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or 'expert' not in mesh.axis_names or mesh.size == 1:
    return None
  if set(mesh.manual_axes) & set(sharding.MESH_AXES):
    return None
  return mesh


def expert_parallel_apply(expert_fn: Callable[[jax.Array, Any], jax.Array],
                          buffers: jax.Array, weights: Any, weight_specs: Any,
                          mesh: sharding.MeshLike) -> jax.Array:
  """Runs `expert_fn` on the experts' slots, each device on its own experts.

  Args:
    expert_fn: (x [E', N, D], local weights) -> [E', N, D], called inside
      shard_map on E' = max(E / Pe, 1) experts of this device (it may use
      collectives over 'model').
    buffers: [G, E, C, D] dispatched slots, G divisible by Pd * Pe.
    weights: pytree of [E, ...] per-expert arrays.
    weight_specs: pytree like `weights` of PartitionSpecs of the dims after
      E (e.g. P(None, 'model') for [E, D, F]).
    mesh: a Mesh or AbstractMesh with an 'expert' axis.

  Returns:
    [G, E, C, D]: slot (g, e, c) holds expert_fn of expert e on it.
  """
  g, e, c, d = buffers.shape
  sharding.check_moe_mesh(mesh, e, g)
  pe = sharding.axis_sizes(mesh).get('expert', 1)
  reps = max(pe // e, 1)  # devices per expert (R)
  expert_axis = 'expert' if reps == 1 else None
  w_specs = jax.tree.map(lambda s: P(expert_axis, *s), weight_specs)
  c_pad = -(-c // reps) * reps  # C rounded up to a multiple of R

  def body(x, w):  # x [G/(Pd*Pe), E, C, D]
    gl = x.shape[0]
    x = jnp.pad(x, ((0, 0), (0, 0), (0, c_pad - c), (0, 0)))
    x = x.reshape(gl, e * reps, c_pad // reps, d)  # [Gl, E*R, C/R, D]
    if pe > 1:  # chunk x of axis 1 goes to device x of 'expert'
      x = jax.lax.all_to_all(x, 'expert', 1, 0, tiled=True)
    if reps > 1:  # this device computes expert x // R
      first = jax.lax.axis_index('expert') // reps
      w = jax.tree.map(
          lambda a: jax.lax.dynamic_slice_in_dim(a, first, 1, 0), w)
    rows, el, cr, _ = x.shape  # [Gl*Pe, E', C/R, D]
    y = expert_fn(x.transpose(1, 0, 2, 3).reshape(el, rows * cr, d), w)
    y = y.reshape(el, rows, cr, d).transpose(1, 0, 2, 3)  # [Gl*Pe, E', C/R, D]
    if pe > 1:  # back to the devices that own the groups
      y = jax.lax.all_to_all(y, 'expert', 0, 1, tiled=True)
    return y.reshape(gl, e, c_pad, d)[:, :, :c]  # [Gl, E, C, D]

  spec = P(sharding.batch_axes(mesh), None, None, None)
  return jax.shard_map(body, mesh=mesh, in_specs=(spec, w_specs),
                       out_specs=spec)(buffers, weights)


def _kernel_spec(w: ffn_math.Kernel, base: P, a: P, b: P):
  """The PartitionSpec of a kernel's dims after E (a LoraKernel of them)."""
  return ffn_math.LoraKernel(base, a, b) if isinstance(
      w, ffn_math.LoraKernel) else base


def expert_parallel_ffn(buffers: jax.Array, wis: Sequence[ffn_math.Kernel],
                        wo: ffn_math.Kernel, nonlinearity: Callable,
                        dtype: Any, mesh: sharding.MeshLike) -> jax.Array:
  """ExpertBank's FFN, expert-parallel over `mesh`.

  Computes act(x . wi) . wo, or act(x . wi_0) * (x . wi_1) . wo when two
  input kernels are given, in `dtype`, as ExpertBank's plain path does.
  A LoraKernel adds its adapter: an input kernel's a [E, D, r] is
  replicated over 'model' and its b [E, r, F] split on F like the kernel;
  wo's a [E, F, r] is split on F and summed over 'model' like wo, its b
  [E, r, D] replicated.

  Args:
    buffers: [G, E, C, D].
    wis: [wi] or [wi_0, wi_1], each [E, D, F] or a ffn_math.LoraKernel.
    wo: [E, F, D] or a ffn_math.LoraKernel.
    nonlinearity: the activation function.
    dtype: compute dtype.
    mesh: the mesh (see expert_parallel_apply).

  Returns:
    [G, E, C, D] in `dtype`.
  """
  f = (wo.base if isinstance(wo, ffn_math.LoraKernel) else wo).shape[1]
  pm = sharding.axis_sizes(mesh).get('model', 1)
  model = 'model' if pm > 1 and f % pm == 0 else None  # else F replicated

  def matmul_out(h, wo):  # h [E', N, F/Pm]
    if model is None:
      return jnp.einsum('ENF,EFD->END', h, wo)
    # Partial sums over this device's F slice, added in float32.
    y = jnp.einsum('ENF,EFD->END', h, wo, preferred_element_type=jnp.float32)
    return jax.lax.psum(y, 'model').astype(dtype)  # [E', N, D]

  def ffn(x, w):  # x [E', N, D]
    local_wis, local_wo = jax.tree.map(lambda a: a.astype(dtype), w)
    return ffn_math.gated_ffn(
        x.astype(dtype), local_wis, local_wo, nonlinearity,
        lambda a, wi: jnp.einsum('END,EDF->ENF', a, wi), matmul_out,
        lambda t, b: jnp.einsum('ENR,ERF->ENF', t, b))  # no collective

  specs = ([_kernel_spec(wi, P(None, model), P(None, None), P(None, model))
            for wi in wis],
           _kernel_spec(wo, P(model, None), P(model, None), P(None, None)))
  return expert_parallel_apply(ffn, buffers, (list(wis), wo), specs, mesh)
