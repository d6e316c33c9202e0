"""Device mesh, the logical-axis rules table, shardings and multi-process start-up.

Model code names *logical* axes (``embed``, ``mlp``, ``heads``, ...); this module alone maps them to
the mesh axes ``data``, ``fsdp`` and ``tensor`` (``LOGICAL_RULES``). Batches are split over
``data`` x ``fsdp``; weights over ``fsdp`` (ZeRO-3 style) and ``tensor`` (Megatron style).

Axis types: the mesh is built with ``AxisType.Auto`` (jax 0.10 defaults to ``Explicit``). Shardings
are fixed at the jit boundary (params/optimizer/EMA from the rules, the batch on ``data``x``fsdp``)
and by the model's activation constraints (``bitgen.nn.layers.constrain``, e.g. the trunk tokens
[batch, seq, embed]), which act while ``activation_mesh(mesh)`` is in context: the train step is
traced under it (``with_activation_mesh``), and so is training-time sampling. Everything else
inside the model is left to the compiler's sharding propagation. Explicit mode would force every
ambiguous op in the model, loss and samplers to name an ``out_sharding`` and to run under
``jax.set_mesh``, coupling numerical code to the mesh — the opposite of the one-rules-table design.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from bitgen.config import ConfigError, MeshConfig
from bitgen.errors import BitgenError

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None

# Logical axis -> mesh axis (or axes). None = replicated. The batch is split over every
# data-parallel axis; weights are sharded on fsdp (their embed side) and tensor (mlp/heads side).
LOGICAL_RULES: Mapping[str, MeshAxes] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "patch_in": None,
    "content": None,
    "head_hidden": None,
    "bits": None,
    "seq": None,
    # Token vocabularies (AR embedding/LM head, e.g. GPT-2's 50257) rarely divide a mesh axis.
    "vocab": None,
}


class ShardingError(BitgenError, ValueError):
    """A parameter or batch cannot be laid out on the mesh; the message names the fix."""


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve MeshConfig sizes (one of them may be -1 = fill) against a device count."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fills = [i for i, s in enumerate(sizes) if s == -1]
    if len(fills) > 1:
        raise ConfigError("mesh: at most one of data/fsdp/tensor may be -1 (fill)")
    for name, size in zip(MESH_AXES, sizes):
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name}={size} must be a positive size or -1 (fill)")
    fixed = math.prod(s for s in sizes if s != -1)
    if fills:
        if n_devices % fixed:
            raise ConfigError(
                f"mesh: {n_devices} devices cannot be split with the fixed axes "
                f"{dict(zip(MESH_AXES, sizes))} (product {fixed} must divide {n_devices})"
            )
        sizes[fills[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ConfigError(
            f"mesh: data*fsdp*tensor = {fixed} but {n_devices} devices are available; "
            "set one axis to -1 to fill"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The one mesh factory: axes (data, fsdp, tensor), Auto axis types (see module doc)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(
    logical_axes: Sequence[str | None], rules: Mapping[str, MeshAxes] = LOGICAL_RULES
) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names.

    A mesh axis may shard only one dimension of an array, so when two dimensions map to the same
    mesh axis (e.g. a square ``(embed, embed)`` weight) the later one is replicated.
    """
    used: set[str] = set()
    out: list[MeshAxes] = []
    for name in logical_axes:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ShardingError(
                f"logical axis {name!r} has no rule; known: {sorted(rules)} "
                "(add it to bitgen.parallel.LOGICAL_RULES)"
            )
        target = rules[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def _axis_size(mesh: Mesh, entry: MeshAxes) -> int:
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    return math.prod(mesh.shape[a] for a in axes)


def checked_sharding(mesh: Mesh, shape: Sequence[int], spec: PartitionSpec, what: str) -> NamedSharding:
    """NamedSharding for ``shape``, raising ShardingError when a dimension does not divide."""
    for dim, (size, entry) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
        n = _axis_size(mesh, entry)
        if size % n:
            raise ShardingError(
                f"{what}: dimension {dim} has size {size}, not divisible by mesh axis {entry!r} "
                f"of size {n}; change the mesh (mesh.*) or the model size, or map that logical "
                "axis to None in bitgen.parallel.LOGICAL_RULES"
            )
    return NamedSharding(mesh, spec)


def tree_shardings(
    mesh: Mesh,
    abstract_tree: Any,
    logical_axes: Any,
    rules: Mapping[str, MeshAxes] = LOGICAL_RULES,
) -> Any:
    """NamedShardings for a params-like tree from its logical-axes tree (same structure)."""

    def one(path, leaf, axes):
        name = jax.tree_util.keystr(path)
        if len(axes) != len(leaf.shape):
            raise ShardingError(
                f"param {name}: logical axes {axes} do not match its rank-{len(leaf.shape)} shape "
                f"{tuple(leaf.shape)}"
            )
        return checked_sharding(mesh, leaf.shape, logical_to_spec(axes, rules), f"param {name}")

    return _map_with_axes(one, abstract_tree, logical_axes)


def _map_with_axes(fn, abstract_tree, logical_axes):
    # Logical-axes leaves are tuples, which jax treats as nodes; flatten them "up to" the params tree.
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(abstract_tree)
    axes_leaves = treedef.flatten_up_to(logical_axes)
    return jax.tree_util.tree_unflatten(
        treedef, [fn(path, leaf, tuple(axes)) for (path, leaf), axes in zip(leaves_with_path, axes_leaves)]
    )


def activation_spec(
    shape: Sequence[int],
    logical_axes: Sequence[str | None],
    mesh_axis_sizes: Mapping[str, int],
    rules: Mapping[str, MeshAxes] = LOGICAL_RULES,
) -> PartitionSpec:
    """PartitionSpec for an activation of ``shape`` named by ``logical_axes`` on a mesh.

    Unlike parameters (``checked_sharding`` refuses), an activation dimension that a mesh axis
    does not divide (e.g. a sampler batch of 1) is left replicated on that axis, and mesh axes
    the mesh lacks are dropped: a constraint is a layout hint, never an error.
    """
    if len(logical_axes) != len(shape):
        raise ShardingError(f"activation of shape {tuple(shape)} named by {len(logical_axes)} "
                            f"logical axes {tuple(logical_axes)}; name every dimension")
    out: list[MeshAxes] = []
    for size, entry in zip(shape, logical_to_spec(logical_axes, rules)):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept: list[str] = []
        for axis in axes:
            n = mesh_axis_sizes.get(axis)
            if n is not None and size % (math.prod(mesh_axis_sizes[a] for a in kept) * n) == 0:
                kept.append(axis)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None) -> Iterator[None]:
    """Context in which ``bitgen.nn.layers.constrain`` acts on ``mesh`` (None: no-op context).

    Enters the mesh's *abstract* mesh, which is allowed inside a jit trace as well as around a
    call: wrap the function being traced (see ``with_activation_mesh``) or the first call of a
    jitted one (tracing happens then; jit keys its cache on the context mesh).
    """
    if mesh is None:
        yield
        return
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        yield


