"""Readers for the formats benchmark sets come in on disk. Each yields `BenchItem`s, and a
`ReadFailure` (with its reason) for every row it cannot use: nothing is dropped silently.

- vlmeval_tsv (MMBench-EN/CN, SEED-IMG, MMStar): VLMEvalKit's TSV, columns index, question, hint,
  A-J, answer, category, l2-category, and a base64 `image` (or the index of a row that holds it) or
  an `image_path`; rows with index >= 1e6 are CircularEval copies of question index % 1e6.
- mmlu_csv (MMLU, CMMLU, C-Eval): a CSV per subject, or a folder of them: question, A-D, answer,
  with or without a header row.
- video_mcq_json (MVBench, Video-MME): a JSON list, or a folder with one file per task; MVBench
  items {video, question, candidates, answer: the candidate's text}, Video-MME items {videoID,
  question, options: ["A. ..."], answer: a letter}.
- vqa_json (TextVQA, DocVQA, ChartQA): a JSON list or {"data": [...]}: question or query; answers,
  answer or label; image, imgname, image_path, or image_id (+ options.image_ext); an optional audio
  (a spoken question).
- ocrbench_json (OCRBench): {image_path, question, answers, type, dataset_name}.
- asr_manifest (Fleurs, LibriSpeech, WenetSpeech): JSONL {audio_filepath or audio, text}; a Kaldi
  folder (wav.scp + text); a LibriSpeech folder (*.trans.txt next to the .flac files); a Fleurs TSV
  (id, file, raw transcription, transcription, ...; audio in audio/<split>/).
- covost2_tsv (CoVoST-2): path, sentence, translation, client_id; audio in options.audio_dir
  (default clips/).

Relative media paths resolve against the data file's folder joined with the reader's media option
(`image_dir`, `video_dir`, `audio_dir`).
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from model.config import BenchmarkConfig
from model.eval.items import BenchItem, ReadFailure

LETTERS = "ABCDEFGHIJ"
CIRCULAR_STRIDE = 1_000_000  # VLMEvalKit: a CircularEval copy of question i has index i + k * 1e6
Row = BenchItem | ReadFailure
csv.field_size_limit(sys.maxsize)  # base64 images are long fields


@dataclass
class BenchData:
    items: list[BenchItem]
    failures: list[ReadFailure]
    files: list[Path] = field(default_factory=list)  # the index files read (the data hash covers them)

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        root = min((f.parent for f in self.files), key=lambda p: len(p.parts), default=Path())
        for f in sorted(self.files):
            h.update(str(f.relative_to(root) if f.is_relative_to(root) else f.name).encode() + b"\0")
            h.update(f.read_bytes())
        return h.hexdigest()


def read_benchmark(spec: BenchmarkConfig, path: Path) -> BenchData:
    """Every item (or failure) of the benchmark at `path` (a local file or folder)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"benchmark data {path} does not exist")
    files: list[Path] = []
    rows = list(READERS[spec.reader](path, spec, files))
    items = [r for r in rows if isinstance(r, BenchItem)]
    for item in items:
        item.lang = item.lang or spec.lang
    return BenchData(items, [r for r in rows if isinstance(r, ReadFailure)], files)


def _media(base: Path, option: str | None, name: str) -> Path:
    p = Path(name)
    return p if p.is_absolute() else base / (option or "") / p


def _missing(item: BenchItem) -> ReadFailure | BenchItem:
    """The item, or a failure naming its first media file that does not exist."""
    for src in (*item.images, *item.videos, *item.audios):
        if isinstance(src, Path) and not src.is_file():
            return ReadFailure(item.id, f"media not found: {src}")
    return item


def _text(v: object) -> str:
    s = "" if v is None else str(v).strip()
    return "" if s.lower() == "nan" else s


# ----------------------------------------------------------------------------- VLMEvalKit TSV


