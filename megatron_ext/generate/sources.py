"""Where the budgets' models come from: one elastic checkpoint, or one slice per budget.

* :class:`ElasticBudgets`: the elastic model, loaded once; the controller sets a budget's
  widths (``elastic.compute``: masked, or narrow, where a small budget decodes faster) for
  as long as a decoder of that budget is in use.
* :class:`SliceBudgets`: standalone smaller models (``star-elastic slice``), one per budget.

Both hand out a fresh :class:`~megatron_ext.generate.decode.CachedDecoder` per use.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.controller import ElasticController
from megatron_ext.generate.decode import CachedDecoder
from megatron_ext.models.config import ConfigError
from megatron_ext.run_format import MODEL_CONFIG, checkpoints_dir

SOURCE_KINDS = ("auto", "elastic", "slices")


class ElasticBudgets:
    """Every budget of one elastic model: ``widths[name]`` applied through ``controller``."""

    def __init__(
        self,
        model: nn.Module,
        controller: ElasticController,
        widths: Mapping[str, Mapping[str, int]],
        mode: str = "masked",
    ) -> None:
        self.model = model.eval()
        self.controller = controller
        self.widths = {name: dict(w) for name, w in widths.items()}
        self.mode = mode

    @property
    def names(self) -> list[str]:
        """The budget names this source serves."""
        return list(self.widths)

    @contextmanager
    def decoder(self, budget: str) -> Iterator[CachedDecoder]:
        """A decoder of the elastic model at ``budget``'s widths (in ``mode``), for the block.

        In narrow mode the controller keeps each budget's narrowed weights for the block (they
        are gathered once, not at every step); its setting before the block is restored after.
        """
        if budget not in self.widths:
            raise ConfigError(f"generation: no budget {budget!r}; known: {self.names}")
        self.controller.set_gates(None)
        keep = self.controller.keep_narrow_weights
        self.controller.keep_narrow_weights = self.mode == "narrow"
        try:
            with self.controller.at(self.widths[budget], mode=self.mode):
                yield CachedDecoder(self.model)
        finally:
            self.controller.keep_narrow_weights = keep


class SliceBudgets:
    """Standalone models by budget name."""

    def __init__(self, models: Mapping[str, nn.Module]) -> None:
        self.models = {name: model.eval() for name, model in models.items()}

    @property
    def names(self) -> list[str]:
        """The budget names this source serves."""
        return list(self.models)

    @contextmanager
    def decoder(self, budget: str) -> Iterator[CachedDecoder]:
        """A decoder of ``budget``'s standalone model."""
        if budget not in self.models:
            raise ConfigError(f"generation: no slice {budget!r}; known: {self.names}")
        yield CachedDecoder(self.models[budget])


def source_kind(directory: Path, kind: str = "auto") -> str:
    """``"elastic"`` or ``"slices"``: ``kind``, or what ``directory`` holds when ``"auto"``.

    A slice run has ``slices/<budget>/``; an elastic (or importance) run has ``checkpoints/``.
    """
    if kind not in SOURCE_KINDS:
        raise ConfigError(f"source.kind: {kind!r} is not one of {SOURCE_KINDS}")
    if kind != "auto":
        return kind
    if (directory / "slices").is_dir():
        return "slices"
    if checkpoints_dir(directory).is_dir():
        return "elastic"
    raise ConfigError(
        f"source.dir: {directory} has neither checkpoints/ (an elastic run) nor slices/ "
        "(a slice run); set source.dir, or source.kind explicitly"
    )


def slice_dirs(directory: Path, budgets: Sequence[str]) -> dict[str, Path]:
    """Each budget's standalone checkpoint: ``<dir>/slices/<name>`` or ``<dir>/<name>``."""
    root = directory / "slices" if (directory / "slices").is_dir() else directory
    found = {}
    for name in budgets:
        path = root / name
        if not (path / MODEL_CONFIG).is_file():
            known = sorted(p.parent.name for p in root.glob(f"*/{MODEL_CONFIG}"))
            raise ConfigError(f"source.dir: no slice {name!r} under {root}; found {known}")
        found[name] = path
    return found


def open_budgets(
    directory: Path,
    kind: str,
    budgets: Sequence[str],
    elastic: ElasticConfig,
    pg_collection,
    backend: str = "auto",
) -> ElasticBudgets | SliceBudgets:
    """Load the models serving ``budgets`` from ``directory`` (a run dir, at TP=1).

    Elastic: the newest checkpoint, converted to elastic; each budget's widths are the
    router's final choice when the run saved one (``budget_choices.json``), else the
    ``elastic`` config's. Slices: each budget's standalone checkpoint.
    """
    from megatron_ext.elastic.budget_eval import load_choices
    from megatron_ext.elastic.convert import convert_to_elastic
    from megatron_ext.elastic.slice_run import load_source, requested_widths
    from megatron_ext.elastic.slicing import load_slice
    from megatron_ext.parallel import ParallelConfig

    if source_kind(directory, kind) == "slices":
        dirs = slice_dirs(directory, budgets)
        return SliceBudgets({name: load_slice(path, pg_collection) for name, path in dirs.items()})
    model, stripes, model_cfg = load_source(directory, pg_collection, backend)
    elastic.validate_for(model_cfg, ParallelConfig())
    every = requested_widths(elastic, model_cfg, "all", {}, load_choices(directory))
    missing = [name for name in budgets if name not in every]
    if missing:
        raise ConfigError(f"generation: budgets {missing} are not in elastic.budgets {list(every)}")
    controller = ElasticController(model_cfg, stripes=stripes, mode=elastic.compute)
    convert_to_elastic(model, controller)
    widths = {name: every[name] for name in budgets}
    return ElasticBudgets(model, controller, widths, mode=elastic.compute)
