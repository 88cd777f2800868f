"""The registry of sites: which layer kind owns which axis and which upstream classes.

``convert``, ``importance``, ``reorder``, ``slicing``, ``cost``, the config's checks and the
controller walk :func:`sites` in this order; a layer child goes to the first site whose
``upstream`` classes it is an instance of (so ``MoELayer`` before ``MLP``). A new axis or
layer kind is one site module and one line in :data:`_SITES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from megatron_ext.elastic.sites.attention import AttentionSite
from megatron_ext.elastic.sites.base import Axis, Site
from megatron_ext.elastic.sites.depth import DepthSite
from megatron_ext.elastic.sites.mamba import MambaSite
from megatron_ext.elastic.sites.mlp import MLPSite
from megatron_ext.elastic.sites.moe import MoESite
from megatron_ext.elastic.sites.residual import ResidualSite

_SITES: list[Site] = [
    ResidualSite(),
    AttentionSite(),
    MambaSite(),
    MLPSite(),
    MoESite(),
    DepthSite(),
]


def sites() -> tuple[Site, ...]:
    """Every registered site, in walk order."""
    return tuple(_SITES)


def axes() -> tuple[Axis, ...]:
    """Every elastic axis, in site order."""
    return tuple(axis for site in _SITES for axis in site.axes)


def axis(name: str) -> Axis:
    """The axis called ``name``; ``KeyError`` when no site owns it."""
    for a in axes():
        if a.name == name:
            return a
    raise KeyError(name)


def site_of_axis(name: str) -> Site:
    """The site that owns axis ``name``."""
    for site in _SITES:
        if any(a.name == name for a in site.axes):
            return site
    raise KeyError(name)


def site_for(module: object) -> Site | None:
    """The site that converts, scores and reorders ``module`` (a layer child), if any."""
    for site in _SITES:
        if site.upstream and isinstance(module, site.upstream):
            return site
    return None


def _names(of: Callable[[Site], Mapping[str, str]], symbols: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for site in _SITES:
        if symbols is not None and any(a.symbol not in (None, *symbols) for a in site.axes):
            continue
        for ours, theirs in of(site).items():
            if out.setdefault(ours, theirs) != theirs:
                raise ValueError(f"sites name model.{ours} both {out[ours]!r} and {theirs!r}")
    return out


def hf_names(family: str, symbols: str | None = None) -> dict[str, str]:
    """Model field -> ``config.json`` key in Hugging Face family ``family``, of every site
    (``symbols``: only the sites whose axes live in these layer symbols, or in every model)."""
    return _names(lambda site: site.hf_names.get(family, {}), symbols)


def nemo_names(symbols: str | None = None) -> dict[str, str]:
    """Model field -> NeMo ``SSMConfig`` field, of every site (``symbols`` as in
    :func:`hf_names`; a model's pattern picks the sites of its layer kinds)."""
    return _names(lambda site: site.nemo_names, symbols)


@contextmanager
def registered(site: Site, before: str | None = None) -> Iterator[Site]:
    """``site`` in the registry for the block (before the site named ``before``, else last)."""
    names = [s.name for s in _SITES]
    _SITES.insert(names.index(before) if before in names else len(_SITES), site)
    try:
        yield site
    finally:
        _SITES.remove(site)
