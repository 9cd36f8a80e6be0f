"""The engine's prefix cache: a prompt that starts like a finished one takes its keys and values, and
answers exactly as without the cache (greedy, compared with `OmniChat.generate`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import EngineConfig
from model.nn.engine import GenerationEngine, Sequence
from model.nn.generation import OmniChat
from model.nn.omni import OmniModel
from model.nn.prefix_cache import prompt_key
from model.nn.sampling import SamplingParams
from model.text.processor import ChatInput, OmniProcessor
from tests.model.nn.test_engine import _audio, _image

TOKENS = 8


@pytest.fixture(scope="module")
def chat(tiny_cfg, tokenizer) -> OmniChat:
    processor = OmniProcessor(tokenizer, tiny_cfg)
    torch.manual_seed(0)
    return OmniChat(OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids), processor)


def _ask(engine: GenerationEngine, chat: OmniChat, item: ChatInput) -> Sequence:
    encoded = chat.processor.encode(item, add_generation_prompt=True)
    [seq] = engine.run_until_done([Sequence(encoded, SamplingParams(max_new_tokens=TOKENS))])
    return seq


def _alone(chat: OmniChat, item: ChatInput) -> str:
    return chat.generate([item], max_new_tokens=TOKENS)[0]


def _image_question(seed: int, text: str = "describe") -> ChatInput:
    return ChatInput([{"role": "system", "content": "be brief"}, {"role": "user", "content": f"<image>{text}"}],
                     images=[_image(seed)])


@pytest.mark.parametrize("together", [1, 2], ids=["taken-over", "copied-to-a-lower-empty-slot"])
def test_a_repeated_question_reuses_all_but_its_last_token_and_skips_the_encoders(chat, encoder_calls, together):
    """Asked once, the question's entry sits in slot 0 and the next ask takes that slot over. Asked twice
    at once, the two answers end in slots 0 and 1, the entry in 0 is dropped as a duplicate, and the next
    ask gets a copy of slot 1 in slot 0 (low slots keep decode narrow)."""
    engine = GenerationEngine(chat, EngineConfig(max_batch_size=4))
    copies = []
    real_copy = engine.kv.copy_prefix
    engine.kv.copy_prefix = lambda *a: copies.append(a) or real_copy(*a)
    item = _image_question(1)
    encoded = chat.processor.encode(item, add_generation_prompt=True)
    first = engine.run_until_done([Sequence(encoded, SamplingParams(max_new_tokens=TOKENS)) for _ in range(together)])
    assert [s.cached_tokens for s in first] == [0] * together and encoder_calls["image"] == 1
    assert list(engine.prefixes.entries) == [together - 1]
    again = _ask(engine, chat, item)
    assert again.cached_tokens == again.prompt_tokens - 1
    assert copies == ([] if together == 1 else [(1, 0, again.cached_tokens)])
    assert encoder_calls["image"] == 1  # every image placeholder lies in the reused prefix
    assert again.text.strip() == first[0].text.strip() == _alone(chat, item)


def test_other_media_with_the_same_words_reuse_only_what_precedes_the_media(chat, encoder_calls):
    """The placeholders' ids are the same for every image or sound: their keys are the media's digest,
    so a different picture never gets the first one's keys and values."""
    engine = GenerationEngine(chat, EngineConfig(max_batch_size=4))
    for make in (lambda seed: _image_question(seed),
                 lambda seed: ChatInput([{"role": "user", "content": "<audio>transcribe the audio"}],
                                        audios=[_audio(0.8 + 0.3 * seed)])):
        first, other = make(1), make(2)
        _ask(engine, chat, first)
        seq = _ask(engine, chat, other)
        media_at = int(np.flatnonzero(seq.key < 0)[0])
        assert 0 < seq.cached_tokens <= media_at
        assert encoder_calls["image"] + encoder_calls["audio"] == 2  # the second one's media were encoded
        assert seq.text.strip() == _alone(chat, other)
        encoder_calls.update(image=0, audio=0)


