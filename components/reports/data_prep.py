"""HTML report of a data-prep run: record accounting, quarantine reasons (counts as a table and a
bar chart, plus the first lines of each kind), modality and task mix, and histograms of token lengths,
audio durations and video lengths (self-contained, like the evaluation report)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from html import escape

from components.reports.html import _CSS, _clip, _grid, _png

_EXAMPLES_PER_KIND = 3


def _table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = "".join(
        "<tr>"
        + "".join(
            f"<td class='num'>{v}</td>" if isinstance(v, int | float) else f"<td>{escape(str(v))}</td>" for v in row
        )
        + "</tr>"
        for row in rows
    )
    return "<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + f"</tr>{cells}</table>"


def _histograms(series: Mapping[str, tuple[Sequence[float], str]]) -> str:
    from matplotlib.figure import Figure

    names = [n for n, (values, _) in series.items() if len(values)]
    rows, cols = _grid(len(names), max_cols=3)
    fig = Figure(figsize=(3.6 * cols, 2.6 * rows))
    for i, name in enumerate(names):
        values, unit = series[name]
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.hist(values, bins=30, color="#0969da", alpha=0.85)
        ax.set_title(f"{name} (n={len(values)})", fontsize=9)
        ax.set_xlabel(unit, fontsize=8)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    return _png(fig)


def _mix_chart(modalities: Mapping[str, Mapping[str, int]], tasks: Mapping[str, int]) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 2.8))
    for i, (title, data) in enumerate(
        (("records per modality", {k: v["records"] for k, v in modalities.items()}), ("records per task", tasks))
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        bars = ax.barh(list(data), list(data.values()), color="#0969da")
        ax.bar_label(bars, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.invert_yaxis()
    fig.tight_layout()
    return _png(fig)


def _quarantine_chart(kinds: Sequence[tuple[str, int]]) -> str:
    """Quarantined records per reason, most frequent first: the table gives the numbers, the bars
    make one dominant problem (a broken media folder, a wrong encoding) obvious at a glance."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 0.5 + 0.3 * len(kinds)))
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.barh([k for k, _ in kinds], [n for _, n in kinds], color="#cf222e")
    ax.bar_label(bars, fontsize=7)
    ax.set_title("quarantined records per reason", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.invert_yaxis()
    fig.tight_layout()
    return _png(fig)


def data_report(manifest: Mapping, quarantine: Sequence[Mapping], stats: Mapping[str, Sequence[float]]) -> str:
    """`quarantine`: the quarantine.jsonl lines; `stats`: `PrepResult.stats` (raw distributions)."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>Data prep</title><style>{_CSS}</style></head><body>", "<h1>Data prep</h1>",
             *_accounting(manifest), "<h2>Quarantine</h2>", *_quarantine(quarantine),
             "<h2>Modality and task mix</h2>", *_mix(manifest), *_lengths(stats), "</body></html>"]
    return "\n".join(parts)


def _img(alt: str, png_b64: str) -> str:
    return f'<img alt="{alt}" src="data:image/png;base64,{png_b64}">'


def _accounting(m: Mapping) -> list[str]:
    balanced = m["records_in"] == m["records_out"] + m["records_quarantined"]
    row = [m["records_in"], m["records_out"], m["records_quarantined"], m["splits"].get("train", 0),
           m["splits"].get("val", 0), len(m["shards"]), m["media"]["files"]]
    return [_table(["records in", "out", "quarantined", "train", "val", "shards", "media files"], [row]),
            f'<p class="note">in = out + quarantined: {"holds" if balanced else "BROKEN"}. '
            f'Manifest sha256 {escape(m["sha256"][:16])}…, tokenizer {escape(m["tokenizer_sha256"][:16])}…</p>']


def _quarantine(quarantine: Sequence[Mapping]) -> list[str]:
    """Counts per reason (table + chart) and the first few lines of each kind."""
    if not quarantine:
        return ['<p class="note">Nothing quarantined.</p>']
    kinds = Counter(q["kind"] for q in quarantine)
    examples: dict[str, list[Mapping]] = defaultdict(list)
    for q in quarantine:
        if len(examples[q["kind"]]) < _EXAMPLES_PER_KIND:
            examples[q["kind"]].append(q)
    rows = "".join(
        f"<tr><td>{escape(kind)}</td><td>{escape(str(q['source']))}:{q['line']}</td>"
        f"<td>{escape(str(q.get('id') or '—'))}</td><td class='text'>{_clip(q['reason'])}</td></tr>"
        for kind, _ in kinds.most_common() for q in examples[kind])
    return [_table(["reason", "records"], kinds.most_common()),
            _img("quarantine reasons", _quarantine_chart(kinds.most_common())),
            f"<table><tr><th>kind</th><th>where</th><th>id</th><th>reason</th></tr>{rows}</table>"]


def _mix(m: Mapping) -> list[str]:
    rows = [[k, v["records"], v.get("items", v["records"])] for k, v in m["modalities"].items()]
    return [_table(["modality", "records", "items"], rows),
            _img("modality and task mix", _mix_chart(m["modalities"], m["tasks"]))]


def _lengths(stats: Mapping[str, Sequence[float]]) -> list[str]:
    series = {
        "tokens (train)": (stats.get("tokens_train", []), "tokens per sample"),
        "tokens (val)": (stats.get("tokens_val", []), "tokens per sample"),
        "audio duration": (stats.get("audio_seconds", []), "seconds"),
        "video duration": (stats.get("video_seconds", []), "seconds"),
    }
    if not any(len(v) for v, _ in series.values()):
        return []
    return ["<h2>Lengths</h2>", _img("length histograms", _histograms(series))]
