"""The served model under production conditions, through the real server (a subprocess) and the
official `openai` client: OpenAI's sampling parameters, concurrent requests batched with the same
answers as alone, Prometheus metrics and the access log, a full queue (429), a client that
disconnects (its generation is cancelled), and SIGTERM (in-flight requests finish, then exit 0).

The checkpoint is tiny and untrained: answers are compared with each other, never for content.
`logit_bias` against the end-of-answer token makes an answer run to its token budget when a test
needs a long generation."""

from __future__ import annotations

import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from model.text.tokenizer import IM_END
from serving.local import LiveServer, metric, start_server
from tests.serving.test_predictor import png_bytes

API_KEY = "sk-test-secret-7f3a9c"  # must never reach the server's log
PROMPTS = ["what color is the shape", "describe", "hi", "transcribe the audio one two three", "A B C D",
           "red green blue yellow", "is the shape blue", "one"]


@pytest.fixture(scope="module")
def live(checkpoint):
    server = start_server(checkpoint, checkpoint.parent / "main", {"max_new_tokens": 8})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    with openai.OpenAI(base_url=f"{live.base}/openai/v1", api_key=API_KEY, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def no_eos(tokenizer) -> dict:
    return {str(tokenizer.convert_tokens_to_ids(IM_END)): -100}


def _ask(client, content, **kw):
    messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
    return client.chat.completions.create(model="omni", messages=messages, **{"temperature": 0, **kw})


def _metrics(live: LiveServer) -> str:
    return requests.get(f"{live.base}/metrics", timeout=10).text


# ------------------------------------------------------------------------------ OpenAI parameters


def test_stop_strings_cut_the_answer(client, no_eos):
    full = _ask(client, "hi", max_tokens=16, logit_bias=no_eos).choices[0].message.content
    assert len(full) >= 6, full
    stop = full[3:5]
    cut = _ask(client, "hi", max_tokens=16, logit_bias=no_eos, stop=[stop, "never-seen"]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[: full.find(stop)].strip()


def test_seed_gives_the_same_answer_and_temperature_samples(client):
    kw = {"max_tokens": 12, "temperature": 1.5, "top_p": 0.98, "extra_body": {"top_k": 100}}
    a = _ask(client, "describe", seed=11, **kw).choices[0].message.content
    b = _ask(client, "describe", seed=11, **kw).choices[0].message.content
    others = {_ask(client, "describe", seed=s, **kw).choices[0].message.content for s in (12, 13, 14)}
    greedy = _ask(client, "describe", max_tokens=12).choices[0].message.content
    assert a == b
    assert others - {a} and (others | {a}) - {greedy}  # other seeds, other answers; not the greedy one


def test_penalties_bias_and_token_budget(client, no_eos):
    plain = _ask(client, "hi", max_tokens=24, logit_bias=no_eos).choices[0].message.content
    penalised = _ask(client, "hi", max_tokens=24, frequency_penalty=2.0, presence_penalty=2.0, logit_bias=no_eos)
    assert penalised.choices[0].finish_reason == "length" and penalised.usage.completion_tokens == 24
    assert penalised.choices[0].message.content != plain  # 24 greedy tokens of a tiny model repeat themselves
    short = _ask(client, "hi", max_completion_tokens=3, logit_bias=no_eos)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_logprobs_and_top_logprobs(client, no_eos):
    r = _ask(client, "what color is the shape", max_tokens=6, logprobs=True, top_logprobs=3, logit_bias=no_eos)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3 and isinstance(entry.bytes, list)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
    # Greedy on the raw logits (the bias aside): the chosen token is the most likely one.
    assert all(e.top_logprobs[0].token == e.token for e in content)
    assert "".join(bytes(e.bytes).decode("utf-8", "replace") for e in content).strip() == r.choices[0].message.content


def test_streaming_usage_and_deltas(client):
    plain = _ask(client, "is the shape blue", max_tokens=8)
    chunks = list(_ask(client, "is the shape blue", max_tokens=8, stream=True, stream_options={"include_usage": True},
                       logprobs=True))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    streamed_lps = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert len(streamed_lps) == plain.usage.completion_tokens


def test_ignored_fields_and_text_format_change_nothing(client):
    plain = _ask(client, "A B C D", max_tokens=6).choices[0].message.content
    extra = _ask(client, "A B C D", max_tokens=6, user="u-1", metadata={"team": "ml"}, store=False,
                 parallel_tool_calls=False, response_format={"type": "text"}, service_tier="auto")
    assert extra.choices[0].message.content == plain


def test_multi_turn_with_media_in_an_earlier_turn(client, tiny_cfg):
    url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    image = {"type": "image_url", "image_url": {"url": url}}
    turns = [{"role": "user", "content": [image, {"type": "text", "text": "what color?"}]},
             {"role": "assistant", "content": "red"}, {"role": "user", "content": "and the shape?"}]
    with_image = _ask(client, turns, max_tokens=4)
    without = _ask(client, [{"role": "user", "content": "what color?"}, *turns[1:]], max_tokens=4)
    assert with_image.usage.prompt_tokens - without.usage.prompt_tokens == tiny_cfg.vision.tokens_per_tile + 2


def test_invalid_values_are_4xx_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as err:
        _ask(client, "hi", presence_penalty=3)
    assert err.value.body["param"] == "presence_penalty"
    with pytest.raises(openai.BadRequestError) as err:
        _ask(client, "hi", response_format={"type": "json_object"})
    assert err.value.body["param"] == "response_format.type"


# ------------------------------------------------------------------------------------- batching


def test_concurrent_requests_are_batched_and_answered_as_alone(live, client):
    alone = [_ask(client, p, max_tokens=10).choices[0].message.content for p in PROMPTS]
    before = _metrics(live)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: _ask(client, p, max_tokens=10).choices[0].message.content, PROMPTS))
    after = _metrics(live)
    assert together == alone
    steps = metric(after, "omni_batch_size_count") - metric(before, "omni_batch_size_count")
    single = metric(after, "omni_batch_size_bucket", le="1.0") - metric(before, "omni_batch_size_bucket", le="1.0")
    assert steps - single > 0, "no decode step ran more than one sequence"


