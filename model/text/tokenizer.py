"""Tokenizer: a checkpoint's own, or a byte-level BPE trained locally in seconds (tiny/small).

Special tokens follow the paper's interleaving scheme: ChatML turn markers plus a start /
placeholder / end token per modality, and image tile/row separators for AnyRes layouts. Each is one
id, so the processor can expand a media tag into exactly as many placeholders as the encoder produces.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

IM_START, IM_END, EOS = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
MEDIA_SPECIAL = {
    "image": ("<img_start>", "<img_pad>", "<img_end>"),
    "video": ("<video_start>", "<video_pad>", "<video_end>"),
    "audio": ("<audio_start>", "<audio_pad>", "<audio_end>"),
}
# AnyRes layout: a tile separator between tiles of one row, a row separator after the thumbnail and
# between rows, so the LLM can tell a 2x1 grid from a 1x2 one.
IMG_TILE_SEP, IMG_ROW_SEP = "<img_tile_sep>", "<img_row_sep>"
SPECIAL_TOKENS = [
    EOS,
    IM_START,
    IM_END,
    *(t for triple in MEDIA_SPECIAL.values() for t in triple),
    IMG_TILE_SEP,
    IMG_ROW_SEP,
]

# ChatML, the template Qwen2 checkpoints ship; media tags stay literal text in the template and are
# expanded to placeholder runs by the processor.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Role names, digits and letters appear in every prompt: a tokenizer trained here always sees them.
BASE_CORPUS = ["system user assistant", "0123456789 ABCD abcdefghijklmnopqrstuvwxyz"]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (every byte is in the base alphabet, so nothing is OOV)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=EOS, bos_token=None, unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    return with_special_tokens(AutoTokenizer.from_pretrained(str(path)))


def with_special_tokens(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """A checkpoint's tokenizer with our special tokens (a Qwen2 tokenizer lacks the media ones: they
    are appended, after its own ids), a pad token, and ChatML when it has no chat template."""
    missing = [t for t in SPECIAL_TOKENS if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        tok.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if tok.pad_token is None:
        tok.pad_token = EOS
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def special_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    return {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def stop_ids(tok: PreTrainedTokenizerFast, checkpoint_eos: Iterable[int] = ()) -> list[int]:
    """Where generation ends: `<|im_end|>` (our turn end), the tokenizer's eos and the checkpoint's
    own eos ids (config.json / generation_config.json), so a base model's eos and ChatML both stop it."""
    ids = [tok.convert_tokens_to_ids(IM_END), tok.eos_token_id, *checkpoint_eos]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))
