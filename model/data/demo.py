"""Generate "omni-tiny": a small multimodal data set, in real media formats, that a ~2M-parameter
model can learn in minutes on a CPU, so evaluation visibly improves after each training stage.

Tasks (the record `task` values the stage configs select on; the held-out records are also written as
benchmark files, see `model.data.demo_bench`, scored by conf/benchmark/omni_tiny_*.yaml):
  caption          64x64 PNG/JPEG of one coloured shape                -> "a red circle"
  image_mcq        same kind of image, colour or shape question         -> option letter
  ocr              a 2-3 digit number rendered on the image (OCR-like)  -> "407"
  count            1-4 shapes, "how many"                               -> "3"
  video_mcq        4 s mp4 (H.264) of a shape moving across             -> option letter for the direction
  video_color_mcq  4 s mp4 of a shape that changes colour mid-clip,
                   colour at the start or at the end                    -> option letter
  video_sound_mcq  4 s mp4 of a moving shape with an espeak-ng number
                   muxed in as its sound track, "which number is said";
                   only the sound answers (use_audio_in_video)          -> option letter
  asr              espeak-ng speech of 1-3 digits, 16 kHz WAV           -> "three seven"
  spoken_vqa       an image + the question about it spoken by espeak-ng
                   (the paper's image-audio-text data)                  -> "red" / "circle"
  text_qa          text-only arithmetic / simple facts                  -> "7"

Speech uses several espeak-ng voices and speeds. `cfg.demo_images` is split evenly over the four
image tasks, `demo_videos` over the two silent video tasks; a quarter of `demo_audios` are spoken
questions; `demo_sound_videos` are the videos with sound.

Everything is derived from `cfg.seed`: the same seed gives byte-identical JSONL files.
Media paths in the records are relative to `out_dir` (e.g. "media/caption-0003.png").
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import wave
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from functools import lru_cache, partial
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from model.config import DataConfig
from model.data.demo_bench import write_demo_benchmarks
from model.data.records import Record
from model.media.decode import load_audio

SOURCE = "omni-tiny"
SIZE = 64
COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 200, 0)}
SHAPES = ("circle", "square", "triangle")
# A fourth, never-drawn shape so shape questions have four options like colour questions.
SHAPE_OPTIONS = (*SHAPES, "star")
BACKGROUNDS = ((255, 255, 255), (240, 240, 240), (250, 245, 230), (235, 240, 250))
DIRECTIONS = ("left", "right", "up", "down")
LETTERS = "ABCD"
INKS = ((20, 20, 20), (120, 20, 20), (20, 40, 120), (20, 90, 30))  # dark text colours for OCR images
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# espeak-ng voices that exist in Debian's package without mbrola; "+f3" etc. are voice variants.
VOICES = ("en", "en-us", "en+f3", "en-us+m3", "en-gb-scotland", "en+f4", "en-029")
SPEEDS = (140, 150, 160, 170, 180)
VIDEO_FPS, VIDEO_SECONDS = 8, 4
AUDIO_RATE = 16000
TASKS = ("caption", "image_mcq", "ocr", "count", "video_mcq", "video_color_mcq", "video_sound_mcq", "asr",
         "spoken_vqa", "text_qa")
SPOKEN_NUMBERS = DIGITS[1:5]  # the options of the sound question
SPOKEN_QUESTIONS = {"color": "what color is the shape", "shape": "what shape is it"}


def make_demo(out_dir: Path, cfg: DataConfig, progress: bool = True) -> dict[str, int]:
    """Write out_dir/train.jsonl, out_dir/val.jsonl, out_dir/media/* and the held-out set as benchmark
    files in out_dir/benchmarks/; return record counts per task, per split and in total."""
    if (cfg.demo_audios or cfg.demo_sound_videos) and shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is needed for the speech data: apt-get install -y espeak-ng")
    out_dir = Path(out_dir)
    (out_dir / "media").mkdir(parents=True, exist_ok=True)

    # Each entry builds one record's messages and media from (rng, id, out_dir).
    Builder = Callable[[random.Random, str, Path], dict]
    quarter, n_spoken = cfg.demo_images // 4, cfg.demo_audios // 4
    plan: list[tuple[str, int, Builder]] = []
    plan += [("caption", i, _caption) for i in range(cfg.demo_images - 3 * quarter)]
    plan += [("image_mcq", i, _image_mcq) for i in range(quarter)]
    plan += [("ocr", i, _ocr) for i in range(quarter)]
    plan += [("count", i, _count) for i in range(quarter)]
    plan += [("video_mcq", i, _video_mcq) for i in range(cfg.demo_videos - cfg.demo_videos // 2)]
    plan += [("video_color_mcq", i, _video_color_mcq) for i in range(cfg.demo_videos // 2)]
    plan += [("video_sound_mcq", i, _video_sound_mcq) for i in range(cfg.demo_sound_videos)]
    plan += [("spoken_vqa", i, _spoken_vqa) for i in range(n_spoken)]
    speech = _unique_speech(random.Random(f"{cfg.seed}:asr"), cfg.demo_audios - n_spoken)
    plan += [("asr", i, partial(_asr, text=t, voice=v, speed=sp)) for i, (t, v, sp) in enumerate(speech)]
    texts = _text_pool(random.Random(f"{cfg.seed}:text_qa"), cfg.demo_texts)
    plan += [("text_qa", i, partial(_text_qa, qa=qa)) for i, qa in enumerate(texts)]

    def build(item: tuple[str, int, Builder]) -> Record:
        task, i, fn = item
        rid = f"{task}-{i:04d}"
        # One RNG per record, seeded by (seed, id): results do not depend on thread scheduling.
        return Record(
            id=rid,
            task=task,
            lang="en",
            source=SOURCE,
            **fn(random.Random(f"{cfg.seed}:{rid}"), rid, out_dir),
        )

    # Threads: espeak-ng and x264 run outside the GIL, so a few workers overlap the slow parts.
    with ThreadPoolExecutor(max_workers=4) as pool:
        records = list(tqdm(pool.map(build, plan), total=len(plan), desc="omni-tiny", disable=not progress))

    val_ids = _val_ids(records, cfg.val_fraction)
    counts = {task: 0 for task in TASKS} | {"train": 0, "val": 0}
    with open(out_dir / "train.jsonl", "w") as train, open(out_dir / "val.jsonl", "w") as val:
        for rec in records:
            split = "val" if rec.id in val_ids else "train"
            (val if split == "val" else train).write(json.dumps(rec.model_dump(), ensure_ascii=False) + "\n")
            counts[rec.task] += 1
            counts[split] += 1
    counts["total"] = len(records)
    # The held-out records again, as benchmark files (the evaluate step reads these, not the val split).
    write_demo_benchmarks(out_dir, [r for r in records if r.id in val_ids])
    return counts


def _val_ids(records: list[Record], fraction: float) -> set[str]:
    """Per task, the ids with the smallest stable hash go to val: the split is reproducible,
    independent of generation order, and every task with 2+ records gets at least one val record."""
    val: set[str] = set()
    for task in TASKS:
        ids = sorted(
            (r.id for r in records if r.task == task), key=lambda s: hashlib.sha256(s.encode()).hexdigest()
        )
        n_val = round(len(ids) * fraction)
        if len(ids) >= 2:
            n_val = min(max(n_val, 1), len(ids) - 1)
        val.update(ids[:n_val])
    return val


def _options(rng: random.Random, answer: str, choices: tuple[str, ...]) -> tuple[str, str]:
    """Lettered options in a fixed order and the letter of `answer`. The order is fixed on purpose:
    a ~2M-parameter model learns "red -> A" in minutes, but not to read a shuffled option list
    (CircularEval-style rotation belongs to evaluation, not to this learnable demo set)."""
    opts = list(choices)
    lines = "\n".join(f"{letter}. {opt}" for letter, opt in zip(LETTERS, opts, strict=True))
    return lines, LETTERS[opts.index(answer)]


def _chat(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


# ---------------------------------------------------------------------------------------- images


def _draw(img: Image.Image, shape: str, color: tuple[int, int, int], cx: float, cy: float, r: float) -> None:
    d = ImageDraw.Draw(img)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=color)


def _jitter(rng: random.Random, color: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in color)  # type: ignore[return-value]


def _shape_image(rng: random.Random, rid: str, out_dir: Path, index: int) -> tuple[str, str, str]:
    """Draw one shape, save it (PNG and JPEG alternately) and return (relative path, color, shape)."""
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    img = Image.new("RGB", (SIZE, SIZE), rng.choice(BACKGROUNDS))
    r = rng.uniform(10, 18)
    _draw(
        img,
        shape,
        _jitter(rng, COLORS[color]),
        rng.uniform(r + 2, SIZE - r - 2),
        rng.uniform(r + 2, SIZE - r - 2),
        r,
    )
    ext = "png" if index % 2 == 0 else "jpg"
    rel = f"media/{rid}.{ext}"
    img.save(out_dir / rel, **({"quality": 90} if ext == "jpg" else {}))
    return rel, color, shape


def _index(rid: str) -> int:
    return int(rid.rsplit("-", 1)[1])


def _caption(rng: random.Random, rid: str, out_dir: Path) -> dict:
    rel, color, shape = _shape_image(rng, rid, out_dir, _index(rid))
    return {"messages": _chat("<image>Describe the image.", f"a {color} {shape}"), "images": [rel]}


def _image_mcq(rng: random.Random, rid: str, out_dir: Path) -> dict:
    rel, color, shape = _shape_image(rng, rid, out_dir, _index(rid))
    if rng.random() < 0.5:
        question, (lines, letter) = "What color is the shape?", _options(rng, color, tuple(COLORS))
    else:
        question, (lines, letter) = "What shape is in the image?", _options(rng, shape, SHAPE_OPTIONS)
    user = f"<image>{question}\n{lines}\nAnswer with the option's letter."
    return {"messages": _chat(user, letter), "images": [rel]}


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font (no system fonts needed), scalable when Pillow has FreeType."""
    return ImageFont.load_default(size=size)


def _ocr(rng: random.Random, rid: str, out_dir: Path) -> dict:
    """A 2-3 digit number in dark ink at a random place: text to read, as in OCR/TextVQA data."""
    number = str(rng.randint(10, 999))
    img = Image.new("RGB", (SIZE, SIZE), rng.choice(BACKGROUNDS))
    draw, font = ImageDraw.Draw(img), _font(rng.choice((18, 20, 22)))
    left, top, right, bottom = draw.textbbox((0, 0), number, font=font)
    x = rng.uniform(2, SIZE - (right - left) - 2) - left
    y = rng.uniform(2, SIZE - (bottom - top) - 2) - top
    draw.text((x, y), number, fill=rng.choice(INKS), font=font)
    rel = f"media/{rid}.png"
    img.save(out_dir / rel)
    return {"messages": _chat("<image>What number is written in the image?", number), "images": [rel]}


def _count(rng: random.Random, rid: str, out_dir: Path) -> dict:
    """1-4 shapes of one kind and colour, apart from each other: "how many"."""
    n, shape, color = rng.randint(1, 4), rng.choice(SHAPES), rng.choice(list(COLORS))
    placed: list[tuple[float, float, float]] = []
    while len(placed) < n:
        r = rng.uniform(6, 8)
        cx, cy = rng.uniform(r + 2, SIZE - r - 2), rng.uniform(r + 2, SIZE - r - 2)
        # 1.3 r bounds the triangle too; + 3 px keeps a gap, so the shapes stay countable.
        if all((cx - x) ** 2 + (cy - y) ** 2 > (1.3 * (r + pr) + 3) ** 2 for x, y, pr in placed):
            placed.append((cx, cy, r))
    img = Image.new("RGB", (SIZE, SIZE), rng.choice(BACKGROUNDS))
    for cx, cy, r in placed:
        _draw(img, shape, _jitter(rng, COLORS[color]), cx, cy, r)
    rel = f"media/{rid}.png"
    img.save(out_dir / rel)
    return {"messages": _chat("<image>How many shapes are in the image?", str(n)), "images": [rel]}


# ---------------------------------------------------------------------------------------- videos


def _video_mcq(rng: random.Random, rid: str, out_dir: Path) -> dict:
    direction, frames = _moving_shape(rng)
    rel = f"media/{rid}.mp4"
    _write_mp4(out_dir / rel, frames)
    lines, letter = _options(rng, direction, DIRECTIONS)
    user = f"<video>In which direction does the shape move?\n{lines}\nAnswer with the option's letter."
    return {"messages": _chat(user, letter), "videos": [rel]}


def _moving_shape(rng: random.Random) -> tuple[str, list[Image.Image]]:
    """(direction, frames) of a shape crossing the picture in VIDEO_SECONDS."""
    direction, color, shape = rng.choice(DIRECTIONS), rng.choice(list(COLORS)), rng.choice(SHAPES)
    background, fill = rng.choice(BACKGROUNDS), _jitter(rng, COLORS[color])
    r = rng.uniform(7, 10)
    lo, hi = r + 1, SIZE - r - 1
    across = rng.uniform(lo + 4, hi - 4)  # the fixed coordinate
    n = VIDEO_FPS * VIDEO_SECONDS
    frames = []
    for i in range(n):
        s = i / (n - 1)
        # Image coordinates: x grows to the right, y grows downwards.
        along = lo + s * (hi - lo) if direction in ("right", "down") else hi - s * (hi - lo)
        cx, cy = (along, across) if direction in ("left", "right") else (across, along)
        img = Image.new("RGB", (SIZE, SIZE), background)
        _draw(img, shape, fill, cx, cy, r)
        frames.append(img)
    return direction, frames


def _video_sound_mcq(rng: random.Random, rid: str, out_dir: Path) -> dict:
    """A moving shape (the picture says nothing about the answer) and a number spoken at a random
    moment of the clip, in the video's own sound track: a question only the sound answers."""
    _, frames = _moving_shape(rng)
    number = rng.choice(SPOKEN_NUMBERS)
    speech = load_audio(_espeak(number, rng.choice(VOICES), rng.choice(SPEEDS)), AUDIO_RATE)
    speech = speech[: AUDIO_RATE * VIDEO_SECONDS]
    sound = np.zeros(AUDIO_RATE * VIDEO_SECONDS, np.float32)
    start = rng.randint(0, sound.size - speech.size)
    sound[start : start + speech.size] = speech
    rel = f"media/{rid}.mp4"
    _write_mp4(out_dir / rel, frames, sound)
    lines, letter = _options(rng, number, SPOKEN_NUMBERS)
    user = f"<video>Which number is said in the video?\n{lines}\nAnswer with the option's letter."
    return {"messages": _chat(user, letter), "videos": [rel], "use_audio_in_video": True}


def _video_color_mcq(rng: random.Random, rid: str, out_dir: Path) -> dict:
    """A still shape that changes colour once, between 0.5 s and 2.5 s: at 1 fps the first sampled
    frame shows the start colour and the last one the end colour."""
    start, end = rng.sample(list(COLORS), 2)
    shape, background = rng.choice(SHAPES), rng.choice(BACKGROUNDS)
    fills, r = (_jitter(rng, COLORS[start]), _jitter(rng, COLORS[end])), rng.uniform(10, 14)
    cx, cy = rng.uniform(r + 2, SIZE - r - 2), rng.uniform(r + 2, SIZE - r - 2)
    change = rng.randint(VIDEO_FPS // 2 + 1, 5 * VIDEO_FPS // 2)  # the first frame in the new colour
    frames = []
    for i in range(VIDEO_FPS * VIDEO_SECONDS):
        img = Image.new("RGB", (SIZE, SIZE), background)
        _draw(img, shape, fills[i >= change], cx, cy, r)
        frames.append(img)
    rel = f"media/{rid}.mp4"
    _write_mp4(out_dir / rel, frames)
    when = rng.choice(("start", "end"))
    lines, letter = _options(rng, start if when == "start" else end, tuple(COLORS))
    user = f"<video>What color is the shape at the {when} of the video?\n{lines}\nAnswer with the option's letter."
    return {"messages": _chat(user, letter), "videos": [rel]}


def _write_mp4(path: Path, frames: list[Image.Image], sound: np.ndarray | None = None) -> None:
    """H.264 frames at VIDEO_FPS; with `sound` (mono float32 at AUDIO_RATE), an AAC track beside them."""
    with av.open(str(path), "w", format="mp4") as container:
        # No macroblock tree: with it, x264 now and then encodes the very same frames to other bytes
        # (seen in one of ~20 demo videos per run), and the demo must be a function of its seed.
        options = {"preset": "veryfast", "crf": "20", "x264-params": "mbtree=0"}
        stream = container.add_stream("libx264", rate=VIDEO_FPS, options=options)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = VIDEO_FPS  # a keyframe every second: seeking has work to skip
        # Every stream is added before the first packet: the container's header is written then.
        audio = container.add_stream("aac", rate=AUDIO_RATE, layout="mono") if sound is not None else None
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_image(img)
            frame.pts, frame.time_base = i, Fraction(1, VIDEO_FPS)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
        if audio is None:
            return
        for start in range(0, sound.size, 1024):
            chunk = av.AudioFrame.from_ndarray(sound[None, start : start + 1024], format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts, chunk.time_base = AUDIO_RATE, start, Fraction(1, AUDIO_RATE)
            container.mux(audio.encode(chunk))
        container.mux(audio.encode())


# ----------------------------------------------------------------------------------------- audio


def _unique_speech(rng: random.Random, n: int) -> list[tuple[str, str, int]]:
    """`n` distinct (text, voice, speed) triples, so no two clips are identical (data prep dedups)."""
    seen: set[tuple[str, str, int]] = set()
    out: list[tuple[str, str, int]] = []
    while len(out) < n:
        words = " ".join(rng.choice(DIGITS) for _ in range(rng.randint(1, 3)))
        item = (words, rng.choice(VOICES), rng.choice(SPEEDS))
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _espeak(text: str, voice: str, speed: int) -> bytes:
    """The text spoken by espeak-ng, as WAV bytes (at espeak-ng's own 22.05 kHz)."""
    return subprocess.run(
        ["espeak-ng", "--stdout", "-v", voice, "-s", str(speed), text], check=True, capture_output=True
    ).stdout


def _speak(text: str, voice: str, speed: int, path: Path) -> None:
    samples = load_audio(_espeak(text, voice, speed), AUDIO_RATE)  # models want 16 kHz
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(AUDIO_RATE)
        w.writeframes((samples * 32767).round().astype("<i2").tobytes())


def _asr(rng: random.Random, rid: str, out_dir: Path, text: str, voice: str, speed: int) -> dict:
    rel = f"media/{rid}.wav"
    _speak(text, voice, speed, out_dir / rel)
    return {"messages": _chat("<audio>Transcribe the audio.", text), "audios": [rel]}


def _spoken_vqa(rng: random.Random, rid: str, out_dir: Path) -> dict:
    """An image and a question about it that is only spoken: the model must understand the speech
    to know whether to name the colour or the shape."""
    image, color, shape = _shape_image(rng, rid, out_dir, _index(rid))
    asked = rng.choice(list(SPOKEN_QUESTIONS))
    audio = f"media/{rid}.wav"
    _speak(SPOKEN_QUESTIONS[asked], rng.choice(VOICES), rng.choice(SPEEDS), out_dir / audio)
    user = "<image><audio>Answer the spoken question about the image."
    return {"messages": _chat(user, color if asked == "color" else shape), "images": [image], "audios": [audio]}


# ------------------------------------------------------------------------------------------ text

_FACTS = [
    ("What color is the sky?", "blue"),
    ("What color is grass?", "green"),
    ("What color is a banana?", "yellow"),
    ("What color is a tomato?", "red"),
    ("How many sides does a triangle have?", "3"),
    ("How many sides does a square have?", "4"),
    ("How many corners does a circle have?", "0"),
    ("How many legs does a dog have?", "4"),
    ("How many days are in a week?", "7"),
    ("What is the opposite of up?", "down"),
    ("What is the opposite of left?", "right"),
]


def _text_pool(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """`n` question/answer pairs drawn without replacement from a pool of single-digit sums and
    differences, successor/predecessor questions and a few facts (repeats only past ~190)."""
    pool = list(_FACTS)
    pool += [(f"What is {a} plus {b}?", str(a + b)) for a in range(10) for b in range(10)]
    pool += [(f"What is {a} minus {b}?", str(a - b)) for a in range(10) for b in range(a + 1)]
    pool += [(f"What number comes after {k}?", str(k + 1)) for k in range(10)]
    pool += [(f"What number comes before {k}?", str(k - 1)) for k in range(1, 11)]
    rng.shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]


def _text_qa(rng: random.Random, rid: str, out_dir: Path, qa: tuple[str, str]) -> dict:
    return {"messages": _chat(*qa)}
