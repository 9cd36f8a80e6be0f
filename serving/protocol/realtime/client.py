"""A client of `/v1/realtime` people can run (`omni realtime`): streams a sound file, a WAV or the
sound track of a video, to the endpoint in `input_audio_buffer.append` chunks at real-time pace, lets
the server's voice activity detection end the turn (or commits the buffer itself at the end), prints
the answer's text deltas as they arrive and how long each step took after the audio ended.

    report = asyncio.run(stream_audio(url, samples, rate, token=..., pace=1.0))
    print(json.dumps(report.summary()))

Timings count from the moment the file's last chunk left the client ("the end of the audio"): to
`input_audio_buffer.speech_stopped` (server VAD only; it waits for `silence_duration_ms` of silence,
so the client sends that much, and a little more, after the file), to the last turn's first
`response.output_text.delta`, and to its `response.done`. A file that ends in silence can be heard to
stop before it ends: that time is negative.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from model.media.decode import MediaError, sound_as_pcm16
from serving.auth import TOKEN_ENV
from serving.protocol.realtime.events import MAX_RATE, MIN_RATE, ServerVad

ROUTE = "/v1/realtime"
DEFAULT_RATE = 24000  # OpenAI's PCM16 rate; the server takes 8-48 kHz and resamples as the model needs
CHUNK_S = 0.1  # one append per 100 ms of audio at real-time pace
# At --pace 0: 1 s chunks, at most 50 a second (half the server's default realtime.max_events_per_s,
# beyond which it drops events): 50 times real time, and no audio lost to the limit.
FAST_CHUNK_S, FAST_EVENTS_PER_S = 1.0, 50
TAIL_MARGIN_S = 0.5  # silence sent after the file beyond the VAD's silence_duration_ms
CONNECT_TIMEOUT_S = 10.0
ANSWERED = ("completed", "incomplete")  # response.done statuses that carry an answer (incomplete: token budget)


class ClientError(Exception):
    """A problem the user can fix (the endpoint, the token, the file): the message says what to do."""


@dataclass
class Report:
    """What one streamed file got back; `summary()` is the line `omni realtime` ends with."""

    file: str
    audio_s: float
    turn_detection: str  # "server_vad" or "commit"
    audio_start: float | None = None  # perf_counter when the first chunk left
    audio_end: float | None = None  # perf_counter when the file's last chunk had been heard (pace > 0) or left
    speech_started: int = 0
    speech_stopped: list[float] = field(default_factory=list)  # arrival times
    responses: list[dict] = field(default_factory=list)  # {"status", "reason", "deltas", "text", "first", "done"}
    errors: list[dict] = field(default_factory=list)  # the server's error events
    outcome: str = "pending"  # ok | no_speech | timeout | errors | closed

    def _after_end_ms(self, at: float | None) -> float | None:
        return None if at is None or self.audio_end is None else round((at - self.audio_end) * 1000, 1)

    def summary(self) -> dict:
        last = self.responses[-1] if self.responses else {}
        sent = None if self.audio_end is None else round(self.audio_end - self.audio_start, 3)
        return {"outcome": self.outcome, "file": self.file, "audio_s": round(self.audio_s, 3), "audio_sent_s": sent,
                "turn_detection": self.turn_detection, "responses": len(self.responses),
                "status": last.get("status"), "deltas": sum(r["deltas"] for r in self.responses),
                "text_chars": sum(len(r["text"]) for r in self.responses),
                "speech_stopped_ms": self._after_end_ms(self.speech_stopped[-1] if self.speech_stopped else None),
                "first_delta_ms": self._after_end_ms(last.get("first")),
                "done_ms": self._after_end_ms(last.get("done")),
                "errors": len(self.errors)}


def endpoint_url(url: str) -> str:
    """ws(s)://host:port/v1/realtime from what people type: http(s):// is taken, a bare host gets the route."""
    parts = urlsplit(url if "://" in url else f"ws://{url}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ClientError(f"--url {url!r}: expected ws://HOST:PORT{ROUTE} (or wss://, http://, https://)")
    path = parts.path if parts.path not in ("", "/") else ROUTE
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def read_sound(path: Path, rate: int) -> np.ndarray:
    """The file's sound as mono PCM16 at `rate` (a WAV in any PCM layout, or a video's sound track)."""
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ClientError(f"--rate {rate}: the server takes {MIN_RATE} to {MAX_RATE} Hz")
    try:
        samples = sound_as_pcm16(path, rate)
    except MediaError as err:
        raise ClientError(f"{err}; give a WAV file or a video with a sound track") from None
    if len(samples) < rate // 10:
        raise ClientError(f"{path}: less than 100 ms of sound ({len(samples)} samples at {rate} Hz)")
    return samples


def _pcm_event(samples: np.ndarray) -> str:
    audio = base64.b64encode(samples.astype("<i2").tobytes()).decode()
    return json.dumps({"type": "input_audio_buffer.append", "audio": audio})


def _refused(url: str, err: InvalidStatus) -> ClientError:
    status = err.response.status_code
    hint = {401: f"the endpoint refused the token: pass the server's API token with --token or {TOKEN_ENV}",
            403: "the endpoint refused the token: pass the server's API token with --token or "
                 f"{TOKEN_ENV}",
            404: f"no realtime route there: check the URL (the route is {ROUTE}) and the served model name",
            503: "the server is still loading the model: try again shortly"}
    return ClientError(f"{url}: HTTP {status}; {hint.get(status, 'the server refused the WebSocket upgrade')}")


async def _open(url: str, token: str | None) -> ClientConnection:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return await connect(url, additional_headers=headers, max_size=None, open_timeout=CONNECT_TIMEOUT_S)
    except InvalidStatus as err:
        raise _refused(url, err) from None
    except InvalidURI as err:
        raise ClientError(f"{url}: not a WebSocket URL ({err})") from None
    except (OSError, TimeoutError, InvalidHandshake) as err:
        raise ClientError(f"cannot reach {url} ({err or type(err).__name__}): is the server running, and are "
                          "the host, port and scheme (ws:// or wss://) right?") from None


class _Session:
    """The event reader of one streamed file: fills the report and says when every turn is answered."""

    def __init__(self, ws: ClientConnection, report: Report, on_text: Callable[[str], None],
                 on_note: Callable[[str], None]):
        self.ws, self.report, self.on_text, self.on_note = ws, report, on_text, on_note
        self.awaiting = 0  # turns ended (speech stopped, or our commit) not yet answered by response.done
        self.speaking = False
        self.current: dict | None = None
        self.changed = asyncio.Event()

    async def expect(self, kind: str) -> dict:
        """The next event, which must be `kind` (session setup); an error event says why not."""
        event = json.loads(await self.ws.recv())
        if event["type"] == "error":
            raise ClientError(f"the server refused the session: {event['error']['message']}")
        if event["type"] != kind:
            raise ClientError(f"expected {kind} from the server, got {event['type']}: is this a realtime endpoint?")
        return event

    async def read(self) -> None:
        async for raw in self.ws:
            self.on_event(json.loads(raw), time.perf_counter())
            self.changed.set()

    def on_event(self, event: dict, now: float) -> None:
        kind, r = event["type"], self.report
        if kind == "input_audio_buffer.speech_started":
            self.speaking, r.speech_started = True, r.speech_started + 1
            self.on_note(f"[speech started at {event['audio_start_ms'] / 1000:.2f} s]")
        elif kind == "input_audio_buffer.speech_stopped":
            self.speaking, self.awaiting = False, self.awaiting + 1
            r.speech_stopped.append(now)
            self.on_note(f"[speech stopped at {event['audio_end_ms'] / 1000:.2f} s]")
        elif kind == "response.created":
            self.current = {"status": None, "reason": None, "deltas": 0, "text": "", "first": None, "done": None}
        elif kind == "response.output_text.delta" and self.current is not None:
            self.current["first"] = self.current["first"] or now
            self.current["deltas"] += 1
            self.current["text"] += event["delta"]
            self.on_text(event["delta"])
        elif kind == "response.done":
            self._done(event["response"], now)
        elif kind == "error":
            r.errors.append(event["error"])
            self.on_note(f"[server error {event['error']['code']}: {event['error']['message']}]")

    def _done(self, response: dict, now: float) -> None:
        answer = self.current or {"deltas": 0, "text": "", "first": None}
        reason = (response.get("status_details") or {}).get("reason")
        answer.update(status=response["status"], reason=reason, done=now)
        self.report.responses.append(answer)
        self.current, self.awaiting = None, max(0, self.awaiting - 1)
        if answer["text"]:
            self.on_text("\n")
        tokens = (response.get("usage") or {}).get("output_tokens")
        self.on_note(f"[response {response['status']}{f' ({reason})' if reason else ''}, {tokens} tokens]")

    def settled(self) -> bool:
        return not self.speaking and self.awaiting == 0 and self.current is None


async def _send_audio(ws: ClientConnection, samples: np.ndarray, rate: int, pace: float) -> None:
    """Append `samples` in chunks: at `pace` > 0 each chunk leaves when its audio would have been heard
    (sped up `pace` times); at 0, one-second chunks at FAST_EVENTS_PER_S."""
    step = max(1, int(rate * (CHUNK_S if pace > 0 else FAST_CHUNK_S)))
    start, sent = time.perf_counter(), 0
    for i in range(0, len(samples), step):
        chunk = samples[i:i + step]
        await ws.send(_pcm_event(chunk))
        sent += len(chunk)
        due = start + (sent / rate / pace if pace > 0 else (i // step + 1) / FAST_EVENTS_PER_S)
        wait = due - time.perf_counter()
        await asyncio.sleep(max(0.0, wait))


async def stream_audio(url: str, samples: np.ndarray, rate: int, *, token: str | None = None, pace: float = 1.0,
                       commit: bool = False, timeout_s: float = 120.0, file: str = "",
                       on_text: Callable[[str], None] = lambda s: None,
                       on_note: Callable[[str], None] = lambda s: None) -> Report:
    """Stream PCM16 `samples` at `rate` to the realtime endpoint at `url` and collect the answer(s).
    Raises ClientError when the endpoint cannot be reached or refuses the session."""
    vad = ServerVad()
    report = Report(file, len(samples) / rate, "commit" if commit else "server_vad")
    async with await _open(url, token) as ws:
        session = _Session(ws, report, on_text, on_note)
        await session.expect("session.created")
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": rate},
            "turn_detection": None if commit else vad.model_dump(exclude_none=True)}}}}))
        await session.expect("session.updated")
        reader = asyncio.create_task(session.read())
        try:
            report.audio_start = time.perf_counter()
            await _send_audio(ws, samples, rate, pace)
            report.audio_end = time.perf_counter()
            if commit:
                session.awaiting += 1
                for kind in ("input_audio_buffer.commit", "response.create"):
                    await ws.send(json.dumps({"type": kind}))
            else:  # the VAD ends a turn after this much silence
                tail = np.zeros(int(rate * (vad.silence_duration_ms / 1000 + TAIL_MARGIN_S)), np.int16)
                await _send_audio(ws, tail, rate, pace)
                await asyncio.sleep(0.2)  # the detector's last windows
            report.outcome = await _wait(session, reader, timeout_s, commit)
        except ConnectionClosed as err:
            report.outcome = "closed"
            on_note(f"[the server closed the session: {err.rcvd.reason if err.rcvd else 'no close frame'}]")
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    return report


