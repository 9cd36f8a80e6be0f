"""OpenAI chat-completions responses: the `chat.completion` object, its streamed
`chat.completion.chunk`s as server-sent events, per-token logprobs, and OpenAI-shaped errors,
`{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse

from model.nn.engine import Event, Sequence
from model.nn.sampling import TokenLogprob
from serving.conversation import Completion
from serving.predictor import OmniPredictor

logger = logging.getLogger(__name__)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status
    )


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt: int, completion: int, cached: int) -> dict:
    """OpenAI's usage, with the prompt tokens the engine's prefix cache supplied (model.nn.prefix_cache)."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class Reply:
    """The response objects of one chat completion: `chat.completion`, or its `chat.completion.chunk`s."""

    def __init__(self, predictor: OmniPredictor, rid: str, created: int):
        self.predictor, self.rid, self.created = predictor, rid, created

    def _logprobs(self, logprobs: list[TokenLogprob] | None) -> dict | None:
        return None if logprobs is None else {"content": self.logprob_entries(logprobs), "refusal": None}

    def logprob_entries(self, logprobs: list[TokenLogprob]) -> list[dict]:
        """OpenAI's logprobs.content items, one a generated token: text, logprob, bytes, the top list."""
        texts = self.predictor.token_texts(t for lp in logprobs for t in (lp.token_id, *(t for t, _ in lp.top)))

        def one(token_id: int, logprob: float) -> dict:
            text, raw = texts[token_id]
            return {"token": text, "logprob": logprob, "bytes": raw}

        return [{**one(lp.token_id, lp.logprob), "top_logprobs": [one(t, p) for t, p in lp.top]} for lp in logprobs]

    def completion(self, done: Completion) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": done.text, "refusal": None},
                  "logprobs": self._logprobs(done.logprobs), "finish_reason": done.finish_reason}
        return {"id": self.rid, "object": "chat.completion", "created": self.created, "model": self.predictor.name,
                "choices": [choice], "usage": _usage(done.prompt_tokens, done.completion_tokens, done.cached_tokens)}

    def chunk(self, delta: dict, finish: str | None = None, logprobs=None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": self._logprobs(logprobs), "finish_reason": finish}
        return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                "model": self.predictor.name, "choices": [choice]}

    async def events(self, events: AsyncIterator[Event], seq: Sequence, include_usage: bool) -> AsyncIterator[str]:
        """The role, content deltas (with their logprobs), the finish reason, optionally usage, then
        `[DONE]`. A failure after the headers went out can only be reported as an error event."""
        yield _sse(self.chunk({"role": "assistant", "content": ""}))
        leading = True
        async for event in events:
            text = event.text.lstrip() if leading else event.text  # as the plain answer, which is stripped
            leading = leading and not text
            lps = [event.logprob] if event.logprob is not None and seq.params.logprobs else None
            if text or lps:
                yield _sse(self.chunk({"content": text}, logprobs=lps))
            if event.kind == "done" and event.finish_reason in ("timeout", "error", "cancelled"):
                logger.warning("streamed generation ended: %s", event.finish_reason)
                message = "the request missed the server's deadline" if event.finish_reason == "timeout" else \
                    "generation failed; see the server log"
                yield _sse({"error": {"message": message, "type": "server_error", "param": None,
                                      "code": event.finish_reason}})
                yield _sse("[DONE]")
                return
        yield _sse(self.chunk({}, seq.finish_reason))
        if include_usage:
            usage = _usage(seq.prompt_tokens, seq.completion_tokens, seq.cached_tokens)
            yield _sse({**self.chunk({}), "choices": [], "usage": usage})
        yield _sse("[DONE]")
