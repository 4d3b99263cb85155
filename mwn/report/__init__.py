"""Reading run folders back: sweep tables (`python -m mwn.report`), each run's plots, and the
paper's numbers to set beside them. Reads only what runs wrote (names in mwn.run.files)."""

from mwn.report.sweep import SweepSummary, main, plot_run_or_note, write_sweep_summary

__all__ = ["SweepSummary", "main", "plot_run_or_note", "write_sweep_summary"]
