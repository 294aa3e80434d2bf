"""Image bytes -> RGB PIL image (decode, EXIF orientation, mode conversion, size guards; errors as values) -> model input."""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL's own bomb guard is replaced by our explicit pixel limit, checked before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None

# The formats the job and queries decode: raster formats PIL reads itself. Others (EPS and PDF run
# Ghostscript, and exotic plugins widen what a hostile file can reach) are "not an image".
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "PPM", "ICO")  # JPEG covers MPO
ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}
WHITE = (255, 255, 255)


@dataclass
class Decoded:
    image: Image.Image | None
    width: int | None  # as displayed (after EXIF orientation), at full resolution
    height: int | None
    error: str | None


def _fail(error: str, width: int | None = None, height: int | None = None) -> Decoded:
    return Decoded(None, width, height, error)


def _flatten_alpha(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGB", rgba.size, WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer or float greyscale -> 8-bit L, scaled by the mode's range."""
    arr = np.asarray(img)
    if img.mode == "F":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    # I;16* are 16-bit; "I" from a 16-bit PNG holds values up to 65535 too. Integer arithmetic (4 bytes
    # a pixel, not float64's 8): (x + 128) // 257 is round(x * 255 / 65535), which never ties.
    wide = np.clip(arr, 0, 65535).astype(np.uint32)
    if img.mode.startswith("I;16") or int(wide.max(initial=0)) > 255:
        wide += 128
        wide //= 257
    return Image.fromarray(wide.astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels become white, CMYK and 16-bit are converted."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        return _flatten_alpha(img) if "transparency" in img.info else img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _flatten_alpha(img)
    if mode.startswith("I") or mode == "F":
        return _to_8bit(img).convert("RGB")
    return img.convert("RGB")


def _classify(exc: BaseException) -> str:
    text = str(exc).lower()
    if isinstance(exc, EOFError) or "truncated" in text or "broken data stream" in text or "premature end" in text:
        return "truncated"
    return "corrupt"


def decode(data: bytes, target_size: int | None = None, max_pixels: int = 89_478_485,
           draft: bool = True, formats: tuple = FORMATS) -> Decoded:
    """Decode one image file's bytes. With `target_size` and `draft`, a large JPEG is decoded at the
    smallest power-of-two reduction that keeps both sides >= target_size (libjpeg DCT scaling).
    Only `formats` are tried; anything else is "not an image"."""
    if not data:
        return _fail("empty file")
    try:
        img = Image.open(io.BytesIO(data), formats=list(formats))
    except UnidentifiedImageError:
        return _fail("not an image")
    except Exception as e:  # a header so broken that PIL cannot even identify the size
        return _fail(_classify(e))
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            return _fail("corrupt")
        if width * height > max_pixels:
            return _fail("too large", width, height)
        if getattr(img, "is_animated", False):
            img.seek(0)
        if draft and target_size and img.format == "JPEG":
            img.draft(img.mode, (target_size, target_size))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
        # read after load(): PNG keeps EXIF after the pixels, and getexif() would load (and fail) silently
        orientation = 1
        try:
            orientation = int(img.getexif().get(ORIENTATION_TAG, 1))
        except Exception:
            pass  # an unreadable EXIF block does not make the pixels unusable
        if orientation in _SWAPS_AXES:
            width, height = height, width
        img = ImageOps.exif_transpose(img) if orientation != 1 else img
        return Decoded(to_rgb(img), width, height, None)
    except MemoryError:
        return _fail("too large")
    except Exception as e:
        return _fail(_classify(e))


@dataclass(frozen=True)
class Transform:
    """open_clip's inference preprocessing (resize, centre crop, scale to [0, 1], normalise) in PIL and
    numpy: the same float32 values as its torchvision Compose, bit for bit, without importing torch, so
    a worker running an ONNX engine never loads torch at all."""

    size: int
    mean: tuple
    std: tuple
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @classmethod
    def from_cfg(cls, cfg: dict) -> Transform | None:
        """From an open_clip model's `visual.preprocess_cfg`; None where this class does not cover it
        (non-square sizes, resize_mode 'longest'): callers then use open_clip's own transform."""
        size = cfg.get("size", 224)
        if isinstance(size, (tuple, list)):
            if len(set(size)) != 1:
                return None
            size = size[0]
        if cfg.get("mode", "RGB") != "RGB" or cfg.get("resize_mode", "shortest") not in ("shortest", "squash"):
            return None
        mean, std = cfg.get("mean"), cfg.get("std")
        mean = tuple(mean) if isinstance(mean, (tuple, list)) else (mean,) * 3
        std = tuple(std) if isinstance(std, (tuple, list)) else (std,) * 3
        return cls(int(size), tuple(float(m) for m in mean), tuple(float(s) for s in std),
                   cfg.get("interpolation") or "bicubic", cfg.get("resize_mode") or "shortest")

    def to_dict(self) -> dict:
        return asdict(self)

    def __call__(self, img: Image.Image) -> np.ndarray:
        """RGB image -> (3, size, size) float32."""
        return self.normalize(self.pixels(img))

    def pixels(self, img: Image.Image) -> np.ndarray:
        """RGB image -> its resized and cropped 8-bit pixels, (3, size, size) uint8: what an engine that takes
        pixels (the int8 image tower) is fed, and what `normalize` turns into the float input."""
        s = self.size
        resample = Image.BILINEAR if self.interpolation == "bilinear" else Image.BICUBIC
        w, h = img.size
        if self.resize_mode == "squash":
            new_w, new_h = s, s
        else:  # the shorter side to `size`, as torchvision's Resize(int) computes it
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = s, int(s * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample)
        if (new_w, new_h) != (s, s):  # centre crop; both sides are >= size here, so nothing to pad
            top, left = int(round((new_h - s) / 2.0)), int(round((new_w - s) / 2.0))
            img = img.crop((left, top, left + s, top + s))
        # channels first while still 8-bit: `normalize` then works on whole planes
        return np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8).transpose(2, 0, 1)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """(..., 3, H, W) uint8 pixels -> float32 model input: the same float32 operations in the same order
        as torchvision's ToTensor and Normalize (so the same bits), at half the cost of HWC triples."""
        x = np.asarray(pixels).astype(np.float32)
        x /= np.float32(255)
        x -= np.asarray(self.mean, dtype=np.float32)[:, None, None]
        x /= np.asarray(self.std, dtype=np.float32)[:, None, None]
        return x

    def to_pixels(self, x: np.ndarray) -> np.ndarray:
        """(..., 3, H, W) float32 model input made from 8-bit pixels -> those pixels, exactly: a pixel step is
        1 / (255 std) wide in the input, far wider than float32's rounding, so rounding x * 255 std + 255 mean
        lands on the pixel it came from (values outside 0-255 are clipped)."""
        per_unit = (255.0 * np.asarray(self.std, np.float64)).astype(np.float32)[:, None, None]
        at_zero = (255.0 * np.asarray(self.mean, np.float64)).astype(np.float32)[:, None, None]
        y = np.asarray(x, dtype=np.float32) * per_unit
        y += at_zero
        return np.clip(np.rint(y), 0, 255).astype(np.uint8)
