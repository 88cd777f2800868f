"""The registry of sites (megatron_ext.elastic.sites): one home per layer kind.

An axis registered in this file alone (a per-channel gain, its site and its elastic mixin
written here, one ``registered(...)`` line) is picked up by the config checks, the
conversion, the controller, the cost model, the reorder and the slicing, with no edit
anywhere else; without the line the same config is refused. The real sites' axes each have
one owner, and the exporters take the axis fields' names from the sites: every name is a key
of the family's ``transformers`` config class (or a field of NeMo's ``SSMConfig``), and an
export then import keeps every axis field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from megatron_ext.elastic.config import AXES, ELASTIC_AXES, ElasticConfig
from megatron_ext.elastic.controller import ElasticController
from megatron_ext.elastic.convert import convert_to_elastic, elastic_modules, export
from megatron_ext.elastic.cost import CostModel, CostSpec
from megatron_ext.elastic.layers_base import ElasticMixin
from megatron_ext.elastic.reorder import compute_permutations
from megatron_ext.elastic.sites import registry
from megatron_ext.elastic.sites.base import Axis, Site, Step
from megatron_ext.elastic.sites.divisibility import Divisible
from megatron_ext.elastic.slicing import slice_rules, sliced_config
from megatron_ext.models.config import ConfigError, HybridModelConfig
from megatron_ext.parallel import ParallelConfig

MODEL = HybridModelConfig()
GAIN = Axis("gain", "kv_channels", None, narrow=False)  # full width: model.kv_channels
FULL = MODEL.kv_channels
HALF = FULL // 2


class Gain(nn.Module):
    """A per-channel gain: the dummy layer kind."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(1.0, 2.0, width))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class ElasticGainMixin(ElasticMixin):
    """Masked compute of the gain axis: inactive channels are zero."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.elastic_upstream.forward(self, x)
        return self.elastic_ctrl.mask_last_dim(out, "gain")


class GainSite(Site):
    """Everything the gain axis needs, in one place."""

    name = "gain"
    axes = (GAIN,)
    upstream = (Gain,)

    def convert(self, module: nn.Module, ctrl, where: str) -> Iterator[Step]:
        yield module, ElasticGainMixin, {}

    def divisibility(self, axis, model, par, choices) -> list[Divisible]:
        return [Divisible(1, 4, "must be a multiple of 4")]

    def slice_rules(self, masks, model):
        return {"gain": {"weight": {0: masks["gain"]}}}

    def params(self, cost, w):
        return w["gain"]


class Layer(nn.Module):
    def __init__(self, number: int) -> None:
        super().__init__()
        self.layer_number = number
        self.gain = Gain(FULL)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.gain(hidden_states)


class Model(nn.Module):
    """Two layers of gains: as much of a model as the walks need (``decoder.layers``)."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList([Layer(1), Layer(2)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.decoder.layers:
            x = layer(x)
        return x


def _config(choices: list[int]) -> ElasticConfig:
    return ElasticConfig(axes={"gain": choices}, budgets=[{"name": "half", "target": 0.5}])


def test_an_axis_not_in_the_registry_is_refused():
    with pytest.raises(ConfigError, match="unknown axis 'gain'"):
        _config([FULL, HALF])
    assert "gain" not in ELASTIC_AXES


def test_a_registered_site_is_picked_up_by_config_convert_cost_reorder_and_slicing():
    with registry.registered(GainSite()):
        # config: known axis, the site's divisibility rule applies, the first choice is full
        _config([FULL, HALF]).validate_for(MODEL, ParallelConfig())
        with pytest.raises(ConfigError, match="must be a multiple of 4"):
            _config([FULL, HALF + 1]).validate_for(MODEL, ParallelConfig())
        with pytest.raises(ConfigError, match=f"must be the full width model.kv_channels={FULL}"):
            _config([HALF]).validate_for(MODEL, ParallelConfig())

        # convert + controller: the gain of every layer is masked at the chosen width
        ctrl = ElasticController(MODEL)
        assert ctrl.full_widths["gain"] == FULL
        model = Model()
        x = torch.ones(3, FULL)
        plain = model(x)
        convert_to_elastic(model, ctrl)
        assert {"decoder.layers.0.gain", "decoder.layers.1.gain"} <= set(elastic_modules(model))
        with ctrl.at({"gain": HALF}):
            y = model(x)
        assert torch.equal(y[:, :HALF], plain[:, :HALF])
        assert not y[:, HALF:].any()
        assert torch.equal(model(x), plain)  # full width again outside ``at``
        export(model)
        assert type(model.decoder.layers[0].gain) is Gain

        # cost: the site's term, nothing else moves
        cost = CostModel(MODEL, CostSpec("params"))
        assert cost.params({"gain": HALF}).item() == cost.full() - (FULL - HALF)

        # reorder: the default permutation ranks the channels by score
        scores = torch.arange(FULL, dtype=torch.float64)
        perms = compute_permutations({"gain": {0: scores}}, MODEL)
        assert perms["gain"][0].tolist() == list(range(FULL))[::-1]

        # slicing: the site's rule and its config field
        rules = slice_rules(ctrl, {"gain": HALF})("decoder.layers.1.gain.weight")
        assert int(rules[0].sum()) == HALF and bool(rules[0][:HALF].all())
        assert sliced_config(MODEL, {"gain": HALF}).kv_channels == HALF
    with pytest.raises(ConfigError, match="unknown axis 'gain'"):
        _config([FULL, HALF])


