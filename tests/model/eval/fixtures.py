"""Small benchmark sets in each on-disk format the readers take, with real media (PNG, H.264 mp4,
WAV/FLAC/MP3), written from scratch by the tests. `write_all(root)` makes one of each and returns
{benchmark name: data path}."""

from __future__ import annotations

import base64
import csv
import io
import json
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw


def png(color: str = "red", size: int = 32) -> bytes:
    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).ellipse((4, 4, size - 4, size - 4), fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(seconds: float = 0.5, rate: int = 16000, freq: float = 440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.sin(2 * np.pi * freq * t) * 8000).astype("<i2").tobytes())
    return buf.getvalue()


def encoded_audio(path: Path, codec: str, seconds: float = 0.5, rate: int = 16000) -> Path:
    """A sine tone in `codec` (flac, mp3) through PyAV."""
    samples = (np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate) * 8000).astype(np.int16)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def mp4(path: Path, seconds: int = 2, fps: int = 4, size: int = 32) -> Path:
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(seconds * fps):
            frame = av.VideoFrame.from_image(Image.new("RGB", (size, size), (40 * i % 255, 80, 160)))
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def vlmeval_tsv(root: Path, circular_copies: bool = False) -> Path:
    """MMBench-style: q 1 carries its image, q 2 points at row 1's image by index, q 3 has no key."""
    image = base64.b64encode(png()).decode()
    rows = [["1", "What color is the circle?", "", "red", "blue", "green", "yellow", "A", "attribute", "perception",
             image],
            ["2", "Which shape is shown?", "The image shows one shape.", "square", "circle", "nan", "nan", "B",
             "shape", "perception", "1"],
            ["3", "A question without a key", "", "x", "y", "", "", "", "misc", "misc", image]]
    if circular_copies:  # VLMEvalKit's own copies of question 1 with rotated options
        rows.append([str(1_000_001), "What color is the circle?", "", "blue", "green", "yellow", "red", "D",
                     "attribute", "perception", "1"])
    path = root / "MMBench_DEV_EN.tsv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"])
        w.writerows(rows)
    return path


def mmlu_folder(root: Path) -> Path:
    """hendrycks MMLU layout: data/test/<subject>_test.csv without a header; one CMMLU-style file with one."""
    folder = root / "mmlu"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "abstract_algebra_test.csv", "w", newline="") as f:
        csv.writer(f).writerows([["What is 2 + 2?", "3", "4", "5", "6", "B"], ["Broken row", "1", "2"]])
    with open(folder / "chinese_history_test.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["", "Question", "A", "B", "C", "D", "Answer"],
                                 ["0", "秦朝的首都是哪里？", "咸阳", "长安", "洛阳", "北京", "A"]])
    return folder


def mvbench_folder(root: Path) -> Path:
    """MVBench: a JSON per task, the key is a candidate's text; videos in a separate folder."""
    folder = root / "mvbench"
    (folder / "video").mkdir(parents=True, exist_ok=True)
    mp4(folder / "video" / "clip1.mp4")
    rows = [{"video": "clip1.mp4", "question": "What changes?", "candidates": ["the colour", "the shape"],
             "answer": "the colour"},
            {"video": "missing.mp4", "question": "What moves?", "candidates": ["a", "b"], "answer": "a"},
            {"video": "clip1.mp4", "question": "Bad key", "candidates": ["a", "b"], "answer": "c"}]
    (folder / "action_sequence.json").write_text(json.dumps(rows))
    return folder


def videomme_json(root: Path) -> Path:
    folder = root / "videomme"
    (folder / "data").mkdir(parents=True, exist_ok=True)
    mp4(folder / "data" / "abc123.mp4", seconds=3)
    rows = [{"videoID": "abc123", "question_id": "001-1", "duration": "short", "task_type": "Counting Problem",
             "question": "How many colours?", "options": ["A. 1", "B. 2", "C. 3", "D. 4"], "answer": "C"}]
    path = folder / "videomme.json"
    path.write_text(json.dumps(rows))
    return path


def textvqa_json(root: Path) -> Path:
    """TextVQA val layout: {"data": [...]}, images train_images/<image_id>.jpg, ten answers."""
    folder = root / "textvqa"
    (folder / "train_images").mkdir(parents=True, exist_ok=True)
    Image.open(io.BytesIO(png())).save(folder / "train_images" / "img1.jpg")
    data = {"data": [{"question_id": 7, "question": "what colour is it?", "image_id": "img1",
                      "answers": ["red"] * 3 + ["crimson"] * 7},
                     {"question_id": 8, "question": "no answers", "image_id": "img1", "answers": []}]}
    path = folder / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps(data))
    return path


