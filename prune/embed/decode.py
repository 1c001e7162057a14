"""Decode and preprocess image bytes on CPU, with the model's own geometry.

The result is the model's input crop as uint8 HWC; normalization (mean/std) is left to the
model stage, where it is one cheap tensor op and the batch travels at a quarter of the size.
JPEGs are decoded in draft mode straight to the smallest DCT scale that still covers the
crop, which skips most of the decode work for large photos. Any mode PIL can open is
converted, and a sample that cannot be decoded gets a reason instead of an exception.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from prune import schema

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class PreprocessSpec:
    """The model's eval preprocessing: what open_clip's `image_transform(is_train=False)` does."""

    size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # shortest (resize + center crop), longest (pad), squash
    fill_color: int = 0
    crop_pct: float = 1.0  # timm: resize the shorter side to floor(size / crop_pct), then crop


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit and float scaled, palette via RGBA, CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max(initial=0.0)
        if peak > 255.0:
            arr = arr / (65535.0 if peak <= 65535.0 else peak) * 255.0
        elif img.mode == "F" and peak <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


_MAX_RESIZED_AREA = 16  # resized image area, in crops, above which only the crop is resampled
# formats an image member may be in; others (EPS runs Ghostscript, ...) are never opened
DECODABLE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")


def _resize_and_crop(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    size = spec.size
    resample = _RESAMPLE[spec.interpolation]
    w, h = img.size
    if spec.resize_mode == "squash":
        return img.resize((size, size), resample)
    if spec.resize_mode == "longest":
        # open_clip's ResizeKeepRatio(longest=1): divide by the ratio, not multiply by its
        # inverse, or sides that land on x.5 round the other way
        ratio = max(w / size, h / size)
        nw, nh = max(1, round(w / ratio)), max(1, round(h / ratio))
        canvas = Image.new("RGB", (size, size), (spec.fill_color,) * 3)
        canvas.paste(img.resize((nw, nh), resample), ((size - nw) // 2, (size - nh) // 2))
        return canvas
    # "shortest", as torchvision's Resize(int) then CenterCrop
    scale = size if spec.crop_pct == 1.0 else int(math.floor(size / spec.crop_pct))
    if w <= h:
        nw, nh = scale, int(scale * h / w)
    else:
        nw, nh = int(scale * w / h), scale
    left = int(round((nw - size) / 2.0))
    top = int(round((nh - size) / 2.0))
    if nw * nh > _MAX_RESIZED_AREA * size * size:
        # a banner-like image (e.g. 65535x1) would be resized to gigabytes before the crop:
        # resample only the source region the crop covers (same filter, same geometry)
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return img.resize((size, size), resample, box=box)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    return img.crop((left, top, left + size, top + size))


def decode_image(
    data: bytes, spec: PreprocessSpec, draft: bool = True, max_pixels: int = 89_478_485
) -> tuple[np.ndarray | None, str]:
    """Bytes -> (uint8 [size, size, 3] crop, "ok") or (None, failure reason)."""
    if not data:
        return None, schema.STATUS_EMPTY
    previous_limit = Image.MAX_IMAGE_PIXELS  # PIL's limit is process-wide: restore it after
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=DECODABLE_FORMATS)
            if draft and img.format == "JPEG":
                img.draft(None, (spec.size, spec.size))
            img.load()
            rgb = to_rgb(img)
            out = _resize_and_crop(rgb, spec)
        return np.asarray(out, dtype=np.uint8), schema.STATUS_OK
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, schema.STATUS_BOMB
    except Exception:  # PIL raises many types on malformed files (struct.error, IndexError, ...)
        return None, schema.STATUS_UNDECODABLE
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit


def decode_batch(
    images: list, statuses: list, spec: PreprocessSpec, draft: bool, max_pixels: int
) -> tuple[np.ndarray, list[str]]:
    """Decode a batch; rows that fail (or failed before) get a zero crop and their reason."""
    pixels = np.zeros((len(images), spec.size, spec.size, 3), dtype=np.uint8)
    out_status = list(statuses)
    for i, (data, status) in enumerate(zip(images, statuses)):
        if status != schema.STATUS_OK:
            continue
        arr, out_status[i] = decode_image(data, spec, draft, max_pixels)
        if arr is not None:
            pixels[i] = arr
    return pixels, out_status


def normalize(pixels_uint8, spec: PreprocessSpec, device: str = "cpu"):
    """uint8 NHWC numpy -> float32 NCHW torch tensor on `device`, normalized as the model expects.

    The uint8 batch is moved first, so a GPU receives a quarter of the bytes of a float batch, from
    pinned (page-locked) memory so the copy is a real asynchronous DMA; normalization runs there.
    """
    import torch

    arr = np.ascontiguousarray(pixels_uint8)
    if not arr.flags.writeable:  # Ray hands batches over read-only; torch wants to own writable memory
        arr = arr.copy()
    x = torch.from_numpy(arr)
    if str(device).startswith("cuda"):
        x = x.pin_memory()  # non_blocking only overlaps the copy from page-locked memory
    x = x.to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)