def read_vlmeval_tsv(path: Path, spec: BenchmarkConfig, files: list[Path]) -> Iterator[Row]:
    files.append(path)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    images = {_text(r.get("index")): _text(r.get("image")) for r in rows}
    circular_copies = any(_text(r.get("index")).isdigit() and int(r["index"]) >= CIRCULAR_STRIDE for r in rows)
    for n, row in enumerate(rows, start=2):
        index = _text(row.get("index")) or f"row{n}"
        group = str(int(index) % CIRCULAR_STRIDE) if index.isdigit() else index
        if circular_copies and not spec.circular and group != index:
            continue  # vanilla evaluation scores the original questions only
        choices = {k: _text(row.get(k)) for k in LETTERS if _text(row.get(k))}
        answer = _text(row.get("answer"))
        if not answer:
            yield ReadFailure(index, f"line {n}: no answer key")
            continue
        item = BenchItem(index, _text(row.get("question")), [answer], choices, hint=_text(row.get("hint")),
                         category={k: _text(row[k]) for k in ("category", "l2-category", "split") if _text(row.get(k))},
                         group=group if circular_copies else None)
        try:
            item.images = _tsv_images(row, images, path.parent, spec)
        except (binascii.Error, ValueError) as err:
            yield ReadFailure(index, f"line {n}: bad image: {err}")
            continue
        yield _missing(item)


def _tsv_images(row: dict, images: dict[str, str], base: Path, spec: BenchmarkConfig) -> list:
    if _text(row.get("image_path")):
        return [_media(base, spec.options.get("image_dir"), p) for p in _text(row["image_path"]).split(";")]
    data = _text(row.get("image"))
    if not data:
        return []
    if len(data) <= 64 and data in images:  # MMBench: an index of the row that carries this image
        data = images[data]
    if data.startswith("["):  # several images: a JSON list of base64 strings
        return [base64.b64decode(d, validate=True) for d in json.loads(data)]
    return [base64.b64decode(data, validate=True)]


# ------------------------------------------------------------------------------ MMLU-style CSV


def _csv_files(path: Path) -> list[Path]:
    return sorted(path.rglob("*.csv")) if path.is_dir() else [path]


def read_mmlu_csv(path: Path, spec: BenchmarkConfig, files: list[Path]) -> Iterator[Row]:
    for file in _csv_files(path):
        files.append(file)
        subject = re.sub(r"_(test|val|dev)$", "", file.stem)
        with open(file, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f))
        header = [h.strip().lower() for h in rows[0]] if rows else []
        has_header = "question" in header and "answer" in header
        cols = (header.index("question"), header.index("answer")) if has_header else (0, 5)
        # C-Eval has an id column; CMMLU's first column is pandas' unnamed index.
        id_col = header.index("id") if "id" in header else (0 if has_header and header[0] == "" else None)
        for n, row in enumerate(rows[1:] if has_header else rows, start=2 if has_header else 1):
            rid = f"{subject}-{row[id_col] if id_col is not None else n}"
            if len(row) <= max(cols[0] + 4, cols[1]):
                yield ReadFailure(rid, f"{file.name} line {n}: {len(row)} columns; expected question, A-D, answer")
                continue
            answer = row[cols[1]].strip()
            if not answer:
                yield ReadFailure(rid, f"{file.name} line {n}: no answer key (a test split without keys?)")
                continue
            choices = dict(zip("ABCD", (c.strip() for c in row[cols[0] + 1: cols[0] + 5]), strict=True))
            yield BenchItem(rid, row[cols[0]].strip(), [answer], choices, category={"subject": subject})


# ---------------------------------------------------------------------------- video MCQ (JSON)


def _json_rows(file: Path) -> list[dict]:
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    return data["data"] if isinstance(data, dict) and "data" in data else data


def _json_files(path: Path) -> list[Path]:
    return sorted([*path.glob("*.json"), *path.glob("*.jsonl")]) if path.is_dir() else [path]


def read_video_mcq_json(path: Path, spec: BenchmarkConfig, files: list[Path]) -> Iterator[Row]:
    for file in _json_files(path):
        files.append(file)
        for n, row in enumerate(_json_rows(file)):
            rid = str(row.get("question_id") or row.get("id") or f"{file.stem}-{n}")
            try:
                choices, answer = _video_choices(row)
            except ValueError as err:
                yield ReadFailure(rid, f"{file.name} item {n}: {err}")
                continue
            ext = spec.options.get("video_ext", ".mp4")
            video = row.get("video") or (row.get("videoID") and f"{row['videoID']}{ext}")
            if not video:
                yield ReadFailure(rid, f"{file.name} item {n}: no video (video or videoID)")
                continue
            category = {"task": file.stem} if path.is_dir() else {}
            category |= {k: str(row[k]) for k in ("duration", "domain", "sub_category", "task_type") if row.get(k)}
            yield _missing(BenchItem(rid, str(row.get("question", "")), [answer], choices, category=category,
                                     videos=[_media(file.parent, spec.options.get("video_dir"), video)]))


