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
    prediction, reference, score} shown in the given order (worst first, as `components.steps.evaluation` picks them);
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


# ------------------------------------------------------------------------ benchmark evaluation


def display(metric: str, value: float | None) -> float | None:
    """A score in the paper's units: percent for fractions (accuracy, ANLS, WER, CER), BLEU as is."""
    if value is None:
        return None
    return value if metric == "bleu" else 100.0 * value


def _benchmark_rows(summary: Mapping) -> list[tuple]:
    """(family, name, result, before) in the paper's order of families, then by name."""
    before = (summary.get("before") or {}).get("benchmarks", {})
    rows = []
    for name, r in summary["benchmarks"].items():
        b = before.get(name)
        same = b is not None and b.get("metric") == r["metric"] and b.get("data_sha256") in (None, r["data_sha256"])
        rows.append((r["family"], name, r, b if same else None))
    order = {f: i for i, f in enumerate(FAMILIES)}
    return sorted(rows, key=lambda x: (order.get(x[0], len(order)), x[0], x[1]))


FAMILIES = ("language", "image MCQ", "image VQA", "video MCQ", "video open", "ASR", "S2TT", "demo")


def benchmark_table(summary: Mapping) -> str:
    """The paper's layout: a row per benchmark, grouped by family, scores in its units."""
    head = ("<tr><th>family</th><th>benchmark</th><th>metric</th><th>items</th><th>score</th><th>± s.e.</th>"
            "<th>before</th><th>Δ</th><th>paper</th><th>failed</th></tr>")
    rows = []
    for family, name, r, b in _benchmark_rows(summary):
        m = r["metric"]
        after, prev = display(m, r["value"]), display(m, b["value"]) if b else None
        arrow = "↑" if r.get("higher_is_better", higher_is_better(m)) else "↓"
        failed = r["failed"] + r.get("read_failures", 0)
        rows.append(
            f"<tr><td>{escape(family)}</td><td>{escape(r['title'])} <span class='note'>{escape(name)}</span></td>"
            f"<td>{escape(m)} <span class='note'>{arrow}</span></td><td class='num'>{r['items']}</td>"
            f"<td class='num'>{_fmt(after)}</td><td class='num'>{_fmt(display(m, r.get('stderr')))}</td>"
            f"<td class='num'>{_fmt(prev)}</td>{_delta_cell(m, prev, after)}"
            f"<td class='num'>{_fmt(r.get('paper'))}</td><td class='num {'bad' if failed else ''}'>{failed}</td></tr>")
    return f'<table class="benchmarks">{head}{"".join(rows)}</table>'


