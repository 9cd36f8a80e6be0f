"""HTML report of the loss-based SFT filter: per-group Gaussian fits, loss histograms with the
keep band, and the dropped samples with their losses (self-contained, like the evaluation report)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

from components.reports.html import _CSS, _clip, _grid, _png
from model.training.sft_filter import FilterResult


def _histograms(result: FilterResult, losses_by_group: Mapping[str, Sequence[float]]) -> str:
    from matplotlib.figure import Figure

    groups = [g for g in result.fits if losses_by_group.get(g)]
    rows, cols = _grid(len(groups), max_cols=3)
    fig = Figure(figsize=(3.6 * cols, 2.6 * rows))
    for i, name in enumerate(groups):
        fit, ax = result.fits[name], fig.add_subplot(rows, cols, i + 1)
        ax.hist(losses_by_group[name], bins=30, color="#0969da", alpha=0.8)
        ax.axvspan(fit.low, fit.high, color="#1a7f37", alpha=0.12, label="kept")
        ax.axvline(fit.mean, color="#1a7f37", linewidth=1)
        ax.set_title(f"{name} (n={fit.n})", fontsize=9)
        ax.set_xlabel("per-sample loss", fontsize=8)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    return _png(fig)


def filter_report(result: FilterResult, losses_by_group: Mapping[str, Sequence[float]],
                  texts: Mapping[str, str], k_sigma: float, examples: int) -> str:
    """`texts`: record id -> the sample as text (prompt and answer) for the dropped examples."""
    fit_rows = "".join(
        f"<tr><td>{escape(name)}</td><td class='num'>{f.n}</td><td class='num'>{f.mean:.4g}</td>"
        f"<td class='num'>{f.std:.4g}</td><td class='num'>{f.low:.4g} – {f.high:.4g}</td>"
        f"<td class='num'>{f.dropped_low}</td><td class='num'>{f.dropped_high}</td></tr>"
        for name, f in result.fits.items()
    )
    dropped = len(result.dropped)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>SFT loss filter</title><style>{_CSS}</style></head><body>",
        "<h1>SFT loss filter</h1>",
        f"<p>Kept <b>{result.kept}</b>, dropped <b>{dropped}</b> of {result.kept + dropped} samples: "
        f"loss outside mean ± {k_sigma:g} std of their group.</p>",
        "<h2>Fits</h2><table><tr><th>group</th><th>n</th><th>mean</th><th>std</th><th>keep band</th>"
        f"<th>dropped low</th><th>dropped high</th></tr>{fit_rows}</table>",
        f'<img alt="loss histograms" src="data:image/png;base64,{_histograms(result, losses_by_group)}">'
        if result.fits else "",
        '<p class="note">Low: the answer is trivially implied by the prompt. High: likely a wrong or '
        "mismatched pair. Groups smaller than min_group_size are kept whole.</p>",
    ]
    for side, title in (("high", "Highest-loss drops"), ("low", "Lowest-loss drops")):
        picked = sorted((d for d in result.dropped if d["side"] == side), key=lambda d: d["loss"],
                        reverse=side == "high")[:examples]
        if not picked:
            continue
        rows = "".join(
            f"<tr><td>{escape(d['task'])}</td><td class='num'>{d['loss']:.4g}</td>"
            f"<td class='text'>{_clip(texts.get(d['id'], d['id']))}</td></tr>" for d in picked
        )
        parts.append(f"<h2>{title}</h2><table><tr><th>task</th><th>loss</th><th>sample</th></tr>{rows}</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