def _video_choices(row: dict) -> tuple[dict[str, str], str]:
    if "candidates" in row:  # MVBench: the key is the text of a candidate
        choices = dict(zip(LETTERS, map(str, row["candidates"]), strict=False))
        hits = [k for k, v in choices.items() if v == str(row.get("answer"))]
        if len(hits) != 1:
            raise ValueError(f"answer {row.get('answer')!r} is not one of the candidates")
        return choices, hits[0]
    if "options" in row:  # Video-MME: "A. text" options, a letter key
        choices = {}
        for opt in row["options"]:
            m = re.match(r"\s*\(?([A-J])[.):]\s*(.*)", str(opt))
            if not m:
                raise ValueError(f"option {opt!r} does not start with a letter")
            choices[m.group(1)] = m.group(2).strip()
        answer = str(row.get("answer", "")).strip()
        if answer not in choices:
            raise ValueError(f"answer {answer!r} is not one of the option letters")
        return choices, answer
    raise ValueError("no candidates (MVBench) or options (Video-MME)")


# -------------------------------------------------------------------------- VQA and OCRBench


def _answers(row: dict) -> list[str]:
    for key in ("answers", "answer", "label"):
        value = row.get(key)
        if value not in (None, "", []):
            return [str(a) for a in value] if isinstance(value, list) else [str(value)]
    return []


def read_vqa_json(path: Path, spec: BenchmarkConfig, files: list[Path]) -> Iterator[Row]:
    opts = spec.options
    for file in _json_files(path):
        files.append(file)
        for n, row in enumerate(_json_rows(file)):
            ids = (row[k] for k in ("question_id", "questionId", "id", "index") if k in row)
            rid = str(next(ids, f"{file.stem}-{n}"))
            answers = _answers(row)
            if not answers:
                yield ReadFailure(rid, f"{file.name} item {n}: no answers")
                continue
            image = next((row[k] for k in ("image", "imgname", "image_path") if row.get(k)), None)
            if image is None and row.get("image_id") is not None:
                image = f"{row['image_id']}{opts.get('image_ext', '.jpg')}"
            item = BenchItem(rid, str(row.get("question") or row.get("query") or ""), answers,
                             category={k: str(row[k]) for k in ("type", "question_type") if row.get(k)})
            if image:
                item.images = [_media(file.parent, opts.get("image_dir"), str(image))]
            if row.get("audio"):
                item.audios = [_media(file.parent, opts.get("audio_dir"), str(row["audio"]))]
            yield _missing(item)


def read_ocrbench_json(path: Path, spec: BenchmarkConfig, files: list[Path]) -> Iterator[Row]:
    files.append(path)
    for n, row in enumerate(_json_rows(path)):
        rid = str(row.get("id", n))
        answers = _answers(row)
        if not answers or not row.get("image_path"):
            yield ReadFailure(rid, f"item {n}: needs answers and image_path")
            continue
        category = {"type": str(row.get("type", "")), "dataset": str(row.get("dataset_name", ""))}
        yield _missing(BenchItem(rid, str(row.get("question", "")), answers, category=category,
                                 images=[_media(path.parent, spec.options.get("image_dir"), row["image_path"])]))


# ----------------------------------------------------------------------------------- speech


def read_asr_manifest(path: Path, spec: BenchmarkConfig, files: list[Path]) -> Iterator[Row]:
    if path.is_dir() and (path / "wav.scp").is_file():
        yield from _kaldi(path, spec, files)
    elif path.is_dir():
        yield from _librispeech(path, files)
    elif path.suffix == ".tsv":
        yield from _fleurs(path, spec, files)
    else:
        yield from _jsonl_manifest(path, spec, files)


