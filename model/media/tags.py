"""The media tag syntax shared by records, the chat processor, the predictor and the Triton entry model:
`<image>`, `<video>` and `<audio>` in message text stand for the conversation's media, in order."""

from __future__ import annotations

import re

MEDIA_KINDS = ("image", "video", "audio")  # also the order of tags prepended to text that has none
MEDIA_TAGS = {kind: f"<{kind}>" for kind in MEDIA_KINDS}
TAG_PATTERN = re.compile(r"<(image|video|audio)>")
# Anything that looks like a media tag but is not one of ours, e.g. "<img>" or "<speech>".
UNKNOWN_TAG_PATTERN = re.compile(r"<(img|picture|photo|vid|clip|speech|sound|wav)>", re.IGNORECASE)


def tag_missing_media(text: str, counts: dict[str, int]) -> str:
    """Prepend a tag for every media item of a kind the text does not mention at all (a request
    that sends an image without writing `<image>`); text that does tag a kind is left as it is."""
    tagged = set(TAG_PATTERN.findall(text))
    return "".join(MEDIA_TAGS[kind] * counts.get(kind, 0) for kind in MEDIA_KINDS if kind not in tagged) + text
