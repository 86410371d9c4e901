"""Reporting (imports only ``config``-free helpers): metrics.jsonl, TensorBoard, console, and plots of runs."""

from gptjax.reporting.metrics import MetricsLog, format_row, read_metrics
from gptjax.reporting.plots import plot_runs
from gptjax.reporting.reporter import Reporter

__all__ = ["MetricsLog", "Reporter", "format_row", "plot_runs", "read_metrics"]
