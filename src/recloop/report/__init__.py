"""Pictures of recloop's outputs: one self-contained HTML report (``recloop report``).

:func:`write_report` reads runs, prepared datasets and the ``--json`` documents recloop
writes (:mod:`recloop.report.inputs`), computes each figure's numbers
(:mod:`recloop.report.figures`) and draws them as inline SVG (:mod:`recloop.report.svg`)
in a page with no script and no external resource (:mod:`recloop.report.build`).
"""

from recloop.report.build import ReportConfig, ReportResult, render, write_report
from recloop.report.inputs import ReportInputs, collect_inputs

__all__ = [
    "ReportConfig",
    "ReportInputs",
    "ReportResult",
    "collect_inputs",
    "render",
    "write_report",
]