def test_every_axis_has_exactly_one_site_and_the_registry_lists_them_in_axis_order():
    names = [a.name for a in registry.axes()]
    assert len(names) == len(set(names))
    assert tuple(names) == ELASTIC_AXES
    assert tuple(a.name for a in registry.axes() if a.width) == AXES
    for name in names:
        assert name in {a.name for a in registry.site_of_axis(name).axes}


def _named_fields(site: Site) -> set[str]:
    """The fields a site's export names must cover: its widths' fields, the pattern for depth."""
    return {a.field if a.width else "pattern" for a in site.axes}


HF_TYPES = ["nemotron_h_moe", "nemotron_h_dense", "llama", "qwen3", "qwen3_moe"]


@pytest.mark.parametrize("tiny", HF_TYPES)
def test_every_axis_field_of_a_site_is_a_key_of_the_family_transformers_config(tiny):
    from megatron_ext.export.hf import model_config_from_hf
    from megatron_ext.export.hf.family import family_for_config
    from tests.export.hf_tiny import hf_config as tiny_hf_config

    hf = tiny_hf_config(tiny, tied=False)
    model = model_config_from_hf(hf.to_dict())
    keys = set(type(hf)().to_dict())  # the keys transformers' own config class declares
    family = family_for_config(model).name
    checked = 0
    for site in registry.sites():
        if not all(a.exists(model) for a in site.axes):
            continue  # e.g. the MoE names of a dense Llama
        names = site.hf_names.get(family, {})
        assert _named_fields(site) <= set(names), (site.name, family)
        for ours, theirs in names.items():
            assert theirs in keys, (site.name, ours, theirs, type(hf).__name__)
            checked += 1
    assert checked >= 4  # hidden size, heads, FFN or experts, depth at least


@pytest.mark.parametrize("tiny", HF_TYPES)
def test_an_hf_export_then_import_keeps_every_axis_field(tiny):
    from megatron_ext.export.hf import hf_config, model_config_from_hf
    from tests.export.hf_tiny import hf_config as tiny_hf_config

    hf = tiny_hf_config(tiny, tied=False)
    model = model_config_from_hf(hf.to_dict())
    if model.has("E"):  # 6 experts, not the tiny models' 4 = attention heads
        model = dataclasses.replace(model, num_experts=6)
    fields = sorted({f for site in registry.sites() for f in _named_fields(site)})
    # the widths differ from each other, so two swapped keys change the result
    widths = [a.full(model) for a in registry.axes() if a.width and a.exists(model)]
    assert len(set(widths)) == len(widths), widths
    # through transformers' own config class: what it keeps of the written config.json
    written = type(hf)(**hf_config(model)).to_dict()
    back = model_config_from_hf(written)
    for f in fields:
        assert getattr(back, f) == getattr(model, f), f


def test_every_nemo_name_is_a_transformer_config_field_or_a_mamba_model_argument():
    import inspect

    from megatron.core.models.mamba.mamba_model import MambaModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    # NeMo's SSMConfig is megatron's TransformerConfig plus MambaModel's arguments
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    known |= set(inspect.signature(MambaModel.__init__).parameters)
    for site in registry.sites():
        assert _named_fields(site) <= set(site.nemo_names), site.name
        for ours, theirs in site.nemo_names.items():
            assert theirs in known, (site.name, ours, theirs)


@pytest.mark.parametrize("pattern", ["M*-E", "M*-", "*E*E"])
def test_a_nemo_export_then_import_keeps_every_axis_field(pattern):
    from types import SimpleNamespace

    from megatron_ext.export.nemo import model_config_from_nemo, nemo_config_kwargs

    # widths that differ from each other, so two swapped names change the result
    model = HybridModelConfig(pattern=pattern, num_experts=4, moe_ffn_hidden_size=48)
    kwargs = nemo_config_kwargs(model, model.vocab_size)
    back = model_config_from_nemo(SimpleNamespace(**kwargs), model.vocab_size)
    for site in registry.sites():
        if all(a.exists(model) for a in site.axes):
            for field in _named_fields(site):
                assert getattr(back, field) == getattr(model, field), (site.name, field)


def test_an_axis_field_a_site_names_is_written_and_read_by_the_hf_exporter():
    from megatron_ext.export.hf import hf_config, model_config_from_hf

    class BaseSite(Site):  # a dummy axis over a field no family writes: the RoPE base
        name = "base"
        axes = (Axis("base", "rotary_base", None, narrow=False),)
        hf_names = {"nemotron_h": {"rotary_base": "rope_base"}}

    model = HybridModelConfig(position_embedding_type="none")  # a Nemotron-H model
    assert "rope_base" not in hf_config(model)
    with registry.registered(BaseSite()):
        written = hf_config(model)
        assert written["rope_base"] == model.rotary_base
        written["rope_base"] = 2 * model.rotary_base
        assert model_config_from_hf(written).rotary_base == 2 * model.rotary_base


def test_two_sites_naming_one_field_differently_are_refused():
    class Clash(GainSite):
        hf_names = {"nemotron_h": {"hidden_size": "d_model"}}

    with registry.registered(Clash()), pytest.raises(ValueError, match="model.hidden_size"):
        registry.hf_names("nemotron_h")
