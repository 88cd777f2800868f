"""The divisibility rules a site's axes give the config: a choice passes every rule of its axis.

:meth:`megatron_ext.elastic.config.ElasticConfig.validate_for` applies them and, on a
failure, names the rule and the choices that would pass.
"""

from __future__ import annotations

from typing import NamedTuple


class Divisible(NamedTuple):
    """A choice ``c`` passes when ``c * mult % mod == 0``; ``why`` says what that means."""

    mult: int
    mod: int
    why: str


def tp_split(tp: int, what: str) -> Divisible:
    """The axis is split over ``tp`` ranks."""
    return Divisible(1, tp, f"must be divisible by parallel.tp={tp} ({what} split over TP)")


def quant_block(mult: int, tp: int, qb: int, width: str, gemm: str) -> Divisible:
    """The per-rank width along ``gemm``'s input is a multiple of the NVFP4 block ``qb``."""
    why = (
        f"gives a per-rank width {width} that is not a multiple of "
        f"elastic.quant_block={qb} (input of {gemm})"
    )
    return Divisible(mult, tp * qb, why)


def whole_groups(groups: int, name: str) -> Divisible:
    """Every group keeps the same number of whole heads."""
    return Divisible(
        1, groups, f"must be a multiple of model.{name}={groups} (equal whole heads per group)"
    )