async def _wait(session: _Session, reader: asyncio.Task, timeout_s: float, commit: bool) -> str:
    """Until every ended turn is answered; the outcome."""
    report, deadline = session.report, time.monotonic() + timeout_s
    if not commit and report.speech_started == 0 and session.settled():
        return "no_speech"
    while not session.settled():
        if reader.done():
            reader.result()  # the socket closed: ConnectionClosed
            return "closed"
        session.changed.clear()
        try:
            await asyncio.wait_for(session.changed.wait(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return "timeout"
    answered = report.responses and report.responses[-1]["status"] in ANSWERED
    return "ok" if answered and not report.errors else "errors"


OUTCOME_HINTS = {
    "no_speech": "the server heard no speech in the file (no speech_started); use --commit to send it as one turn",
    "timeout": "no response.done within --timeout; the server may be overloaded (or raise --timeout)",
    "errors": "the server answered with error events (above); the summary counts them",
    "closed": "the server closed the session before the answer was done",
}


def run(url: str, path: Path, *, token: str | None, pace: float, commit: bool, rate: int = DEFAULT_RATE,
        timeout_s: float = 120.0) -> tuple[Report, int]:
    """`omni realtime`: stream `path`, print deltas to stdout and notes to stderr, then the summary line.
    Returns the report and the exit code (0: answered without errors; 1: see the summary's outcome)."""
    if pace < 0:
        raise ClientError(f"--pace {pace}: 1.0 streams at real time, 2.0 twice as fast, 0 as fast as possible")
    samples = read_sound(path, rate)
    url = endpoint_url(url)

    def text(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    def note(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    note(f"[streaming {path} ({len(samples) / rate:.2f} s at {rate} Hz) to {url}, pace {pace:g}]")
    report = asyncio.run(stream_audio(url, samples, rate, token=token, pace=pace, commit=commit,
                                      timeout_s=timeout_s, file=str(path), on_text=text, on_note=note))
    if report.outcome in OUTCOME_HINTS:
        note(f"omni realtime: {OUTCOME_HINTS[report.outcome]}")
    print(json.dumps(report.summary()), flush=True)
    return report, 0 if report.outcome == "ok" else 1
