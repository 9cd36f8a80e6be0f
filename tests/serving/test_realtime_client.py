"""`omni realtime` against a real server on 127.0.0.1 (the realtime tests' tiny model, whose answers
always run to their 6-token budget): a spoken WAV of another rate and layout, and a video's sound
track, are streamed, heard and answered in deltas; the CLI paces at real time and ends with its
summary line; a wrong token, an unreachable endpoint and a file without sound are one-line errors."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tests.serving.test_realtime as realtime_tests
from pipelines.cli import main as omni
from serving.local import REPO
from serving.protocol.realtime import client
from tests.model.media.sound import RATE as VIDEO_RATE
from tests.model.media.sound import mp4_bytes, spoken, write_video_with_sound, write_wav

TOKEN = realtime_tests.TOKEN
# The realtime tests' module fixtures: the never-stopping tiny model and a server on it (one per module).
endless, live = realtime_tests.endless, realtime_tests.live


@pytest.fixture(scope="module")
def question(tmp_path_factory):
    """A spoken question as a stereo 44.1 kHz WAV: the client converts it to mono 24 kHz PCM16."""
    path = tmp_path_factory.mktemp("client") / "question.wav"
    return write_wav(path, spoken("what color is the shape", 44100), 44100, channels=2)


def _url(live) -> str:
    return live.base.replace("http://", "ws://") + client.ROUTE


def _stream(live, path, **kw) -> tuple[client.Report, list[str]]:
    rate = client.DEFAULT_RATE
    text: list[str] = []
    report = asyncio.run(client.stream_audio(_url(live), client.read_sound(path, rate), rate, token=TOKEN,
                                             on_text=text.append, **kw))
    return report, text


def test_a_spoken_wav_is_heard_and_answered_with_timings(live, question):
    report, text = _stream(live, question, pace=4.0)
    summary = report.summary()
    assert summary["outcome"] == "ok" and summary["turn_detection"] == "server_vad", summary
    assert report.speech_started == 1 and len(report.speech_stopped) == 1
    assert summary["responses"] == 1 and summary["status"] == "incomplete"  # the 6-token budget ends it
    assert summary["deltas"] >= 1 and "".join(text).rstrip("\n") == report.responses[0]["text"]
    assert summary["text_chars"] == len(report.responses[0]["text"]) > 0
    # Read in order from the end of the audio: the VAD's stop, the first delta, the end of the answer.
    assert summary["speech_stopped_ms"] <= summary["first_delta_ms"] <= summary["done_ms"] < 60_000
    assert 2.0 < summary["audio_s"] < 4.0  # espeak's ~1.7 s and the 0.9 s of silence, resampled, not stretched
    assert summary["audio_s"] / 4 * 0.95 <= summary["audio_sent_s"] < summary["audio_s"]  # paced at 4x


def test_a_videos_sound_track_is_committed_as_one_turn(live, tmp_path):
    clip = tmp_path / "clip.mp4"
    write_video_with_sound(clip, seconds=3, track=spoken("is the shape blue", VIDEO_RATE, lead_s=0.3))
    report, _ = _stream(live, clip, pace=0, commit=True)
    summary = report.summary()
    assert summary["outcome"] == "ok" and summary["turn_detection"] == "commit", summary
    assert summary["speech_stopped_ms"] is None and report.speech_started == 0  # no VAD
    assert summary["deltas"] >= 1 and 0 <= summary["first_delta_ms"] <= summary["done_ms"]
    assert summary["audio_sent_s"] < summary["audio_s"] / 4  # --pace 0: as fast as it goes


def test_silence_is_reported_as_no_speech(live, tmp_path):
    quiet = write_wav(tmp_path / "quiet.wav", np.zeros(16000, np.float32), 16000)
    report, _ = _stream(live, quiet, pace=0)
    assert report.outcome == "no_speech" and report.responses == []


def test_the_cli_streams_at_real_time_and_ends_with_the_summary(live, question):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMNI_API_TOKEN": TOKEN}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "realtime", str(question), "--url", live.base],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])  # http://HOST:PORT became ws://HOST:PORT/v1/realtime
    assert summary["outcome"] == "ok" and summary["deltas"] >= 1 and summary["errors"] == 0
    assert summary["speech_stopped_ms"] is not None and summary["done_ms"] >= summary["first_delta_ms"]
    assert len(lines) >= 2  # the answer's text came before the summary
    assert "[speech started" in proc.stderr and "[speech stopped" in proc.stderr
    assert summary["audio_sent_s"] >= summary["audio_s"] * 0.95  # real-time pace: as long to send as to hear


def test_a_wrong_token_is_a_clear_error_and_exit_2(live, question, capsys, monkeypatch):
    monkeypatch.delenv("OMNI_API_TOKEN", raising=False)
    assert omni(["realtime", str(question), "--url", _url(live), "--token", "wrong"]) == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "--token" in err and "Traceback" not in err
    assert omni(["realtime", str(question), "--url", _url(live)]) == 2  # none at all
    assert "HTTP 401" in capsys.readouterr().err


def test_an_unreachable_endpoint_and_a_file_without_sound_are_clear_errors(tmp_path, capsys):
    from serving.local import free_port

    assert omni(["realtime", str(write_wav(tmp_path / "a.wav", np.zeros(8000, np.float32), 16000)),
                 "--url", f"ws://127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach" in err and "is the server running" in err
    silent = tmp_path / "silent.mp4"
    silent.write_bytes(mp4_bytes())
    assert omni(["realtime", str(silent)]) == 2
    assert "no audio stream" in capsys.readouterr().err
    assert omni(["realtime", str(tmp_path / "missing.wav")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("given,url", [
    ("localhost:8080", "ws://localhost:8080/v1/realtime"),
    ("http://h:1/", "ws://h:1/v1/realtime"),
    ("https://omni-predictor.ns.example.com", "wss://omni-predictor.ns.example.com/v1/realtime"),
    ("ws://h:1/v1/realtime?model=omni", "ws://h:1/v1/realtime?model=omni"),
])
def test_endpoint_urls_people_type_become_the_route(given, url):
    assert client.endpoint_url(given) == url


def test_a_bad_url_names_the_form_expected():
    with pytest.raises(client.ClientError, match="expected ws://HOST:PORT/v1/realtime"):
        client.endpoint_url("ftp://h/x")


def test_help_documents_every_key_of_the_summary_line(capsys):
    with pytest.raises(SystemExit) as done:
        omni(["realtime", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "last line printed is a JSON object" in out and "Exit status" in out
    keys = client.Report("f.wav", 1.0, "server_vad").summary()
    assert not [k for k in keys if f'"{k}"' not in out], out
