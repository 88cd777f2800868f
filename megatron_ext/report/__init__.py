"""What runs leave for people, and the report that gathers them.

:mod:`.run_output`: each recipe's ``summary.json``, printed table and loss plot (re-exported
here). :mod:`.config`, :mod:`.inputs`, :mod:`.sections`, :mod:`.plots` and :mod:`.render`:
``star-elastic report``, one Markdown file with PNG plots from a pipeline's run directories.
"""

from megatron_ext.report.run_output import (
    format_table,
    key_value_table,
    plot_loss_curves,
    write_summary,
)

__all__ = ["format_table", "key_value_table", "plot_loss_curves", "write_summary"]
