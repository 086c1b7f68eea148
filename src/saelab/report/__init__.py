"""Plots and Markdown reports: a run's report.md, the paper suite's report, the scaling study."""

from saelab.report.markdown import markdown_table, write_run_report
from saelab.report.paper import write_paper_report
from saelab.report.plots import density_histogram, training_curves
from saelab.report.scaling import (check_study_has_finished_runs, remove_scaling_study, sweep_difference,
                                   write_scaling_report)

__all__ = ["check_study_has_finished_runs", "density_histogram", "markdown_table", "remove_scaling_study",
           "sweep_difference", "training_curves", "write_paper_report", "write_run_report", "write_scaling_report"]
