"""The conversation of a realtime session: its items (user turns with text, audio and images; the
assistant's answers; system text) and how they become the predictor's neutral `Conversation`."""

from __future__ import annotations

from dataclasses import dataclass, field

from model.media.decode import wav_bytes
from model.media.tags import TAG_PATTERN
from serving.conversation import BadRequest, Conversation, MediaItem, decode_data_uri
from serving.protocol.realtime.audio import decode_pcm16
from serving.protocol.realtime.events import InputAudio, InputImage, InputText, MessageItem, message_item


@dataclass
class Item:
    id: str
    role: str
    text: str  # with <audio>/<image> tags where the media go
    media: list[MediaItem] = field(default_factory=list)
    content: list[dict] = field(default_factory=list)  # as the client sees it (no audio bytes echoed)

    def public(self) -> dict:
        return message_item(self.id, self.role, self.content)


def _text(text: str, field: str) -> str:
    # The tokenizer would read a literal tag as a media slot.
    if found := TAG_PATTERN.search(text):
        raise BadRequest(f"{field}: literal {found.group(0)} in text; send media as their own content parts", field)
    return text


def from_client(item_id: str, msg: MessageItem, rate: int) -> Item:
    """A `conversation.item.create` message -> an item; audio parts are PCM16 at the session's rate."""
    if msg.role != "user" and any(not isinstance(p, InputText) for p in msg.content):
        raise BadRequest(f"item.content: a {msg.role} message holds text only", "item.content")
    item = Item(item_id, msg.role, "")
    for j, part in enumerate(msg.content):
        where = f"item.content[{j}]"
        if isinstance(part, InputText):
            item.text += ("\n" if item.text and not item.text.endswith(">") else "") + _text(part.text, f"{where}.text")
            item.content.append({"type": part.type, "text": part.text})
        elif isinstance(part, InputAudio):
            samples = decode_pcm16(part.audio, f"{where}.audio")
            item.media.append(MediaItem("audio", wav_bytes(samples, rate), f"{where}.audio"))
            item.text += "<audio>"
            item.content.append({"type": "input_audio", "transcript": part.transcript})
        elif isinstance(part, InputImage):
            field = f"{where}.image_url"
            item.media.append(MediaItem("image", decode_data_uri(part.image_url, field), field))
            item.text += "<image>"
            item.content.append({"type": "input_image", "detail": part.detail})
    return item


def spoken(item_id: str, wav: bytes) -> Item:
    """A user turn from the committed input audio buffer."""
    return Item(item_id, "user", "<audio>", [MediaItem("audio", wav, "input_audio_buffer")],
                [{"type": "input_audio", "transcript": None}])


def answer(item_id: str, text: str) -> Item:
    return Item(item_id, "assistant", text, content=[{"type": "output_text", "text": text}])


def to_conversation(items: list[Item], instructions: str, caps: dict[str, int]) -> Conversation:
    """The latest items whose media fit the per-conversation caps (older turns fall out of the window,
    whole, and the window opens with a user turn), after the instructions as the system message."""
    kept, used = [], dict.fromkeys(caps, 0)
    for item in reversed(items):
        counts = {kind: sum(m.kind == kind for m in item.media) for kind in caps}
        if any(used[k] + n > caps[k] for k, n in counts.items()):
            break
        used = {k: used[k] + counts[k] for k in caps}
        kept.append(item)
    kept.reverse()
    while kept and kept[0].role == "assistant":  # a conversation opens with a user (or system) turn
        kept.pop(0)
    messages = [{"role": "system", "content": instructions}] if instructions else []
    messages += [{"role": it.role, "content": it.text} for it in kept]
    return Conversation(messages, [m for it in kept for m in it.media], "conversation")