# -------------------------------------------------------------------------------- observability


def test_metrics_and_an_access_log_without_payloads(live, client):
    png = base64.b64encode(png_bytes()).decode()
    secret_prompt = "zebra-prompt-text-41"
    _ask(client, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
        {"type": "text", "text": secret_prompt}]}], max_tokens=3)
    requests.post(f"{live.base}/openai/v1/chat/completions?api_key={API_KEY}", json={"messages": []}, timeout=10)
    text = _metrics(live)
    route = "/openai/v1/chat/completions"
    assert metric(text, "omni_requests_total", route=route, status="200") >= 1
    assert metric(text, "omni_requests_total", route=route, status="400") >= 1
    assert metric(text, "omni_request_duration_seconds_count", route=route) >= 2
    for name in ("omni_time_to_first_token_seconds_count", "omni_generated_tokens_total",
                 "omni_generation_tokens_per_second_count"):
        assert metric(text, name) > 0, name
    assert "omni_queue_depth" in text and "omni_running_sequences" in text
    assert metric(text, "omni_generations_total", finish_reason="length") > 0
    time.sleep(0.5)  # the log is written by another process
    log = live.log()
    assert f'"POST {route}" 200' in log and f'"POST {route}" 400' in log
    assert png[:40] not in log and secret_prompt not in log and API_KEY not in log


# ------------------------------------------------------------- queue bound, disconnects, shutdown


@pytest.fixture(scope="module")
def one_slot(checkpoint):
    """One sequence at a time and one waiting: the third concurrent request finds the queue full."""
    server = start_server(checkpoint, checkpoint.parent / "one-slot",
                          {"limits": {"max_tokens": 512}, "batching": {"max_batch_size": 1, "max_queue": 1}})
    yield server
    server.stop()


def _long(no_eos: dict, stream: bool = False, tokens: int = 400) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, "temperature": 0,
            "logit_bias": no_eos, "stream": stream}


def _wait_for(predicate, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_full_queue_answers_429_with_retry_after(one_slot, no_eos):
    url = f"{one_slot.base}/openai/v1/chat/completions"
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: requests.post(url, json=_long(no_eos, tokens=150), timeout=120), range(4)))
    codes = sorted(r.status_code for r in replies)
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
    refused = next(r for r in replies if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1 and refused.json()["error"]["code"] == "queue_full"


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "plain"])
def test_a_client_that_disconnects_stops_its_generation(one_slot, no_eos, stream):
    url = f"{one_slot.base}/openai/v1/chat/completions"
    cancelled = metric(_metrics(one_slot), "omni_generations_total", finish_reason="cancelled")
    tokens_before = metric(_metrics(one_slot), "omni_generated_tokens_total")
    if stream:
        with requests.post(url, json=_long(no_eos, stream=True, tokens=500), stream=True, timeout=60) as r:
            lines = r.iter_lines()
            assert json.loads(next(line for line in lines if line).removeprefix(b"data: "))["object"]
    else:
        with pytest.raises(requests.ReadTimeout):
            requests.post(url, json=_long(no_eos, tokens=500), timeout=0.5)
    assert _wait_for(lambda: metric(_metrics(one_slot), "omni_generations_total", finish_reason="cancelled")
                     > cancelled), "the generation was not cancelled"
    assert metric(_metrics(one_slot), "omni_generated_tokens_total") - tokens_before < 500


def test_sigterm_lets_in_flight_requests_finish_then_exits(checkpoint, no_eos):
    server = start_server(checkpoint, checkpoint.parent / "drain", {"limits": {"max_tokens": 512},
                                                                     "shutdown_grace_s": 60})
    url = f"{server.base}/openai/v1/chat/completions"
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=requests.post(url, json=_long(no_eos, tokens=300),
                                                                           timeout=120)))
    try:
        worker.start()
        assert _wait_for(lambda: metric(_metrics(server), "omni_running_sequences") == 1, 30)
        server.proc.terminate()  # SIGTERM, as the kubelet sends it
        assert _wait_for(lambda: _refused(url), 10), "still accepting connections after SIGTERM"
        worker.join(120)
        assert result["r"].status_code == 200, result["r"].text
        assert result["r"].json()["usage"]["completion_tokens"] == 300
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()
    assert "Shutting down" in server.log()


def _refused(url: str) -> bool:
    try:
        requests.post(url, json={"messages": []}, timeout=2)
    except requests.ConnectionError:
        return True
    return False
