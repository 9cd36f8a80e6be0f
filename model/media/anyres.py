"""AnyRes: cut an image into a grid of encoder-sized tiles plus a downsampled thumbnail.

The grid is chosen from a configured set (the paper does not publish its own): the one that keeps
the most of the image's real resolution once the image is scaled to fit it, ties broken by the
least padding. Resolution a grid would only gain by upscaling does not count, so a small image stays
one tile instead of being blown up across four.
"""

from __future__ import annotations

from PIL import Image

# Gray: zero after SigLIP's (x - 0.5) / 0.5 normalisation, so padding looks like "no signal".
PAD_COLOR = (127, 127, 127)


def select_grid(width: int, height: int, tile: int, grids: list[tuple[int, int]]) -> tuple[int, int]:
    """The (columns, rows) grid from `grids` that best fits a `width` x `height` image."""
    if width < 1 or height < 1:
        raise ValueError(f"image has no pixels ({width}x{height})")
    best, best_key = None, None
    for cols, rows in grids:
        canvas_w, canvas_h = cols * tile, rows * tile
        scale = min(canvas_w / width, canvas_h / height)
        kept = min(width * height * scale * scale, width * height)  # upscaling adds no information
        wasted = canvas_w * canvas_h - kept
        key = (-kept, wasted)
        if best_key is None or key < best_key:
            best, best_key = (cols, rows), key
    return best


def fit_to_canvas(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale `image` to fit `width` x `height` keeping its aspect ratio; centre it on gray padding."""
    scale = min(width / image.width, height / image.height)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("RGB", (width, height), PAD_COLOR)
    canvas.paste(image.convert("RGB").resize((w, h), Image.BICUBIC), ((width - w) // 2, (height - h) // 2))
    return canvas


def tile_image(
    image: Image.Image, tile: int, grids: list[tuple[int, int]]
) -> tuple[tuple[int, int], list[Image.Image]]:
    """-> (grid, images): for one tile, the image itself fitted to a tile; otherwise the thumbnail
    (the whole image fitted to one tile) followed by the tiles in row-major order."""
    cols, rows = select_grid(image.width, image.height, tile, grids)
    if (cols, rows) == (1, 1):
        return (1, 1), [fit_to_canvas(image, tile, tile)]
    canvas = fit_to_canvas(image, cols * tile, rows * tile)
    tiles = [
        canvas.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)
    ]
    return (cols, rows), [fit_to_canvas(image, tile, tile), *tiles]