def _asr_item(rid: str, audio: Path, text: str, lang: str | None = None) -> Row:
    if not text.strip():
        return ReadFailure(rid, "empty transcript")
    return _missing(BenchItem(rid, "", [text.strip()], audios=[audio], lang=lang))


def _jsonl_manifest(path: Path, spec: BenchmarkConfig, files: list[Path]) -> Iterator[Row]:
    files.append(path)
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        audio = next((row[k] for k in ("audio_filepath", "audio", "path", "wav") if row.get(k)), None)
        text = next((row[k] for k in ("text", "transcript", "sentence", "transcription") if k in row), None)
        rid = str(row.get("id") or row.get("utt_id") or row.get("key") or (audio and Path(audio).stem) or n)
        if audio is None or text is None:
            yield ReadFailure(rid, f"line {n}: needs audio_filepath (or audio) and text")
            continue
        yield _asr_item(rid, _media(path.parent, spec.options.get("audio_dir"), audio), str(text), row.get("lang"))


def _pairs(file: Path) -> dict[str, str]:
    out = {}
    for line in file.read_text(encoding="utf-8").splitlines():
        if line.strip():
            key, _, rest = line.strip().partition(" ")
            out[key] = rest.strip()
    return out


def _kaldi(path: Path, spec: BenchmarkConfig, files: list[Path]) -> Iterator[Row]:
    files.extend([path / "wav.scp", path / "text"])
    wavs, texts = _pairs(path / "wav.scp"), _pairs(path / "text") if (path / "text").is_file() else {}
    for utt, wav in wavs.items():
        if wav.endswith("|"):
            yield ReadFailure(utt, "wav.scp command pipes are not read; give the audio file path")
        elif utt not in texts:
            yield ReadFailure(utt, "no transcript in text")
        else:
            yield _asr_item(utt, _media(path, spec.options.get("audio_dir"), wav), texts[utt])


def _librispeech(path: Path, files: list[Path]) -> Iterator[Row]:
    transcripts = sorted(path.rglob("*.trans.txt"))
    if not transcripts:
        raise FileNotFoundError(f"{path}: no wav.scp (Kaldi) and no *.trans.txt (LibriSpeech)")
    for file in transcripts:
        files.append(file)
        for utt, text in _pairs(file).items():
            yield _asr_item(utt, file.parent / f"{utt}.flac", text)


def _fleurs(path: Path, spec: BenchmarkConfig, files: list[Path]) -> Iterator[Row]:
    files.append(path)
    audio_dir = spec.options.get("audio_dir", f"audio/{path.stem}")
    with open(path, encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if len(row) < 4:
                yield ReadFailure(f"line{n}", f"line {n}: {len(row)} columns; Fleurs has id, file, raw, transcription")
                continue
            yield _asr_item(f"{row[0]}-{Path(row[1]).stem}", _media(path.parent, audio_dir, row[1]), row[3])


def read_covost2_tsv(path: Path, spec: BenchmarkConfig, files: list[Path]) -> Iterator[Row]:
    files.append(path)
    m = re.search(r"\.([a-z]{2})_([a-zA-Z-]+)\.", path.name)
    target = spec.lang or (m.group(2).split("-")[0] if m else None)
    with open(path, encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=2):
            rid = Path(row.get("path") or f"line{n}").stem
            if not row.get("path") or not _text(row.get("translation")):
                yield ReadFailure(rid, f"line {n}: needs path and translation")
                continue
            yield _missing(BenchItem(rid, "", [_text(row["translation"])], lang=target,
                                     audios=[_media(path.parent, spec.options.get("audio_dir", "clips"), row["path"])]))


READERS: dict[str, Callable[[Path, BenchmarkConfig, list[Path]], Iterator[Row]]] = {
    "vlmeval_tsv": read_vlmeval_tsv,
    "mmlu_csv": read_mmlu_csv,
    "video_mcq_json": read_video_mcq_json,
    "vqa_json": read_vqa_json,
    "ocrbench_json": read_ocrbench_json,
    "asr_manifest": read_asr_manifest,
    "covost2_tsv": read_covost2_tsv,
}
