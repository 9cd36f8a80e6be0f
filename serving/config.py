"""Serving settings: the served name, the port, the limits every request is checked against, and how
the generation engine batches (`batching`: model.config.EngineConfig, handed to the engine as it is).

Media counts, sizes and durations are limits per conversation (one OpenAI request, or one row of a
v2 batch); body size and batch size are per request. A client over a limit learns which from a 4xx
instead of the server running out of memory or time. Unknown keys are errors
(`extra="forbid"`), like the rest of the config tree.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import yaml
from pydantic import Field, model_validator

from model.config import EngineConfig, Strict


class ServingLimits(Strict):
    max_request_bytes: int = Field(32 * 1024 * 1024, gt=0, description="whole HTTP body (media are inline)")
    max_batch_size: int = Field(8, gt=0, description="rows in one v2/v1 request")
    max_images: int = Field(4, ge=0, description="images per conversation")
    max_videos: int = Field(1, ge=0, description="videos per conversation")
    max_audios: int = Field(2, ge=0, description="audio clips per conversation")
    max_image_pixels: int = Field(4096 * 4096, gt=0, description="width x height, checked before decoding")
    max_audio_seconds: float = Field(30.0, gt=0)
    max_video_seconds: float = Field(120.0, gt=0)
    max_video_frames: int = Field(
        48, gt=0, description="frames sampled per video (a longer video is sampled evenly, not refused)"
    )
    max_tokens: int = Field(512, gt=0, description="largest max_tokens a request may ask for")
    request_timeout_s: float = Field(120.0, gt=0, description="deadline per request: queueing + generation (503)")


# How concurrent requests share the model: the generation engine's own schema (model.config), so the
# engine's defaults and the ones this file validates are one set.
BatchingConfig = EngineConfig


class RealtimeLimits(Strict):
    """Limits of one `/v1/realtime` WebSocket session (serving/protocol/realtime). A client over one
    gets an `error` event naming it; the session goes on, except past `max_session_s`, which closes
    it with a close frame saying why."""

    max_session_s: float = Field(1800.0, gt=0, description="how long one session may stay open")
    max_buffered_audio_s: float = Field(
        30.0, gt=0, description="input audio held before a commit; at most limits.max_audio_seconds (one turn "
        "becomes one audio clip)")
    max_event_bytes: int = Field(
        1024 * 1024, gt=0, le=16 * 1024 * 1024,
        description="one client event (a WebSocket text frame); at most 16 MiB, the server's frame limit")
    max_events_per_s: float = Field(
        100.0, gt=0, description="client events per second (a burst of as many is allowed); events beyond "
        "are refused, not queued")


class ServingConfig(Strict):
    model_name: str = Field("omni", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    http_port: int = Field(8080, gt=0, lt=65536)
    max_new_tokens: int = Field(64, gt=0, description="default when a request does not say")
    default_temperature: float = Field(1.0, ge=0, le=2, description="OpenAI requests without temperature "
                                       "(OpenAI's own default is 1); v1/v2 requests are always greedy")
    shutdown_grace_s: int = Field(30, ge=0, description="on SIGTERM, how long in-flight requests may finish")
    limits: ServingLimits = ServingLimits()
    batching: BatchingConfig = BatchingConfig()
    realtime: RealtimeLimits = RealtimeLimits()

    @model_validator(mode="after")
    def _default_within_cap(self) -> ServingConfig:
        if self.max_new_tokens > self.limits.max_tokens:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) exceeds limits.max_tokens ({self.limits.max_tokens})"
            )
        context = self.batching.max_context
        if context is not None and self.limits.max_tokens >= context:
            raise ValueError(f"batching.max_context ({context}) must exceed limits.max_tokens "
                             f"({self.limits.max_tokens}): a sequence holds its prompt and up to max_tokens answer "
                             f"tokens; raise max_context or lower max_tokens")
        if self.realtime.max_buffered_audio_s > self.limits.max_audio_seconds:
            raise ValueError(f"realtime.max_buffered_audio_s ({self.realtime.max_buffered_audio_s}) exceeds "
                             f"limits.max_audio_seconds ({self.limits.max_audio_seconds})")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> ServingConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls(**data)


def resolve_storage_uri(uri: str | Path) -> Path:
    """Local directory for a model storage URI: a plain path or file://. In a cluster, KServe's
    storage initializer has already downloaded `storageUri` to /mnt/models, so a local path is the
    common case; other schemes (s3://, ...) are refused with a clear error until they are supported."""
    text = str(uri)
    parsed = urlparse(text)
    if parsed.scheme == "file":
        path = Path(parsed.path)
    elif parsed.scheme == "":
        path = Path(text)
    else:
        raise ValueError(
            f"storage URI {text!r}: scheme {parsed.scheme}:// is not supported yet; "
            "give a local checkpoint directory or a file:// URI"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    return path
