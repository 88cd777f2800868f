"""The fast slice write: run-based selection and a meta-built model holding the slice.

``slice_model`` cuts each kept run of positions with views and copies once instead of a
per-element ``index_select``; ``save_slice`` saves from a model built on the meta device with
the selected tensors assigned. Both must give exactly what the plain path gives (selection
is copying, never arithmetic: bit-identical), and the files must load as before.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.elastic.slicing import (
    _holding,
    _runs,
    _select,
    build_slice,
    load_slice,
    save_slice,
    slice_model,
)
from tests.unit.test_elastic_layers import MODEL, SMALL, build, make_world


@pytest.fixture(scope="module")
def world():
    return make_world()


def _reference(value: torch.Tensor, rules: dict[int, torch.Tensor]) -> torch.Tensor:
    for dim, mask in rules.items():
        value = value.index_select(dim, mask.nonzero().flatten())
    return value


@pytest.mark.parametrize("runs", [0, 1, 3, 100], ids=["none", "prefix", "stripes", "scattered"])
def test_run_selection_equals_index_select_in_a_new_tensor(runs):
    gen = torch.Generator().manual_seed(runs)
    value = torch.randn(120, 96, generator=gen)
    if runs == 100:  # more runs than the cut-and-copy path takes: index_select fallback
        rows = torch.rand(120, generator=gen) < 0.5
    else:
        rows = torch.zeros(120, dtype=torch.bool)
        for r in range(runs):
            rows[r * 40 : r * 40 + 7 + r] = True
    cols = torch.zeros(96, dtype=torch.bool)
    cols[:48] = True
    for rules in ({0: rows}, {1: cols}, {0: rows, 1: cols}, {}):
        got = _select("w", value, rules)
        assert torch.equal(got, _reference(value, rules))
        assert got.is_contiguous()
        assert got.untyped_storage().data_ptr() != value.untyped_storage().data_ptr()
    assert sum(n for _, n in _runs(rows)) == int(rows.sum())


def test_holding_model_keeps_the_tensors_and_megatron_parameter_attributes(world):
    model = build(world, seed=13)
    config, state = slice_model(model, SMALL, ElasticController(MODEL, StripeLayout(tp=2, ep=2)))
    held = _holding(config, state, world[1])
    built = build_slice(config, state, pg_collection=world[1])
    held_params, built_params = dict(held.named_parameters()), dict(built.named_parameters())
    assert held_params.keys() == built_params.keys()
    for name, param in held_params.items():
        assert param.data_ptr() == state[name].data_ptr(), name  # assigned, not copied
        for attr in ("tensor_model_parallel", "partition_dim", "allreduce"):
            assert getattr(param, attr, None) == getattr(built_params[name], attr, None), name
    assert sorted(held.sharded_state_dict()) == sorted(built.sharded_state_dict())


def test_saved_slice_loads_back_to_the_selected_tensors(world, tmp_path):
    model = build(world, seed=17)
    ctrl = ElasticController(MODEL, StripeLayout(tp=2, ep=2))
    _, state = slice_model(model, SMALL, ctrl)
    save_slice(model, SMALL, tmp_path / "small", world[1], controller=ctrl)
    loaded = load_slice(tmp_path / "small", world[1]).state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    assert {k for k in loaded if not k.endswith("_extra_state")} == set(tensors)
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value), key
