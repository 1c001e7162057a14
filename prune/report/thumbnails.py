"""Small pictures for the report, embedded in the page as data URIs so it reads offline."""

from __future__ import annotations

import base64
import io

from PIL import Image

THUMB = 64  # pixels, the longer side


def thumbnail_uri(image_bytes: bytes, size: int = THUMB) -> str | None:
    """A JPEG data URI of the image scaled to `size` (None: the bytes do not decode)."""
    try:
        with Image.open(io.BytesIO(image_bytes)) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size), Image.Resampling.BICUBIC if size < max(im.size) else Image.Resampling.NEAREST)
            if max(im.size) < size:  # tiny images (28 px): scale up so they can be seen
                scale = size / max(im.size)
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.NEAREST)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=85)
    except Exception:  # noqa: BLE001 - a bad image is left out of the page, not fatal
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def png_uri(png_bytes: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes).decode()
