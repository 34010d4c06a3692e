"""One sample's members, decoded: a clean caption and an image fitted to a size (no Ray here).

What the shard reader (`pipeline.data.reader`) calls for every sample, and what anything else that
turns image bytes into pixels calls (the served model's inputs, the tests): JPEG, PNG or WebP only,
whatever the extension says; the pixel count checked on the header before any pixel is decoded;
transparency on white; the centred box of the target's aspect resized in one pass.
"""

from __future__ import annotations

import io
import math
import re
import unicodedata
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.buckets import Size, fit_to_bucket, nearest_bucket

# The decoders tried, whatever the extension says (PNG bytes under .jpg are common in scraped data);
# anything else (GIF, BMP, TIFF, ...) is `not_an_image`, which also keeps PIL's rarer parsers away
# from untrusted bytes.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
# Decompression-bomb guard (data.max_image_pixels): PIL's own default warning threshold, 89.5 MP.
MAX_IMAGE_PIXELS = 89_478_485

SKIP_REASONS = (
    "corrupt_image",
    "zero_byte",
    "not_an_image",
    "too_many_pixels",
    "missing_image",
    "caption_not_utf8",
    "missing_caption",
    "truncated_tar",
    "out_of_order",
    "duplicate_key",
)


class SampleError(ValueError):
    """A sample that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def clean_caption(text: str) -> str:
    """Unicode NFC, strip, collapse runs of whitespace."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()


def decode_caption(data: bytes) -> str:
    """Caption bytes -> clean text ("" for an unconditional sample); SampleError if not UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SampleError("caption_not_utf8", str(err)) from None
    return clean_caption(text.replace("\ufeff", " "))  # a byte-order mark is not part of the text


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparent pixels become white (dropping alpha would show arbitrary colours)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(data: bytes, image_size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode JPEG/PNG/WebP bytes, resize the shorter side to `image_size`, center-crop: (S, S, 3) uint8."""
    return load_fitted(data, [(image_size, image_size)], max_pixels)[0]


def load_fitted(data: bytes, sizes: list[Size], max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[np.ndarray, float]:
    """Decode JPEG/PNG/WebP bytes into the size of `sizes` ((width, height) buckets) nearest the
    image's aspect: the centred box of that aspect, resized in one pass.

    Returns ((h, w, 3) uint8, the fraction of the image's pixels cropped off); raises SampleError
    (zero_byte, not_an_image, too_many_pixels, corrupt_image). The pixel limit is checked on the
    header, before any pixel is decoded.
    """
    if not data:
        raise SampleError("zero_byte")
    with warnings.catch_warnings():
        # PIL warns above its own limit and refuses above twice that; `max_pixels` decides here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as err:
            raise SampleError("too_many_pixels", str(err)) from None
        except UnidentifiedImageError:
            raise SampleError("not_an_image") from None
        except Exception as err:  # noqa: BLE001 - a recognised format with a broken header
            raise SampleError("corrupt_image", f"{type(err).__name__}: {err}") from None
    with img:
        w, h = img.size
        if w * h > max_pixels:
            raise SampleError("too_many_pixels", f"{w}x{h} is over {max_pixels} pixels")
        if min(w, h) < 1:
            raise SampleError("corrupt_image", f"size {w}x{h}")
        bucket = nearest_bucket(w, h, sizes)
        crop = fit_to_bucket(w, h, bucket).crop
        try:
            if (w, h) != bucket:
                # JPEG: decode at the smallest DCT scale still >= the target (much faster on photos).
                scale = max(bucket[0] / w, bucket[1] / h)
                img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
            rgb = _to_rgb(img)
            if rgb.size != bucket:
                # The decoded size may be a DCT scale of the original: the box is taken from it.
                box = fit_to_bucket(*rgb.size, bucket).box
                rgb = rgb.resize(bucket, Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
            return np.asarray(rgb, dtype=np.uint8), crop
        except SampleError:
            raise
        except Exception as err:  # noqa: BLE001 - truncated or corrupt pixel data
            raise SampleError("corrupt_image", f"{type(err).__name__}: {err}") from None