def _image_set(root: Path, folder: str, image: str, index: str, rows: object) -> Path:
    """A JSON index file next to one image (at `image`, relative to the folder)."""
    (root / folder / image).parent.mkdir(parents=True, exist_ok=True)
    (root / folder / image).write_bytes(png("black"))
    path = root / folder / index
    path.write_text(json.dumps(rows))
    return path


def docvqa_json(root: Path) -> Path:
    rows = {"data": [{"questionId": 11, "question": "What is the title?", "image": "documents/doc1.png",
                      "answers": ["Annual Report", "annual report 2019"]}]}
    return _image_set(root, "docvqa", "documents/doc1.png", "val_v1.0.json", rows)


def chartqa_json(root: Path) -> Path:
    rows = [{"imgname": "c1.png", "query": "What is the peak value?", "label": "42"}]
    return _image_set(root, "chartqa", "png/c1.png", "test_human.json", rows)


def ocrbench_json(root: Path) -> Path:
    folder = root / "ocrbench"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "images" / "w.png").write_bytes(png("gray"))
    rows = [{"dataset_name": "IIIT5K", "id": 0, "image_path": "images/w.png", "question": "What is written?",
             "answers": ["STOP"], "type": "Regular Text Recognition"},
            {"dataset_name": "HME100k", "id": 1, "image_path": "images/w.png", "question": "Write the formula",
             "answers": "x ^ { 2 }", "type": "Handwritten Mathematical Expression Recognition"}]
    path = folder / "OCRBench.json"
    path.write_text(json.dumps(rows))
    return path


def asr_jsonl(root: Path) -> Path:
    folder = root / "asr"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.wav").write_bytes(wav_bytes())
    lines = [{"audio_filepath": "a.wav", "text": "I do not know", "duration": 0.5},
             {"audio_filepath": "gone.wav", "text": "missing audio"}]
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def kaldi_folder(root: Path) -> Path:
    """WenetSpeech after Kaldi-style prep: wav.scp + text."""
    folder = root / "wenet_test_net"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u1.wav").write_bytes(wav_bytes())
    (folder / "wav.scp").write_text(f"U0001 {folder / 'u1.wav'}\nU0002 sox x.flac -t wav - |\n")
    (folder / "text").write_text("U0001 他于二零一二年来到台湾\nU0002 管道\n")
    return folder


def librispeech_folder(root: Path) -> Path:
    folder = root / "LibriSpeech" / "test-clean" / "1089" / "134686"
    folder.mkdir(parents=True, exist_ok=True)
    encoded_audio(folder / "1089-134686-0000.flac", "flac")
    (folder / "1089-134686.trans.txt").write_text("1089-134686-0000 HE HOPED THERE WOULD BE STEW FOR DINNER\n")
    return root / "LibriSpeech" / "test-clean"


def fleurs_tsv(root: Path) -> Path:
    folder = root / "fleurs" / "cmn_hans_cn"
    (folder / "audio" / "test").mkdir(parents=True, exist_ok=True)
    (folder / "audio" / "test" / "1.wav").write_bytes(wav_bytes())
    row = ["1844", "1.wav", "這是2012年的事。", "这 是 2012 年 的 事", "_", "8000", "FEMALE"]
    path = folder / "test.tsv"
    path.write_text("\t".join(row) + "\n")
    return path


def covost2_tsv(root: Path) -> Path:
    folder = root / "covost"
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    encoded_audio(folder / "clips" / "common_voice_en_1.mp3", "mp3")
    path = folder / "covost_v2.en_zh-CN.test.tsv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        w.writerow(["path", "sentence", "translation", "client_id"])
        w.writerow(["common_voice_en_1.mp3", "I like this cat", "我喜欢这只猫", "c1"])
        w.writerow(["common_voice_en_2.mp3", "No translation here", "", "c2"])
    return path


def write_all(root: Path) -> dict[str, Path]:
    """One fixture per registry benchmark: name -> its data path."""
    root.mkdir(parents=True, exist_ok=True)
    writers = {"mmbench_en": vlmeval_tsv, "mmlu": mmlu_folder, "mvbench": mvbench_folder, "videomme": videomme_json,
               "textvqa": textvqa_json, "docvqa": docvqa_json, "chartqa": chartqa_json, "ocrbench": ocrbench_json,
               "fleurs_en": asr_jsonl, "fleurs_zh": fleurs_tsv, "wenetspeech_net": kaldi_folder,
               "librispeech_clean": librispeech_folder, "covost2_en_zh": covost2_tsv}
    return {name: write(root) for name, write in writers.items()}
