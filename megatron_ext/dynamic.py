"""The one class-swap machinery of the project's conversions (elastic, quantized).

A conversion swaps the class of a built megatron-core module for a generated subclass of it
whose namespace holds a mixin's methods (ModelOpt's DynamicModule idea). The mixin is a
method table, not a base: a second base would give the class another instance layout, and
CPython refuses ``__class__`` assignment across layouts (e.g. for ``TopKRouter``, an
``ABC``). Only the class changes; parameters, buffers and submodules stay, so ``state_dict``
and ``sharded_state_dict`` keep upstream's keys.

Conversions stack: a quantized linear may also be elastic. Each generated class records its
conversion's ``kind`` and the class it was made from, so :func:`conversions` reads the stack
and any package can ask :func:`is_converted` without importing the package that converted.
"""

from __future__ import annotations

from typing import Any

_SKIP = {"__slots__", "__dict__", "__weakref__", "__module__", "__qualname__", "__annotations__"}
_CLASSES: dict[tuple[type, type, str], type] = {}


def converted_class(base: type, mixin: type, kind: str, **attrs: Any) -> type:
    """``<Kind><Base>``: ``base`` with ``mixin``'s methods and ``attrs`` (created once).

    Refuses a ``base`` already converted by ``kind`` (the same conversion twice).
    """
    if kind in _kinds_of(base):
        raise TypeError(f"{base.__name__} is already {kind}")
    key = (base, mixin, kind)
    cls = _CLASSES.get(key)
    if cls is None:
        name = f"{kind.capitalize()}{base.__name__}"
        namespace: dict[str, Any] = {}
        for klass in reversed(mixin.__mro__[:-1]):  # object's attributes stay upstream's
            namespace.update({k: v for k, v in vars(klass).items() if k not in _SKIP})
        namespace.update(
            attrs,
            __module__=mixin.__module__,
            __qualname__=name,
            __slots__=(),
            dynamic_kind=kind,
            dynamic_base=base,
        )
        cls = type(name, (base,), namespace)
        _CLASSES[key] = cls
    return cls


def _kinds_of(cls: type) -> list[str]:
    kinds = []
    while "dynamic_kind" in cls.__dict__:
        kinds.append(cls.__dict__["dynamic_kind"])
        cls = cls.__dict__["dynamic_base"]
    return kinds


def conversions(module: object) -> list[str]:
    """The conversions applied to ``module``, outermost first (``[]`` for a plain module)."""
    return _kinds_of(type(module))


def is_converted(module: object, kind: str) -> bool:
    """Whether ``module``'s class carries a ``kind`` conversion anywhere in its stack."""
    return kind in conversions(module)


def is_outermost(module: object, kind: str) -> bool:
    """Whether ``kind`` is ``module``'s outermost conversion (the one that can be undone)."""
    return type(module).__dict__.get("dynamic_kind") == kind


def unconverted_class(module: object) -> type:
    """The class ``module``'s outermost conversion was made from."""
    return type(module).__dict__["dynamic_base"]
