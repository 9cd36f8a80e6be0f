import base64
import re
from html.parser import HTMLParser

from components.reports.html import html_report, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Collect(HTMLParser):
    """Tags, and the text of table cells, as a browser would see them."""

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag in ("td", "th"):
            self._in_cell = True
            self.cells.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells[-1] += data


def _report(**kw):
    args = dict(
        title="Eval <omni-tiny>",
        metrics_before={"mcq_accuracy": 0.25, "wer": 0.9},
        metrics_after={"mcq_accuracy": 0.75, "wer": 0.4},
        per_task={"image_mcq": {"mcq_accuracy": 0.8}, "asr": {"wer": 0.4, "cer": 0.2}},
        examples=[
            {
                "task": "image_mcq",
                "prompt": "<image>Which? A. <b>red</b> B. blue",
                "prediction": "<script>alert('x')</script> & more",
                "reference": "B",
                "score": 0.0,
            }
        ],
        loss_curves={"image-1": [3.0, 2.0, 1.5, 1.2], "sft": [1.0, 0.8, 0.7]},
    )
    args.update(kw)
    return html_report(**args)


def _images(html):
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_report_has_tables_deltas_and_plots():
    html = _report(per_task_before={"image_mcq": {"mcq_accuracy": 0.5}}, meta={"model version": "3"})
    parser = _Collect()
    parser.feed(html)
    assert html.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in html
    assert parser.tags.count("table") == 4  # meta, summary, per task, examples
    cells = parser.cells
    # summary row: before, after, delta; accuracy up is good, WER down is good
    i = cells.index("mcq_accuracy ↑")
    assert cells[i + 1 : i + 4] == ["0.25", "0.75", "+0.5"]
    assert '<td class="num good">+0.5</td>' in html and '<td class="num good">-0.5</td>' in html
    assert "image_mcq" in cells and "asr" in cells and "cer" in cells
    images = _images(html)
    assert len(images) == 2  # metric bars + loss curves
    assert all(img.startswith(PNG_MAGIC) and len(img) > 2000 for img in images)
    # self-contained: nothing fetched from elsewhere, no scripts
    assert "http://" not in html and "https://" not in html and "<script" not in html.lower()


def test_report_escapes_text_from_data():
    html = _report()
    assert "<script>" not in html and "<b>red</b>" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in html
    assert "&lt;b&gt;red&lt;/b&gt;" in html and "Eval &lt;omni-tiny&gt;" in html
    parser = _Collect()
    parser.feed(html)
    assert "<script>alert('x')</script> & more" in parser.cells  # a browser shows the raw text


def test_report_without_before_or_loss_curves(tmp_path):
    html = _report(metrics_before=None, loss_curves=None, examples=[])
    assert len(_images(html)) == 1
    assert "No examples." in html
    parser = _Collect()
    parser.feed(html)
    i = parser.cells.index("wer ↓")
    assert parser.cells[i + 1 : i + 4] == ["—", "0.4", "—"]
    out = write_report(tmp_path / "sub" / "report.html", html)
    assert out.read_text(encoding="utf-8") == html


def test_report_truncates_long_text():
    long = "x" * 5000
    html = _report(examples=[{"task": "t", "prompt": long, "prediction": "", "reference": "", "score": 1.0}])
    assert long not in html and "more chars" in html


def _eval_summary() -> dict:
    def bench(title, family, metric, value, paper, sha="s", **extra):
        return {"title": title, "family": family, "metric": metric, "value": value, "stderr": 0.01, "n": 10,
                "items": 10, "failed": 0, "read_failures": 0, "data_sha256": sha, "paper": paper, **extra}

    return {
        "benchmarks": {
            "fleurs_zh": bench("Fleurs-zh", "ASR", "cer", 0.08, 7.0),
            "mmbench_en": bench("MMBench-EN", "image MCQ", "mcq_accuracy", 0.7, 76.2,
                                by_category={"category": {"ocr": 0.5, "<b>x</b>": 0.9}}),
            "covost2_en_zh": bench("CoVoST-2 en→zh", "S2TT", "bleu", 35.0, 40.2, sha="new", failed=2),
        },
        "overall": {"mcq_accuracy": 0.7, "cer": 0.08, "bleu": 35.0},
        "examples": [{"task": "mmbench_en", "prompt": "q", "prediction": "B", "reference": "A", "score": 0.0}],
        "failures": {"covost2_en_zh": [{"id": "c1", "reason": "bad audio: no audio stream"}]},
        "before": {"source": "champion v3", "overall": {"mcq_accuracy": 0.6},
                   "benchmarks": {"mmbench_en": {"metric": "mcq_accuracy", "value": 0.6, "data_sha256": "s"},
                                  "covost2_en_zh": {"metric": "bleu", "value": 30.0, "data_sha256": "old"}}},
    }


def test_evaluation_report_in_the_papers_layout():
    from components.reports.html import evaluation_report, text_table

    html = evaluation_report("Evaluation", _eval_summary(), {"sft": [2.0, 1.0]}, {"model": "tiny"})
    table = html[html.index('<table class="benchmarks">'):]
    table = table[: table.index("</table>")]
    # families in the paper's order, scores in its units (percent, BLEU as is), the paper's number beside
    assert table.index("MMBench-EN") < table.index("Fleurs-zh") < table.index("CoVoST-2")
    assert ">70</td>" in table and ">8</td>" in table and ">76.2</td>" in table and ">+10</td>" in table
    assert "champion v3" in html and html.count("<img") == 2  # scores chart + loss curves
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "no audio stream" in html  # categories escaped, failures listed
    text = text_table(_eval_summary())
    row = next(line for line in text.splitlines() if line.startswith("covost2_en_zh"))
    assert "35.0" in row and "30.0" not in row  # the champion scored other data: no 'before'