def test_the_next_turn_of_a_chat_reuses_the_previous_turn(chat, encoder_calls):
    engine = GenerationEngine(chat, EngineConfig(max_batch_size=4))
    turn1 = _image_question(3, "what is it")
    answer = _ask(engine, chat, turn1)
    turn2 = ChatInput([*turn1.messages, {"role": "assistant", "content": answer.text.strip()},
                       {"role": "user", "content": "and its color?"}], images=turn1.images)
    seq = _ask(engine, chat, turn2)
    assert seq.cached_tokens >= answer.prompt_tokens  # the whole first prompt, and what of the answer tokenises alike
    assert encoder_calls["image"] == 1
    assert seq.text.strip() == _alone(chat, turn2)


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_a_turn_that_adds_media_still_reuses_the_turns_before(chat, kind):
    """Each placeholder's key is its own item's digest chained to the items before it: a second image
    (or a voice session's next utterance) leaves the first one's columns reusable."""
    def media(seed: int) -> dict:
        return {"images": [_image(seed)]} if kind == "image" else {"audios": [_audio(0.6 + 0.2 * seed)]}

    tag = f"<{kind}>"
    engine = GenerationEngine(chat, EngineConfig(max_batch_size=4))
    turn1 = ChatInput([{"role": "user", "content": f"{tag}first"}], **media(1))
    answer = _ask(engine, chat, turn1)
    both = {k: media(1)[k] + media(2)[k] for k in media(1)}
    turn2 = ChatInput([*turn1.messages, {"role": "assistant", "content": answer.text.strip()},
                       {"role": "user", "content": f"and {tag} this?"}], **both)
    seq = _ask(engine, chat, turn2)
    assert seq.cached_tokens >= answer.prompt_tokens
    assert seq.text.strip() == _alone(chat, turn2)


def test_least_recently_used_entries_make_room_and_a_running_batch_is_unaffected(chat):
    """Two slots, three prompts: the third takes the slot of the entry it does not match, the least
    recently used (its match, the first, was just used for the shared start); a full hit then takes
    over its own entry and evicts nothing; prompts answered together with hits and misses mixed still
    answer as alone."""
    engine = GenerationEngine(chat, EngineConfig(max_batch_size=2))
    items = [_image_question(seed, text) for seed, text in ((4, "one"), (5, "two"), (6, "three"))]
    for item in items:
        _ask(engine, chat, item)
    assert len(engine.prefixes) == 2
    hits = [_ask(engine, chat, item) for item in items]
    assert [s.cached_tokens == s.prompt_tokens - 1 for s in hits] == [True, False, True]

    mixed = [items[0], items[1], _image_question(7), items[2]]
    seqs = engine.run_until_done([Sequence(chat.processor.encode(it, add_generation_prompt=True),
                                           SamplingParams(max_new_tokens=TOKENS)) for it in mixed])
    assert any(s.cached_tokens == s.prompt_tokens - 1 for s in seqs)
    assert [s.text.strip() for s in seqs] == [_alone(chat, it) for it in mixed]


def test_a_failed_sequence_leaves_no_entry_and_the_cache_can_be_switched_off(chat, monkeypatch):
    engine = GenerationEngine(chat, EngineConfig(max_batch_size=2))
    real = engine.decode_forward
    monkeypatch.setattr(engine, "decode_forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    failed = _ask(engine, chat, _image_question(8))
    assert failed.finish_reason == "error" and len(engine.prefixes) == 0
    monkeypatch.setattr(engine, "decode_forward", real)
    assert _ask(engine, chat, _image_question(8)).cached_tokens == 0

    off = GenerationEngine(chat, EngineConfig(max_batch_size=2, prefix_cache=False))
    item = _image_question(9)
    assert [_ask(off, chat, item).cached_tokens for _ in range(2)] == [0, 0] and off.prefixes is None


def test_prompt_keys_differ_exactly_where_the_media_differ(chat):
    encode = chat.processor.encode
    a, b, c = (prompt_key(encode(_image_question(seed), add_generation_prompt=True), chat.processor)
               for seed in (1, 1, 2))
    assert np.array_equal(a, b)
    differ = a != c
    assert differ.any() and (a[differ] < 0).all() and (c[differ] < 0).all()
    assert (a[~differ] == c[~differ]).all()
