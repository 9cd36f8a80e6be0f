"""Prometheus metrics of the predictor, on KServe's `/metrics` next to its own per-phase latencies.

    omni_requests_total{route,status}          HTTP requests answered (route = the path template)
    omni_request_duration_seconds{route}       time from the request's arrival to its last byte
    omni_queue_depth                           sequences waiting for a batch slot
    omni_running_sequences                     sequences in the running batch
    omni_batch_size                            sequences per decode step
    omni_time_to_first_token_seconds           submit -> first generated token (queueing and prefill)
    omni_generated_tokens_total                tokens generated (rate() of it: tokens/s of the server)
    omni_generation_tokens_per_second          per answer: completion tokens / time from first to last token
    omni_generations_total{finish_reason}      finished sequences: stop, length, cancelled, timeout, error
    omni_prompt_tokens_total                   prompt tokens of finished sequences
    omni_prefix_cache_hit_tokens_total         of those, taken from the prefix cache (hit rate: the ratio of the rates)

    omni_realtime_sessions                     open /v1/realtime sessions
    omni_realtime_events_total{type}           client events taken (within the size and rate limits), by type:
                                               the event's own, `unknown_type`, or `not_an_event` (bad JSON)
    omni_realtime_errors_total{code}           `error` events sent, by code (a limit's code is its setting's name)
    omni_realtime_speech_to_first_delta_seconds  server VAD's end of speech -> the answer's first text delta
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from model.nn.engine import EngineObserver, GenerationEngine, Sequence

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter("omni_requests", "HTTP requests answered, by route and status", ["route", "status"])
REQUEST_SECONDS = Histogram("omni_request_duration_seconds", "HTTP request duration, to the last byte", ["route"],
                            buckets=_SECONDS)
QUEUE_DEPTH = Gauge("omni_queue_depth", "sequences waiting for a batch slot")
RUNNING = Gauge("omni_running_sequences", "sequences in the running batch")
BATCH_SIZE = Histogram("omni_batch_size", "sequences per decode step", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
TTFT = Histogram("omni_time_to_first_token_seconds", "submit to first generated token", buckets=_SECONDS)
TOKENS = Counter("omni_generated_tokens", "tokens generated")
TOKENS_PER_S = Histogram("omni_generation_tokens_per_second", "per answer: tokens / time from first to last token",
                         buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500))
PROMPT_TOKENS = Counter("omni_prompt_tokens", "prompt tokens of finished sequences")
PREFIX_HITS = Counter("omni_prefix_cache_hit_tokens", "prompt tokens whose keys and values came from the prefix cache")
FINISHED = Counter("omni_generations", "finished sequences, by finish reason", ["finish_reason"])

REALTIME_SESSIONS = Gauge("omni_realtime_sessions", "open /v1/realtime sessions")
REALTIME_EVENTS = Counter("omni_realtime_events", "realtime client events taken, by type", ["type"])
REALTIME_ERRORS = Counter("omni_realtime_errors", "realtime error events sent, by code", ["code"])
SPEECH_TO_FIRST_DELTA = Histogram("omni_realtime_speech_to_first_delta_seconds",
                                  "end of speech (server VAD) to the answer's first text delta", buckets=_SECONDS)


class PrometheusObserver(EngineObserver):
    def __init__(self, engine: GenerationEngine | None = None):
        if engine is not None:
            QUEUE_DEPTH.set_function(lambda: engine.queue_depth)
            RUNNING.set_function(lambda: len(engine.running))

    def on_step(self, batch_size: int, waiting: int) -> None:
        BATCH_SIZE.observe(batch_size)

    def on_first_token(self, seconds: float) -> None:
        TTFT.observe(seconds)

    def on_finish(self, seq: Sequence) -> None:
        FINISHED.labels(seq.finish_reason).inc()
        PROMPT_TOKENS.inc(seq.prompt_tokens)
        PREFIX_HITS.inc(seq.cached_tokens)
        tokens = seq.completion_tokens
        TOKENS.inc(tokens)
        if tokens > 1 and seq.first_token_at is not None:
            TOKENS_PER_S.observe((tokens - 1) / max(time.monotonic() - seq.first_token_at, 1e-9))
