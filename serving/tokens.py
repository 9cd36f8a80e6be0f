"""A generated token's exact text: byte-level BPE tokens may hold part of a UTF-8 character, so a
token's bytes come from its printable stand-ins, not from decoding it alone."""

from __future__ import annotations


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for the 256 bytes (GPT-2's table), reversed."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


_BYTES = _byte_decoder()


def token_bytes(tok, token_id: int) -> tuple[str, list[int]]:
    """A token's text and its exact UTF-8 bytes (a byte-level token may hold part of a character)."""
    piece = tok.convert_ids_to_tokens(token_id) or ""
    if piece and all(ch in _BYTES for ch in piece):
        raw = bytes(_BYTES[ch] for ch in piece)
        return raw.decode("utf-8", errors="replace"), list(raw)
    text = tok.decode([token_id])
    return text, list(text.encode("utf-8"))
