"""The omni-tiny held-out records written as benchmark sets, each in the on-disk format of the
benchmark it mimics, so the demo evaluates through the same readers, prompts and metrics as MMBench
or Fleurs (conf/benchmark/omni_tiny_*.yaml):

    benchmarks/omni_tiny_image_mcq.tsv       VLMEvalKit TSV, base64 images     (image_mcq)
    benchmarks/omni_tiny_video/<task>.json   MVBench JSON, one file per task   (video_mcq, video_color_mcq,
                                                                                video_sound_mcq: read with
                                                                                the videos' sound)
    benchmarks/omni_tiny_ocr.json            OCRBench JSON                     (ocr)
    benchmarks/omni_tiny_count.json          ChartQA-style VQA JSON            (count)
    benchmarks/omni_tiny_caption.json        VQA JSON                          (caption)
    benchmarks/omni_tiny_spoken_vqa.json     VQA JSON with a spoken question   (spoken_vqa)
    benchmarks/omni_tiny_text_qa.json        VQA JSON without media            (text_qa)
    benchmarks/omni_tiny_asr.jsonl           ASR manifest                      (asr)

Media paths are relative to benchmarks/ (the media themselves stay in media/).
"""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

from model.data.records import Record

BENCH_DIR = "benchmarks"
_OPTION = re.compile(r"^([A-D])\. (.+)$", re.MULTILINE)


def _question_and_options(user: str) -> tuple[str, dict[str, str]]:
    text = re.sub(r"<(image|video|audio)>", "", user)
    question = text.split("\n", 1)[0].strip()
    return question, dict(_OPTION.findall(text))


def _user(record: Record) -> str:
    return next(m.content for m in record.prompt_messages if m.role == "user")


def _write_json(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False))


def _image_mcq_tsv(out: Path, records: list[Record]) -> None:
    with open(out / BENCH_DIR / "omni_tiny_image_mcq.tsv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "A", "B", "C", "D", "answer", "category", "image"])
        for i, r in enumerate(records):
            question, options = _question_and_options(_user(r))
            image = base64.b64encode((out / r.images[0]).read_bytes()).decode()
            category = "color" if "color" in question else "shape"
            w.writerow([i, question, *(options[k] for k in "ABCD"), r.reference, category, image])


def _video_json(records: list[Record]) -> list[dict]:
    rows = []
    for r in records:
        question, options = _question_and_options(_user(r))
        rows.append({"video": f"../../{r.videos[0]}", "question": question, "candidates": list(options.values()),
                     "answer": options[r.reference], "question_id": r.id})
    return rows


def _vqa_json(records: list[Record]) -> list[dict]:
    rows = []
    for r in records:
        row: dict = {"question_id": r.id, "question": re.sub(r"<(image|video|audio)>", "", _user(r)).strip(),
                     "answers": [r.reference]}
        if r.images:
            row["image"] = f"../{r.images[0]}"
        if r.audios:
            row["audio"] = f"../{r.audios[0]}"
        rows.append(row)
    return rows


def write_demo_benchmarks(out_dir: Path, held_out: list[Record]) -> dict[str, int]:
    """Write the held-out records as benchmark files under out_dir/benchmarks; returns items per file."""
    out = Path(out_dir)
    (out / BENCH_DIR).mkdir(parents=True, exist_ok=True)
    by_task: dict[str, list[Record]] = {}
    for r in held_out:
        by_task.setdefault(r.task, []).append(r)
    get = by_task.get
    _image_mcq_tsv(out, get("image_mcq", []))
    for task in ("video_mcq", "video_color_mcq", "video_sound_mcq"):
        _write_json(out / BENCH_DIR / "omni_tiny_video" / f"{task}.json", _video_json(get(task, [])))
    ocr = [{"id": r.id, "image_path": f"../{r.images[0]}", "question": row["question"], "answers": r.reference,
            "type": "Digit String Recognition", "dataset_name": "omni-tiny"}
           for r, row in zip(get("ocr", []), _vqa_json(get("ocr", [])), strict=True)]
    _write_json(out / BENCH_DIR / "omni_tiny_ocr.json", ocr)
    for task in ("count", "caption", "spoken_vqa", "text_qa"):
        _write_json(out / BENCH_DIR / f"omni_tiny_{task}.json", _vqa_json(get(task, [])))
    manifest = "".join(json.dumps({"id": r.id, "audio_filepath": f"../{r.audios[0]}", "text": r.reference}) + "\n"
                       for r in get("asr", []))
    (out / BENCH_DIR / "omni_tiny_asr.jsonl").write_text(manifest)
    return {task: len(v) for task, v in sorted(by_task.items())}
