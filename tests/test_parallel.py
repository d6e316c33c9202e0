"""Mesh factory, rules table and sharding derivation."""

from __future__ import annotations

import jax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitgen.config import ConfigError, MeshConfig, ModelConfig
from bitgen.parallel import (
    ShardingError,
    batch_sharding,
    initialize_distributed,
    logical_to_spec,
    make_mesh,
    mesh_shape,
    tree_shardings,
)


@given(st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 4, 8]))
@settings(max_examples=30, deadline=None)
def test_mesh_shape_fill(n_devices, fsdp, tensor):
    if n_devices % (fsdp * tensor):
        with pytest.raises(ConfigError, match="cannot be split"):
            mesh_shape(MeshConfig(data=-1, fsdp=fsdp, tensor=tensor), n_devices)
    else:
        assert mesh_shape(MeshConfig(data=-1, fsdp=fsdp, tensor=tensor), n_devices) == (
            n_devices // (fsdp * tensor), fsdp, tensor)


def test_mesh_errors_name_the_fix():
    with pytest.raises(ConfigError, match="at most one"):
        mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)
    with pytest.raises(ConfigError, match="set one axis to -1"):
        mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)


def test_mesh_is_auto_typed_with_named_axes():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert batch_sharding(mesh).spec == jax.P(("data", "fsdp"))


def test_logical_to_spec_uses_each_mesh_axis_once():
    assert logical_to_spec(("embed", "mlp")) == jax.P("fsdp", "tensor")
    assert logical_to_spec(("embed", "embed")) == jax.P("fsdp", None)
    assert logical_to_spec((None, "bits")) == jax.P(None, None)
    with pytest.raises(ShardingError, match="no rule"):
        logical_to_spec(("no_such_axis",))
    assert logical_to_spec(("vocab", "embed")) == jax.P(None, "fsdp")  # AR / GPT-2 embeddings


def test_indivisible_dimension_names_param_dim_and_axis():
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    params = {"block": {"w": jax.ShapeDtypeStruct((12, 4), "float32")}}
    with pytest.raises(ShardingError, match=r"param \['block'\]\['w'\]: dimension 0 has size 12.*'fsdp' of size 8"):
        tree_shardings(mesh, params, {"block": {"w": ("embed", None)}})


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2), (4, 1, 2)])
def test_real_model_axes_map_onto_meshes(shape):
    from bitgen.diffusion.denoiser import param_logical_axes, param_shapes

    cfg = ModelConfig(patch_size=5, seq_tokens=8, embed_dim=32, n_heads=2, n_blocks=1, dim_ff=96,
                      content_dim=8, head_hidden=16)
    mesh = make_mesh(MeshConfig(*shape))
    shardings = tree_shardings(mesh, param_shapes(cfg), param_logical_axes(cfg))
    specs = {s.spec for s in jax.tree.leaves(shardings)}
    assert any("fsdp" in str(s) for s in specs) and any("tensor" in str(s) for s in specs)


def test_partial_multiprocess_flags_are_rejected():
    with pytest.raises(ConfigError, match="--num-processes"):
        initialize_distributed("127.0.0.1:1234", None, 0)
    assert initialize_distributed() is False  # nothing requested: single process
