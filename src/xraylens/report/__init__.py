"""One self-contained HTML report per run (`xraylens report`): settings, data, training curves,
metrics with their plots, CAM grids and localisation tables, read from the run folder's files."""

from xraylens.report.build import build_report, render_report, report_sections

__all__ = ["build_report", "render_report", "report_sections"]
