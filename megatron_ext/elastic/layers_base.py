"""The base of every generated elastic class, and the class factory.

An elastic class is ``Elastic<Upstream>``, made by :func:`megatron_ext.dynamic.converted_class`
(the class swap every conversion shares): a direct subclass of the upstream class whose
namespace holds the methods of an elastic mixin; they call upstream's through
``self.elastic_upstream``. Only the class of a built module changes, so ``state_dict`` and
``sharded_state_dict`` are upstream's. Per-instance settings (the controller, the shard of
each axis) are plain Python attributes listed in ``elastic_fields``, removed again by
:meth:`ElasticMixin.elastic_detach`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, cast

from torch import nn

from megatron_ext.dynamic import converted_class, is_outermost

if TYPE_CHECKING:
    from megatron_ext.elastic.controller import ElasticController


class ElasticMixin:
    """Methods shared by the elastic mixins; ``elastic_fields`` name the per-instance settings."""

    elastic_fields: ClassVar[tuple[str, ...]] = ()
    elastic_upstream: ClassVar[Any]  # the upstream class, set on each generated class
    elastic_ctrl: ElasticController

    def elastic_attach(self, ctrl: ElasticController, **fields: Any) -> None:
        """Store the controller and this module's settings (every name in ``elastic_fields``)."""
        wrong = set(fields) ^ set(self.elastic_fields)
        if wrong:
            raise TypeError(f"{type(self).__name__}: settings {sorted(wrong)} do not match")
        self.__dict__["elastic_ctrl"] = ctrl
        self.__dict__.update(fields)

    def elastic_detach(self) -> None:
        """Remove what :meth:`elastic_attach` stored."""
        for name in ("elastic_ctrl", *self.elastic_fields):
            self.__dict__.pop(name, None)


def is_elastic_module(module: object) -> bool:
    """Whether ``module``'s outermost conversion is the elastic one."""
    return is_outermost(module, "elastic")


def elastic_class(upstream: type, mixin: type) -> type:
    """The elastic subclass of ``upstream`` with ``mixin``'s methods (created once, cached)."""
    if not issubclass(mixin, ElasticMixin):
        raise TypeError(f"{mixin.__name__} is not an ElasticMixin")
    return converted_class(
        upstream, mixin, "elastic", elastic_upstream=upstream, elastic_mixin=mixin
    )


def make_elastic(
    module: nn.Module, mixin: type, ctrl: ElasticController, **fields: Any
) -> nn.Module:
    """Swap ``module``'s class for its elastic subclass in place and attach its settings."""
    module.__class__ = elastic_class(type(module), mixin)
    cast(Any, module).elastic_attach(ctrl, **fields)
    return module


def make_plain(module: nn.Module) -> nn.Module:
    """Undo :func:`make_elastic`: back to the upstream class, settings removed."""
    if is_elastic_module(module):
        cast(Any, module).elastic_detach()
        module.__class__ = cast(Any, type(module)).elastic_upstream
    return module
