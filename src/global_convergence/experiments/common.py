"""The shared helpers of the reproductions, re-exported from the modules that hold them:
:mod:`.subruns` (running sub-runs), :mod:`.standins` (data), :mod:`.ntk_tracking`, :mod:`.report`
(tables, results), :mod:`.figures` and :mod:`.recipes`. New code imports from those modules."""
from __future__ import annotations

from .subruns import (CallbackFactory, Context, Job, METRICS, RUNS_DIR, SUMMARY, SubRun,
                      base_config, cached_result, completed_summary, json_default, read_metrics,
                      run_job, run_jobs, total_steps)
from .standins import (BINARY_RULE, PAPER_NAMES, SMALL_DIGITS, SMALL_DIGITS_SIZE, STAND_INS,
                       binary_labels_file, data_arg, data_note, display, paper_row,
                       require_datasets, training_inputs)
from .ntk_tracking import (NtkTracker, full_ntk, ntk_callbacks)
from .report import (CHOICES, Report, as_dict, beside_paper, fmt_mean_std, fmt_pct, fmt_sci, group,
                     last_value, md_table, mean_std, paper_pair, run_record, settings_table,
                     test_errors, write_results)
from .figures import (COLORS, Panel, Series, loss_curve_panels, mean_curve, plot_panels)
from .recipes import (SGDRecipe, epoch_steps, image_config)

__all__ = [
    "BINARY_RULE", "CHOICES", "COLORS", "CallbackFactory", "Context", "Job", "METRICS",
    "NtkTracker", "PAPER_NAMES", "Panel", "RUNS_DIR", "Report", "SGDRecipe", "SMALL_DIGITS",
    "SMALL_DIGITS_SIZE", "STAND_INS", "SUMMARY", "Series", "SubRun", "as_dict",
    "base_config", "beside_paper", "binary_labels_file", "cached_result",
    "completed_summary", "data_arg", "data_note", "display", "epoch_steps", "fmt_mean_std",
    "fmt_pct", "fmt_sci", "full_ntk", "group", "image_config", "json_default", "last_value",
    "loss_curve_panels", "md_table", "mean_curve", "mean_std", "ntk_callbacks",
    "paper_pair", "paper_row", "plot_panels", "read_metrics", "require_datasets", "run_job",
    "run_jobs", "run_record", "settings_table", "test_errors", "total_steps",
    "training_inputs", "write_results"
]
