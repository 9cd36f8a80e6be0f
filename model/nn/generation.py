"""Answering conversations with a trained checkpoint: batched greedy generation with the KV cache,
and a streaming variant yielding text as it is produced."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from threading import Thread

import torch
from transformers import TextIteratorStreamer

from model import runtime
from model.nn.checkpoint import TOKENIZER_DIR
from model.nn.devices import to_consumers
from model.nn.omni import OmniModel
from model.text.processor import ChatInput, OmniProcessor
from model.text.tokenizer import load_tokenizer, stop_ids


class OmniChat:
    def __init__(self, model: OmniModel, processor: OmniProcessor):
        self.model, self.processor = model.eval(), processor
        self.tok = processor.tok
        # The checkpoint's stop set (<|im_end|>, the tokenizer's and the LLM's own eos); older checkpoints: ours.
        # What `generate` stops on; the serving engine uses the same list.
        self.stop_ids: list[int] = list(model.stop_token_ids or stop_ids(self.tok))

    @classmethod
    def load(cls, path: str | Path) -> OmniChat:
        """The checkpoint on this process's device in its dtype (model.runtime: bf16 on a GPU)."""
        model = runtime.place(OmniModel.from_pretrained(path))
        return cls(model, OmniProcessor(load_tokenizer(Path(path) / TOKENIZER_DIR), model.cfg))

    def _inputs(self, batch: list[ChatInput]) -> dict:
        encoded = [self.processor.encode(item, add_generation_prompt=True) for item in batch]
        # Each on the device of the module that reads it: encoders may live elsewhere (Triton).
        tensors = to_consumers(self.model, self.processor.collate(encoded, left_pad=True))
        tensors.pop("labels")
        ids, mask = tensors.pop("input_ids"), tensors.pop("attention_mask")
        with torch.no_grad():
            embeds = self.model.embed(ids, **tensors)
        return {"inputs_embeds": embeds, "attention_mask": mask}

    def _generate_kwargs(self, max_new_tokens: int) -> dict:
        return {
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.tok.pad_token_id,
        }

    @torch.no_grad()
    def generate(self, batch: list[ChatInput], max_new_tokens: int = 32) -> list[str]:
        """Greedy answers, one per conversation (left-padded batch, KV-cached decoding)."""
        if not batch:
            return []
        out = self.model.llm.generate(**self._inputs(batch), **self._generate_kwargs(max_new_tokens))
        # With inputs_embeds only, generate returns just the new tokens.
        return [t.strip() for t in self.tok.batch_decode(out, skip_special_tokens=True)]

    def stream(self, item: ChatInput, max_new_tokens: int = 32) -> Iterator[str]:
        """Text deltas of one greedy answer as they are decoded."""
        streamer = TextIteratorStreamer(self.tok, skip_prompt=False, skip_special_tokens=True)
        kwargs = {**self._inputs([item]), **self._generate_kwargs(max_new_tokens), "streamer": streamer}
        thread = Thread(target=torch.no_grad()(self.model.llm.generate), kwargs=kwargs, daemon=True)
        thread.start()
        yield from (piece for piece in streamer if piece)
        thread.join()
