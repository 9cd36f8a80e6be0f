"""Self-contained HTML evaluation report: before/after tables, per-task breakdown, worst examples
and matplotlib plots embedded as base64 PNG.

One file, no scripts, no external links: inline CSS and `data:` images render the same in the
KFP UI's HTML viewer (a sandboxed iframe) and as an MLflow artifact.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path

from model.eval.metrics import higher_is_better

_MAX_TEXT = 600  # characters of a prompt/prediction shown; longer ones are cut with a note

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 24px;
       color: #1f2328; background: #fff; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.good { color: #1a7f37; font-weight: 600; } .bad { color: #cf222e; font-weight: 600; }
.flat { color: #57606a; }
td.text { white-space: pre-wrap; word-break: break-word; max-width: 420px; font-family: ui-monospace,
          SFMono-Regular, Menlo, monospace; font-size: 12px; }
img { max-width: 100%; height: auto; border: 1px solid #d0d7de; margin: 6px 0; }
.note { color: #57606a; font-size: 12px; }
"""


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.4g}"


def _delta_cell(metric: str, before: float | None, after: float | None) -> str:
    if before is None or after is None or math.isnan(before) or math.isnan(after):
        return '<td class="num flat">—</td>'
    delta = after - before
    better = delta > 0 if higher_is_better(metric) else delta < 0
    cls = "flat" if delta == 0 else ("good" if better else "bad")
    return f'<td class="num {cls}">{delta:+.4g}</td>'


def _summary_table(before: Mapping[str, float] | None, after: Mapping[str, float]) -> str:
    names = list(dict.fromkeys([*after, *(before or {})]))
    rows = []
    for name in names:
        b = before.get(name) if before else None
        a = after.get(name)
        arrow = "↑" if higher_is_better(name) else "↓"
        rows.append(
            f"<tr><td>{escape(name)} <span class='note'>{arrow}</span></td>"
            f'<td class="num">{_fmt(b)}</td><td class="num">{_fmt(a)}</td>{_delta_cell(name, b, a)}</tr>'
        )
    head = "<tr><th>metric</th><th>before</th><th>after</th><th>Δ</th></tr>"
    return f'<table class="summary">{head}{"".join(rows)}</table>'


def _per_task_table(
    per_task: Mapping[str, Mapping[str, float]], before: Mapping[str, Mapping[str, float]] | None
) -> str:
    metrics = list(dict.fromkeys(m for scores in per_task.values() for m in scores))
    delta_th = "<th>Δ</th>" if before is not None else ""
    head = "<tr><th>task</th>" + "".join(f"<th>{escape(m)}</th>{delta_th}" for m in metrics) + "</tr>"
    rows = []
    for task, scores in per_task.items():
        cells = ""
        for m in metrics:
            a = scores.get(m)
            cells += f'<td class="num">{_fmt(a)}</td>'
            if before is not None:
                cells += _delta_cell(m, before.get(task, {}).get(m), a)
        rows.append(f"<tr><td>{escape(task)}</td>{cells}</tr>")
    return f'<table class="per-task">{head}{"".join(rows)}</table>'


def _clip(text: str) -> str:
    if len(text) <= _MAX_TEXT:
        return escape(text)
    return escape(text[:_MAX_TEXT]) + f'<span class="note"> … ({len(text) - _MAX_TEXT} more chars)</span>'


def _examples_table(examples: Sequence[Mapping]) -> str:
    head = "<tr><th>task</th><th>score</th><th>prompt</th><th>prediction</th><th>reference</th></tr>"
    rows = [
        f"<tr><td>{escape(str(ex.get('task', '')))}</td>"
        f'<td class="num">{_fmt(ex.get("score"))}</td>'
        f'<td class="text">{_clip(str(ex.get("prompt", "")))}</td>'
        f'<td class="text">{_clip(str(ex.get("prediction", "")))}</td>'
        f'<td class="text">{_clip(str(ex.get("reference", "")))}</td></tr>'
        for ex in examples
    ]
    return f'<table class="examples">{head}{"".join(rows)}</table>'


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _metrics_chart(before: Mapping[str, float] | None, after: Mapping[str, float]) -> str:
    """One small panel per metric: metrics live on different scales (accuracy 0-1, BLEU 0-100)."""
    # matplotlib.figure.Figure renders with Agg and never touches pyplot's global state or a GUI
    from matplotlib.figure import Figure

    names = [n for n in after if isinstance(after[n], int | float)]
    rows, cols = _grid(len(names))
    fig = Figure(figsize=(2.6 * cols, 2.4 * rows))
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        labels, values, colors = [], [], []
        if before is not None and name in before:
            labels.append("before")
            values.append(before[name])
            colors.append("#8c959f")
        labels.append("after")
        values.append(after[name])
        colors.append("#0969da")
        bars = ax.bar(labels, values, color=colors)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(f"{name} ({'↑' if higher_is_better(name) else '↓'})", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.margins(y=0.2)
    fig.tight_layout()
    return _png(fig)


def _loss_chart(loss_curves: Mapping[str, Sequence[float]]) -> str:
    from matplotlib.figure import Figure

    stages = [s for s, v in loss_curves.items() if len(v)]
    rows, cols = _grid(len(stages), max_cols=3)
    fig = Figure(figsize=(3.6 * cols, 2.6 * rows))
    for i, stage in enumerate(stages):
        ax = fig.add_subplot(rows, cols, i + 1)
        values = list(loss_curves[stage])
        ax.plot(range(1, len(values) + 1), values, linewidth=1.2, color="#0969da")
        ax.set_title(stage, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def html_report(
    title: str,
    metrics_before: dict[str, float] | None,
    metrics_after: dict[str, float],
    per_task: dict[str, dict[str, float]],
    examples: list[dict],
    loss_curves: dict[str, list[float]] | None = None,
    *,
    per_task_before: dict[str, dict[str, float]] | None = None,
    meta: dict[str, str] | None = None,
) -> str:
    """The report as one HTML string.

    metrics_before/after: overall metrics (before None for a first model); per_task: task ->
    metric -> value (per_task_before adds a Δ column per metric); examples: dicts {task, prompt,
    prediction, reference, score} shown in the given order (see `model.eval.metrics.worst_examples`);
    loss_curves: stage -> loss per step; meta: key/value facts shown under the title (model
    version, run id, ...). Every piece of text from data is HTML-escaped.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
    ]
    if meta:
        rows = "".join(
            f"<tr><th>{escape(str(k))}</th><td>{escape(str(v))}</td></tr>" for k, v in meta.items()
        )
        parts.append(f'<table class="meta">{rows}</table>')

    parts.append("<h2>Overall metrics</h2>")
    if metrics_after:
        parts.append(_summary_table(metrics_before, metrics_after))
        parts.append(
            f'<img alt="metrics before and after" src="data:image/png;base64,'
            f'{_metrics_chart(metrics_before, metrics_after)}">'
        )
        parts.append('<p class="note">↑ higher is better, ↓ lower is better; Δ = after − before.</p>')
    else:
        parts.append('<p class="note">No metrics.</p>')

    if per_task:
        parts.append("<h2>Per task</h2>")
        parts.append(_per_task_table(per_task, per_task_before))

    if loss_curves and any(len(v) for v in loss_curves.values()):
        parts.append("<h2>Training loss</h2>")
        parts.append(f'<img alt="loss curves" src="data:image/png;base64,{_loss_chart(loss_curves)}">')

    parts.append("<h2>Worst examples</h2>")
    parts.append(_examples_table(examples) if examples else '<p class="note">No examples.</p>')
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, html: str) -> Path:
    """Write the report (UTF-8), creating parent folders; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    return out
