"""Why a record was refused, and what to do about it: the quarantine's reason kinds and their fixes.

A reason line reads "<kind>: <detail> (<fix>)", e.g. "image size: 'a.png' is 9000x20 ... (resize the
image or change the data.*image* limits)". The kinds are also what MediaError.kind says for media.
"""

from __future__ import annotations

FIXES = {
    "not UTF-8": "save the file as UTF-8",
    "NUL character": "remove the NUL characters: tools that read the data set take them for the end of a string",
    "malformed JSON": "each line must be one complete JSON object",
    "invalid record": "see the record format in docs/data-format.md",
    "tag/media mismatch": "give each <image>/<video>/<audio> tag exactly one entry in the media list, in order",
    "unknown media tag": "rename the tag in the text",
    "no answer": "a record without a target teaches nothing: add the answer or drop the record",
    "text too long": "split the conversation or raise data.max_text_chars",
    "missing media": "fix the path (relative paths resolve against the JSONL file's folder) or add the file",
    "unreadable media": "media must be regular files (not devices, pipes, folders or /proc, /sys entries) that "
                        "data prep can open",
    "media outside roots": "move the file under one of data.media_roots, or add its folder there",
    "media too large": "shrink the file or raise data.max_media_bytes",
    "bad image": "replace the file with a readable PNG/JPEG/WebP image",
    "image size": "resize the image or change the data.*image* limits",
    "bad video": "replace the file with a readable video (e.g. H.264 mp4) that has frames",
    "video too long": "cut the video (its sound track too) or raise data.max_video_seconds",
    "bad video audio": "re-mux the video with a readable sound track, or set the record's use_audio_in_video "
                       "to false to train on its frames only",
    "bad audio": "replace the file with readable audio (WAV/FLAC/MP3/OGG) that has an audio stream",
    "audio sample rate": "use a recording made at a higher rate, or lower data.min_audio_sample_rate",
    "audio length": "trim the audio or change data.min_audio_seconds/max_audio_seconds",
    "duplicate": "remove the repeated record",
    "duplicate id": "give every record a unique id",
    "too many tokens": "shorten the conversation or media, or raise model.max_seq_len",
    "not encodable": "the model's processor rejected the sample; check its media against the model config",
    "unexpected error": "a bug in data prep or a decoder: please report it with this line",
}


class Rejected(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail} ({FIXES[kind]})")
        self.kind = kind

