"""The base of every generated elastic class, and the class factory.

An elastic class is ``Elastic<Upstream>``, a direct subclass of the upstream class whose
namespace holds the methods of an elastic mixin; they call upstream's through
``self.elastic_upstream``. The mixin is a method table, not a base: a second base would give
the class another instance layout, and CPython refuses ``__class__`` assignment across
layouts (e.g. for ``TopKRouter``, an ``ABC``). Only the class of a built module changes; its
parameters, buffers and submodules stay, so ``state_dict`` and ``sharded_state_dict`` are
upstream's. Per-instance settings (the controller, the shard of each axis) are plain Python
attributes listed in ``elastic_fields``, removed again by :meth:`ElasticMixin.elastic_detach`.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

from torch import nn

from megatron_ext.elastic.controller import ElasticController

_CLASSES: dict[tuple[type, type], type] = {}
_SKIP = {"__slots__", "__dict__", "__weakref__", "__module__", "__qualname__", "__annotations__"}


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
    """Whether ``module``'s class is a generated elastic class."""
    return "elastic_upstream" in type(module).__dict__


def elastic_class(upstream: type, mixin: type) -> type:
    """The elastic subclass of ``upstream`` with ``mixin``'s methods (created once, cached)."""
    if "elastic_upstream" in upstream.__dict__:
        raise TypeError(f"{upstream.__name__} is already elastic")
    if not issubclass(mixin, ElasticMixin):
        raise TypeError(f"{mixin.__name__} is not an ElasticMixin")
    key = (upstream, mixin)
    cls = _CLASSES.get(key)
    if cls is None:
        namespace: dict[str, Any] = {}
        for klass in reversed(mixin.__mro__[:-1]):  # object's attributes stay upstream's
            namespace.update({k: v for k, v in vars(klass).items() if k not in _SKIP})
        namespace.update(
            __module__=mixin.__module__,
            __qualname__=f"Elastic{upstream.__name__}",
            __slots__=(),
            elastic_upstream=upstream,
            elastic_mixin=mixin,
        )
        cls = type(f"Elastic{upstream.__name__}", (upstream,), namespace)
        _CLASSES[key] = cls
    return cls


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