def _benchmark_chart(summary: Mapping) -> str:
    from matplotlib.figure import Figure

    rows = _benchmark_rows(summary)
    fig = Figure(figsize=(max(4.0, 0.9 * len(rows) + 1.5), 3.2))
    ax = fig.add_subplot(1, 1, 1)
    width, xs = 0.27, range(len(rows))
    series = [("before", "#8c959f", lambda r, b: display(r["metric"], b["value"]) if b else None),
              ("ours", "#0969da", lambda r, b: display(r["metric"], r["value"])),
              ("paper", "#bf8700", lambda r, b: r.get("paper"))]
    for k, (label, color, get) in enumerate(series):
        values = [get(r, b) for _, _, r, b in rows]
        if any(v is not None for v in values):
            ax.bar([x + (k - 1) * width for x in xs], [v or 0 for v in values], width, label=label, color=color)
    ax.set_xticks(list(xs), [f"{name}\n({r['metric']})" for _, name, r, _ in rows], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("score (paper units: %, WER %, BLEU)", fontsize=8)
    ax.legend(fontsize=8)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    return _png(fig)


def _category_tables(summary: Mapping) -> str:
    parts = []
    for r in summary["benchmarks"].values():
        for field, values in r.get("by_category", {}).items():
            cells = "".join(f"<tr><td>{escape(str(v))}</td><td class='num'>{_fmt(display(r['metric'], s))}</td></tr>"
                            for v, s in values.items())
            parts.append(f"<h3>{escape(r['title'])}: by {escape(field)}</h3><table><tr><th>{escape(field)}</th>"
                         f"<th>{escape(r['metric'])}</th></tr>{cells}</table>")
    return "".join(parts)


def _failure_list(summary: Mapping, limit: int = 20) -> str:
    parts = []
    for name, items in summary.get("failures", {}).items():
        if items:
            rows = "".join(f"<tr><td>{escape(str(f['id']))}</td><td class='text'>{escape(str(f['reason']))}</td></tr>"
                           for f in items[:limit])
            more = f"<p class='note'>… and {len(items) - limit} more</p>" if len(items) > limit else ""
            parts.append(f"<h3>{escape(name)}: {len(items)} failed</h3><table><tr><th>id</th><th>reason</th></tr>"
                         f"{rows}</table>{more}")
    return "".join(parts) or '<p class="note">Every item was answered.</p>'


def evaluation_report(title: str, summary: Mapping, loss_curves: Mapping[str, Sequence[float]] | None = None,
                      meta: Mapping[str, str] | None = None) -> str:
    """The evaluate step's report: the benchmark table in the paper's layout (with the 'before' column:
    the champion's registry scores, or the initial checkpoint on a first run), a chart, per-category
    breakdowns, the training loss, the worst examples and every failed item with its reason."""
    before = summary.get("before") or {}
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{escape(title)}</h1>",
    ]
    if meta:
        rows = "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(str(v))}</td></tr>" for k, v in meta.items())
        parts.append(f'<table class="meta">{rows}</table>')
    parts.append("<h2>Benchmarks</h2>")
    if summary["benchmarks"]:
        parts += [benchmark_table(summary),
                  f'<img alt="scores per benchmark" src="data:image/png;base64,{_benchmark_chart(summary)}">',
                  f'<p class="note">Scores in the paper\'s units (accuracy %, WER/CER %, BLEU). before = '
                  f'{escape(before.get("source", "none"))}, shown only for the same benchmark data. '
                  '± s.e.: standard error (binomial / bootstrap).</p>']
        parts += ["<h2>Overall (cross-benchmark means)</h2>", _summary_table(before.get("overall"), summary["overall"])]
    else:
        parts.append('<p class="note">No benchmarks.</p>')
    if any(r.get("by_category") for r in summary["benchmarks"].values()):
        parts += ["<h2>Categories</h2>", _category_tables(summary)]
    if loss_curves and any(len(v) for v in loss_curves.values()):
        chart = _loss_chart(loss_curves)
        parts += ["<h2>Training loss</h2>", f'<img alt="loss curves" src="data:image/png;base64,{chart}">']
    parts += ["<h2>Worst examples</h2>",
              _examples_table(summary["examples"]) if summary.get("examples") else '<p class="note">No examples.</p>',
              "<h2>Failed items</h2>", _failure_list(summary), "</body></html>"]
    return "\n".join(parts)


def text_table(summary: Mapping) -> str:
    """The benchmark table as plain text (the CLI and the demo print it)."""
    before = summary.get("before") or {}
    head = (f"{'benchmark':<26}{'metric':<19}{'items':>6}{'score':>9}{'± s.e.':>8}{'before':>9}{'paper':>8}"
            f"{'failed':>8}")
    lines = [head, "-" * len(head)]
    for _, name, r, b in _benchmark_rows(summary):
        m = r["metric"]

        def cell(v: float | None, width: int) -> str:
            return f"{v:>{width}.1f}" if v is not None else f"{'—':>{width}}"

        lines.append(f"{name:<26}{m:<19}{r['items']:>6}{cell(display(m, r['value']), 9)}"
                     f"{cell(display(m, r.get('stderr')), 8)}{cell(display(m, b['value']) if b else None, 9)}"
                     f"{cell(r.get('paper'), 8)}{r['failed'] + r.get('read_failures', 0):>8}")
    lines.append(f"(scores in the paper's units: accuracy %, WER/CER %, BLEU; before = {before.get('source', 'none')})")
    return "\n".join(lines)


def stage_report(stage: str, losses: Sequence[float], summary: Mapping[str, float]) -> str:
    """One training stage for the KFP UI: its loss curve and its summary figures."""
    rows = "".join(f"<tr><td>{escape(k)}</td><td class='num'>{_fmt(v)}</td></tr>" for k, v in summary.items())
    chart = f'<img alt="loss curve" src="data:image/png;base64,{_loss_chart({stage: losses})}">' if losses else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Stage {escape(stage)}</title>'
            f"<style>{_CSS}</style></head><body><h1>Stage {escape(stage)}</h1>{chart}"
            f"<table><tr><th>figure</th><th>value</th></tr>{rows}</table></body></html>")
