"""Data benchmark: data-prep throughput on the demo set, and video frame sampling by seeking vs by
decoding every frame on a longer clip.

    make bench                                      # runs this after bench_training
    .venv/bin/python -m benchmarks.bench_data       # ~1 min on 2 idle cores
    .venv/bin/python -m benchmarks.bench_data --quick --repeats 1

Prints one JSON object per line (`"kind"`: machine, demo, prep, video_clip, video_sampling, done),
then a short table. See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import PIL
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from benchmarks.machine import cpu_name  # noqa: E402
from model.config import DataConfig, ModelConfig
from model.data.demo import make_demo
from model.data.prep import prepare
from model.media.decode import load_video_frames, sample_times

REPO = Path(__file__).resolve().parents[1]


def emit(kind: str, **fields) -> dict:
    record = {"kind": kind, **fields}
    print(json.dumps(record), flush=True)
    return record


def machine_info() -> dict:
    cpu = cpu_name()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "pyav": av.__version__,
        "ffmpeg": av.library_versions.get("libavcodec"),
        "pillow": PIL.__version__,
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def load(kind: str, name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(REPO / "conf" / kind / f"{name}.yaml"))


# ------------------------------------------------------------------------------------------- prep
def bench_prep(work: Path, data: DataConfig, model: ModelConfig, repeats: int) -> dict:
    """Records/s of `prepare` (validate + normalise + dedup + tokenizer + tokenise + shards),
    best of `repeats` runs into fresh folders."""
    t = time.perf_counter()
    counts = make_demo(work / "demo", data, progress=False)
    emit(
        "demo",
        records=counts["total"],
        seconds=round(time.perf_counter() - t, 2),
        tasks={k: v for k, v in counts.items() if k not in ("train", "val", "total")},
    )
    runs = []
    for i in range(repeats):
        t = time.perf_counter()
        result = prepare([work / "demo"], work / f"prep-{i}", data, model, progress=False)
        runs.append(time.perf_counter() - t)
    m = result.manifest
    best = min(runs)
    return emit(
        "prep",
        records_in=m["records_in"],
        records_out=m["records_out"],
        quarantined=m["records_quarantined"],
        seconds=[round(r, 2) for r in runs],
        records_per_s=round(m["records_in"] / best, 1),
        media_items=sum(v.get("items", 0) for v in m["modalities"].values()),
        media_files=m["media"]["files"],
    )


# ------------------------------------------------------------------------------------------ video
def make_clip(path: Path, seconds: int, size: int, fps: int, gop: int) -> dict:
    """A moving-shapes H.264 clip: every frame differs, so no encoder shortcut makes decoding cheap."""
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "23"})
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        background = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)  # texture: real bits per frame
        for i in range(seconds * fps):
            img = Image.fromarray(background)
            draw = ImageDraw.Draw(img)
            x = (i * 3) % size
            draw.ellipse((x - 12, size // 3 - 12, x + 12, size // 3 + 12), fill=(220, 30, 30))
            draw.rectangle((size // 2, (i * 2) % size, size // 2 + 20, (i * 2) % size + 20), fill=(30, 60, 220))
            frame = av.VideoFrame.from_image(img)
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return {
        "seconds": seconds,
        "size": size,
        "fps": fps,
        "gop_frames": gop,
        "bytes": path.stat().st_size,
        "encode_s": round(time.perf_counter() - t, 2),
    }


def decode_every_frame(path: Path, fps: float, max_frames: int) -> tuple[list[Image.Image], list[float]]:
    """The baseline: decode the whole stream in order, keep the first frame at/after each target time
    (the same targets `load_video_frames` seeks to)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        duration = float(stream.duration * stream.time_base)
        targets = iter(sample_times(duration, fps, max_frames))
        target = next(targets, None)
        frames, times = [], []
        for frame in container.decode(stream):
            if target is not None and frame.time >= target - 5e-7:
                frames.append(frame.to_image())
                times.append(float(frame.time))
                target = next(targets, None)
    return frames, times


def bench_video(path: Path, sample_fps: float, max_frames: int, repeats: int) -> dict:
    seek, full = [], []
    for _ in range(repeats):  # alternate, so load from other processes hits both alike
        t = time.perf_counter()
        frames_seek, times_seek = load_video_frames(path, sample_fps, max_frames)
        seek.append(time.perf_counter() - t)
        t = time.perf_counter()
        frames_full, times_full = decode_every_frame(path, sample_fps, max_frames)
        full.append(time.perf_counter() - t)
    same = times_seek == times_full and all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames_seek, frames_full, strict=True)
    )
    return emit(
        "video_sampling",
        clip=path.name,
        frames=len(frames_seek),
        sample_fps=sample_fps,
        max_frames=max_frames,
        seek_ms=round(1000 * min(seek), 1),
        decode_all_ms=round(1000 * min(full), 1),
        ratio_decode_all_over_seek=round(min(full) / min(seek), 2),
        identical_frames=bool(same),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a quarter of the demo set, a 20 s clip, 1 repeat")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each measurement (best is kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the mel features)")
    ap.add_argument("--clip-seconds", type=int, nargs="+", default=[60, 300], help="one clip per length")
    ap.add_argument("--clip-size", type=int, default=128)
    ap.add_argument("--clip-fps", type=int, default=25)
    ap.add_argument("--gop", type=int, default=50, help="frames between keyframes (50 = 2 s at 25 fps)")
    ap.add_argument("--sample-fps", type=float, default=1.0, help="default: the paper's 1 fps")
    ap.add_argument(
        "--max-frames",
        type=int,
        nargs="+",
        default=[48, 8],
        help="frame caps to sample each clip with (48: the paper's; 8: a sparse sampling)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    data, model = DataConfig(**load("data", "demo")), ModelConfig(**load("model", "tiny"))
    if args.quick:
        data = data.model_copy(
            update={k: getattr(data, k) // 4 for k in ("demo_images", "demo_videos", "demo_audios", "demo_texts")}
        )
    emit("machine", **machine_info())
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(tmp)
        prep = bench_prep(work, data, model, repeats)
        videos = []
        for seconds in [20] if args.quick else args.clip_seconds:
            path = work / f"clip-{seconds}s.mp4"
            emit("video_clip", **make_clip(path, seconds, args.clip_size, args.clip_fps, args.gop))
            videos += [(seconds, bench_video(path, args.sample_fps, cap, max(repeats, 2))) for cap in args.max_frames]
    emit("done", loadavg_1_5_15=[round(x, 2) for x in os.getloadavg()])
    print()
    print(
        f"prep (demo set, {prep['records_in']} records):  {prep['records_per_s']} records/s "
        f"(best of {repeats}: {min(prep['seconds'])} s), {prep['quarantined']} quarantined"
    )
    print(
        f"\nvideo sampling at {args.sample_fps} fps, {args.clip_size}x{args.clip_size} {args.clip_fps} fps H.264, "
        f"keyframe every {args.gop} frames"
    )
    print(f"{'clip':>6} {'frames':>7} {'seek ms':>9} {'decode-all ms':>14} {'ratio':>7}  identical")
    for seconds, v in videos:
        print(
            f"{seconds:>5}s {v['frames']:>7} {v['seek_ms']:>9} {v['decode_all_ms']:>14} "
            f"{v['ratio_decode_all_over_seek']:>6}x  {v['identical_frames']}"
        )


if __name__ == "__main__":
    main()