def with_activation_mesh(fn: Callable[..., Any], mesh: Mesh | None) -> Callable[..., Any]:
    """``fn`` run under ``activation_mesh(mesh)``: the model's activation constraints act when it
    is traced (jit it after wrapping). ``mesh=None`` returns ``fn`` unchanged."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def under_mesh(*args, **kwargs):
        with activation_mesh(mesh):
            return fn(*args, **kwargs)

    return under_mesh


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Mapping[str, MeshAxes] = LOGICAL_RULES) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",), rules))


def data_parallel_size(mesh: Mesh, rules: Mapping[str, MeshAxes] = LOGICAL_RULES) -> int:
    return _axis_size(mesh, rules["batch"])


def optimizer_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any,
                              param_shardings: Any, mesh: Mesh) -> Any:
    """Optimizer moments follow their parameter's sharding; counters etc. are replicated."""
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, global_batch_size: int) -> dict[str, jax.Array]:
    """Assemble this process's rows into global arrays sharded on the batch axes.

    Each process passes only its own rows ``[B_global / process_count, ...]``.
    """
    sharding = batch_sharding(mesh)
    n = data_parallel_size(mesh)
    if global_batch_size % n:
        raise ShardingError(
            f"global batch {global_batch_size} is not divisible by the data-parallel mesh size "
            f"{n} (data*fsdp); change data.batch_size or mesh.data/mesh.fsdp"
        )
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size, *v.shape[1:]))
        for k, v in local.items()
    }


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Start ``jax.distributed`` when asked; return whether this is a multi-process run.

    Explicit: all of ``coordinator`` ("host:port"), ``num_processes`` and ``process_id``.
    Automatic (``auto=True`` or ``JAX_COORDINATOR_ADDRESS`` set): JAX detects the cluster
    (TPU pods, SLURM, Open MPI, ...). Otherwise nothing happens (single process).
    Must run before any other JAX call.
    """
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ConfigError(
            "multi-process start needs all of --coordinator HOST:PORT, --num-processes N and "
            "--process-id I (or none of them, to let JAX detect the cluster)"
        )
    if not (any(v is not None for v in explicit) or auto or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return False
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    # Cross-process collectives on the CPU backend need gloo (the default is in-process only);
    # the setting does not affect GPU/TPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    return jax.process_count() > 1
