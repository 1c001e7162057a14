"""decode_image: any PIL mode to the model's uint8 crop, with exactly open_clip's eval geometry.

The reference is open_clip's own `image_transform(is_train=False)` applied to the same PIL
image; `normalize(decode_image(...))` must reproduce its tensor.
"""

from __future__ import annotations

import io
import tarfile
import warnings

import numpy as np
import open_clip
import pytest
from PIL import Image

from prune import schema
from prune.demo.shards import corrupt_jpeg, write_demo_shards
from prune.embed.decode import (
    PreprocessSpec,
    decode_batch,
    decode_image,
    normalize,
    to_rgb,
)

EXACT = 1e-5  # max abs difference of normalized tensors when both sides decode the same pixels


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def textured_rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    """Gradients + a periodic pattern + noise: every resampling error shows up."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    a = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), ((x + 2 * y) % 37) * 6.9], -1)
    a += rng.normal(0, 20, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def photo_like(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields with mild noise, like a photo (JPEG draft decoding's use case)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack(
        [128 + 100 * np.sin(x / 170 + y / 260), 128 + 90 * np.cos(y / 140 - x / 400), 60 + 150 * (x + y) / (w + h)],
        -1,
    )
    a += rng.normal(0, 6, a.shape).astype(np.float32)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def open_clip_tensor(img: Image.Image, spec: PreprocessSpec):
    tf = open_clip.image_transform(
        spec.size,
        is_train=False,
        mean=spec.mean,
        std=spec.std,
        resize_mode=spec.resize_mode,
        interpolation=spec.interpolation,
        fill_color=spec.fill_color,
    )
    return tf(img)


def ours(data: bytes, spec: PreprocessSpec, draft: bool = False):
    arr, status = decode_image(data, spec, draft=draft)
    assert status == schema.STATUS_OK
    assert arr.dtype == np.uint8 and arr.shape == (spec.size, spec.size, 3)
    return normalize(arr[None].copy(), spec)[0]


def max_diff(a, b) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def fmnist_jpegs(tmp_path_factory):
    """Real Fashion-MNIST JPEGs (28x28, mode L) as the demo shards store them."""
    out = tmp_path_factory.mktemp("fmnist")
    (tar_path,) = write_demo_shards(str(out), split="test", count=12, shard_size=12, seed=5)
    with tarfile.open(tar_path) as tar:
        return [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]


# --- geometry: the same tensor as open_clip ----------------------------------------------

SIZES = [
    (640, 480),  # wide
    (480, 640),  # tall
    (300, 300),  # square
    (28, 28),  # tiny, upscaled
    (1000, 150),  # very wide
    (151, 999),  # very tall, odd sides
    (225, 224),  # one pixel off the target
    (192, 105),  # "longest" lands on x.5: must round as open_clip does
    (320, 45),
    (97, 31),
]


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_geometry_matches_open_clip(resize_mode, interpolation):
    spec = PreprocessSpec(size=224, interpolation=interpolation, resize_mode=resize_mode)
    for i, (w, h) in enumerate(SIZES):
        data = encode(textured_rgb(w, h, seed=i), "PNG")
        ref = open_clip_tensor(Image.open(io.BytesIO(data)), spec)
        for draft in (False, True):  # draft only applies to JPEG: a PNG must be unaffected
            assert max_diff(ours(data, spec, draft), ref) < EXACT, (w, h, draft)


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_geometry_other_model_sizes_and_stats(resize_mode):
    spec = PreprocessSpec(size=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize_mode=resize_mode, fill_color=0)
    for i, (w, h) in enumerate([(500, 333), (333, 500), (256, 256), (40, 90)]):
        data = encode(textured_rgb(w, h, seed=10 + i), "PNG")
        ref = open_clip_tensor(Image.open(io.BytesIO(data)), spec)
        assert max_diff(ours(data, spec), ref) < EXACT, (w, h)


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_real_fashion_mnist_jpegs_match_open_clip(fmnist_jpegs, resize_mode):
    spec = PreprocessSpec(size=224, resize_mode=resize_mode)
    for data in fmnist_jpegs:
        img = Image.open(io.BytesIO(data))
        assert img.mode == "L" and img.size == (28, 28)
        ref = open_clip_tensor(img, spec)
        for draft in (False, True):  # smaller than the crop: draft must not change anything
            assert max_diff(ours(data, spec, draft), ref) < EXACT


def test_rgb_jpeg_and_webp_match_open_clip():
    spec = PreprocessSpec(size=224)
    for fmt in ("JPEG", "WEBP"):
        data = encode(textured_rgb(410, 300, seed=3), fmt, quality=90)
        ref = open_clip_tensor(Image.open(io.BytesIO(data)), spec)
        assert max_diff(ours(data, spec, draft=False), ref) < EXACT, fmt


# --- draft decoding ----------------------------------------------------------------------

# Measured on these images: mean abs diff 0.11-0.61 uint8 levels, 99th percentile <= 2,
# max <= 5 (all modes, both interpolations). The bounds leave about 2x margin.
DRAFT_MEAN_BOUND = 1.5
DRAFT_P99_BOUND = 4


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("w, h", [(1600, 1200), (1200, 1600), (2000, 900), (1023, 769)])
def test_draft_close_to_full_decode(resize_mode, w, h):
    data = encode(photo_like(w, h, seed=w), "JPEG", quality=90)
    spec = PreprocessSpec(size=224, resize_mode=resize_mode)
    fast, s1 = decode_image(data, spec, draft=True)
    full, s2 = decode_image(data, spec, draft=False)
    assert s1 == s2 == schema.STATUS_OK
    assert fast.shape == full.shape == (224, 224, 3)
    diff = np.abs(fast.astype(np.int16) - full.astype(np.int16))
    assert (diff > 0).any()  # the draft path really ran (DCT-scaled decode is not bit-identical)
    assert diff.mean() < DRAFT_MEAN_BOUND
    assert np.percentile(diff, 99) <= DRAFT_P99_BOUND
    # and the full decode is open_clip's tensor
    ref = open_clip_tensor(Image.open(io.BytesIO(data)), spec)
    assert max_diff(normalize(full[None].copy(), spec)[0], ref) < EXACT


def test_draft_never_goes_below_the_crop_size():
    """A JPEG just over 2x the crop on its short side may be halved, never more.

    Odd sides are the worst case for draft: the DCT-scaled image is ceil(w/2) x ceil(h/2), so
    its aspect ratio, hence the resized long side, is a little off (995 vs 997 px for 449x2000).
    Measured: mean abs diff 2.0 levels for 449x2000 "shortest", 0.6 for 900x900.
    """
    spec = PreprocessSpec(size=224)
    for w, h in [(449, 2000), (2000, 449), (900, 900)]:
        data = encode(photo_like(w, h), "JPEG", quality=90)
        img = Image.open(io.BytesIO(data))
        img.draft(None, (spec.size, spec.size))
        assert img.size != (w, h) and min(img.size) >= spec.size
        fast, _ = decode_image(data, spec, draft=True)
        full, _ = decode_image(data, spec, draft=False)
        assert np.abs(fast.astype(np.int16) - full.astype(np.int16)).mean() < 3.0


# --- every PIL mode that matters ------------------------------------------------------------

H, W = 40, 60
_Y, _X = np.mgrid[0:H, 0:W]
GRAY = (_X * 255 / (W - 1)).round().astype(np.uint8)  # horizontal ramp 0..255


def _mode_cases():
    g = GRAY
    rgb = np.dstack([g, 255 - g, (g // 2)])
    palette = Image.fromarray(rgb).convert("P")
    return {
        "L": (Image.fromarray(g, "L"), "PNG", {}),
        "1": (Image.fromarray(g > 127).convert("1"), "PNG", {}),
        "P": (palette, "PNG", {}),
        "P+transparency": (palette, "PNG", {"transparency": 0}),
        "RGBA": (Image.fromarray(np.dstack([rgb, 255 - g])), "PNG", {}),
        "LA": (Image.fromarray(np.dstack([g, 255 - g]), "LA"), "PNG", {}),
        "CMYK": (Image.merge("CMYK", [Image.fromarray(v) for v in (g, 255 - g, g // 2, g // 4)]), "JPEG", {"quality": 95}),
        "I;16": (Image.fromarray((_X * 65535 // (W - 1)).astype(np.uint16)), "PNG", {}),
        "I": (Image.fromarray((_X * 65535 // (W - 1)).astype(np.int32), "I"), "TIFF", {}),
        "F": (Image.fromarray((_X / (W - 1)).astype(np.float32), "F"), "TIFF", {}),
        "RGB": (Image.fromarray(rgb), "PNG", {}),
        "RGB webp": (Image.fromarray(rgb), "WEBP", {"lossless": True}),
    }


MODE_CASES = _mode_cases()


@pytest.mark.parametrize("name", list(MODE_CASES))
@pytest.mark.parametrize("resize_mode", ["shortest", "longest"])
def test_every_mode_decodes_to_rgb_uint8(name, resize_mode):
    img, fmt, options = MODE_CASES[name]
    data = encode(img, fmt, **options)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == name.split("+")[0].split(" ")[0]  # the file really carries that mode
    spec = PreprocessSpec(size=32, resize_mode=resize_mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's palette-transparency warning
        arr, status = decode_image(data, spec)
    assert status == schema.STATUS_OK
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    assert arr.max() > arr.min()  # the content survived, not a blank frame
    # geometry: the same as open_clip on the RGB conversion of the same picture
    rgb = to_rgb(Image.open(io.BytesIO(data)))
    assert rgb.mode == "RGB"
    assert max_diff(normalize(arr[None].copy(), spec)[0], open_clip_tensor(rgb, spec)) < EXACT


@pytest.mark.parametrize("name", ["L", "LA", "I;16", "I", "F"])
def test_gray_modes_keep_their_values(name):
    """High-bit and float images are scaled to 0..255, not clipped: they look like the 8-bit ramp."""
    spec = PreprocessSpec(size=32, resize_mode="squash")
    expected, _ = decode_image(encode(Image.fromarray(GRAY, "L"), "PNG"), spec)
    img, fmt, options = MODE_CASES[name]
    arr, status = decode_image(encode(img, fmt, **options), spec)
    assert status == schema.STATUS_OK
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert np.abs(arr.astype(int) - expected.astype(int)).max() <= 2


def test_sixteen_bit_png_is_not_clipped_white():
    img, fmt, options = MODE_CASES["I;16"]
    arr, _ = decode_image(encode(img, fmt, **options), PreprocessSpec(size=32, resize_mode="squash"))
    assert (arr == 255).mean() < 0.1 and arr[:, :4].mean() < 30  # dark on the left, as the source


def test_cmyk_jpeg_converts_like_pil():
    img, fmt, options = MODE_CASES["CMYK"]
    data = encode(img, fmt, **options)
    spec = PreprocessSpec(size=32, resize_mode="squash")
    arr, _ = decode_image(data, spec)
    reference = Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
    assert np.array_equal(arr, np.asarray(reference))


# --- failures get a reason --------------------------------------------------------------------


def test_empty_bytes():
    assert decode_image(b"", PreprocessSpec()) == (None, schema.STATUS_EMPTY)


@pytest.mark.parametrize(
    "data",
    [b"<html><body>404 Not Found</body></html>\n", b"\x00" * 100, b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"],
)
def test_not_an_image(data):
    assert decode_image(data, PreprocessSpec()) == (None, schema.STATUS_UNDECODABLE)


def test_truncated_jpeg(fmnist_jpegs):
    big = encode(photo_like(300, 200), "JPEG", quality=90)
    for data in (fmnist_jpegs[0], big):
        assert decode_image(data, PreprocessSpec())[1] == schema.STATUS_OK
        for draft in (True, False):
            assert decode_image(corrupt_jpeg(data), PreprocessSpec(), draft=draft) == (None, schema.STATUS_UNDECODABLE)
        assert decode_image(data[: len(data) // 3], PreprocessSpec())[1] == schema.STATUS_UNDECODABLE


def test_decompression_bomb():
    data = encode(Image.new("L", (2000, 2000), 7), "PNG")  # 4M pixels, a few KB of PNG
    before = Image.MAX_IMAGE_PIXELS
    assert decode_image(data, PreprocessSpec(size=32), max_pixels=1000) == (None, schema.STATUS_BOMB)
    # PIL only warns between 1x and 2x its limit; that must count as a bomb too
    warn_zone = encode(Image.new("L", (40, 40), 7), "PNG")  # 1,600 pixels
    assert decode_image(warn_zone, PreprocessSpec(size=32), max_pixels=1000) == (None, schema.STATUS_BOMB)
    assert decode_image(warn_zone, PreprocessSpec(size=32), max_pixels=1600)[1] == schema.STATUS_OK
    assert decode_image(data, PreprocessSpec(size=32), max_pixels=4_000_000)[1] == schema.STATUS_OK
    # PIL's limit is process-wide: decoding must leave it as it found it
    assert Image.MAX_IMAGE_PIXELS == before


def test_decode_batch_keeps_earlier_failures_and_zero_fills(fmnist_jpegs):
    spec = PreprocessSpec(size=32)
    images = [fmnist_jpegs[0], b"", b"not an image", fmnist_jpegs[1], fmnist_jpegs[2]]
    statuses = [schema.STATUS_OK, schema.STATUS_OK, schema.STATUS_OK, schema.STATUS_OK, schema.STATUS_NO_IMAGE]
    pixels, out = decode_batch(images, statuses, spec, draft=True, max_pixels=10**8)
    assert pixels.shape == (5, 32, 32, 3) and pixels.dtype == np.uint8
    assert out == [schema.STATUS_OK, schema.STATUS_EMPTY, schema.STATUS_UNDECODABLE, schema.STATUS_OK, schema.STATUS_NO_IMAGE]
    assert np.array_equal(pixels[0], decode_image(fmnist_jpegs[0], spec)[0])
    assert np.array_equal(pixels[3], decode_image(fmnist_jpegs[1], spec)[0])
    assert not pixels[[1, 2, 4]].any()
    assert statuses[1] == schema.STATUS_OK  # the caller's list is not modified


def test_normalize_matches_open_clip_normalize():
    spec = PreprocessSpec()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    x = normalize(pixels, spec)
    assert tuple(x.shape) == (3, 3, 8, 8)
    for i in range(3):
        ref = open_clip_tensor(Image.fromarray(pixels[i]), PreprocessSpec(size=8, mean=spec.mean, std=spec.std))
        assert max_diff(x[i], ref) < EXACT
