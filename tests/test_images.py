import io
import struct
import zlib

import numpy as np
import pytest
from conftest import encode, noise_image
from PIL import Image

from lakelens.ingest.images import Transform, decode, to_rgb

RED = (255, 0, 0)


def solid(mode_color, size=(40, 30), mode="RGB"):
    return Image.new(mode, size, mode_color)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_every_format_decodes_to_rgb(fmt):
    data = encode(solid(RED), fmt)
    d = decode(data)
    assert d.error is None and d.image.mode == "RGB" and (d.width, d.height) == (40, 30)
    r, g, b = d.image.getpixel((20, 15))
    assert r > 200 and g < 60 and b < 60


def test_gif_uses_first_frame():
    frames = [solid(RED, mode="RGB").convert("P"), solid((0, 0, 255)).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    d = decode(buf.getvalue())
    assert d.error is None and d.image.getpixel((5, 5))[0] > 200


def test_exif_orientation_applied_and_size_reported_as_displayed():
    img = Image.new("RGB", (60, 20), (0, 0, 255))
    img.paste(RED, (0, 0, 10, 20))  # red band at the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    d = decode(encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert (d.width, d.height) == (20, 60) and d.image.size == (20, 60)
    top, bottom = d.image.getpixel((10, 3)), d.image.getpixel((10, 56))
    assert top[0] > 200 and bottom[2] > 200  # the left band is now at the top


@pytest.mark.parametrize("mode, color, expect", [
    ("L", 200, (200, 200, 200)),
    ("1", 1, (255, 255, 255)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent -> white
    ("LA", (0, 255), (0, 0, 0)),
])
def test_mode_conversion(mode, color, expect):
    out = to_rgb(Image.new(mode, (4, 4), color))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == expect


def test_palette_with_transparency_and_16bit_png():
    p = Image.new("P", (8, 8), 0)
    p.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    p.info["transparency"] = 0
    d = decode(encode(p, "PNG", transparency=0))
    assert d.error is None and d.image.getpixel((2, 2)) == (255, 255, 255)

    arr = np.full((10, 12), 65535 // 2, dtype=np.uint16)
    d16 = decode(encode(Image.fromarray(arr), "PNG"))
    assert d16.error is None and d16.image.mode == "RGB"
    assert abs(d16.image.getpixel((3, 3))[0] - 127) <= 1


def test_cmyk_jpeg_file():
    d = decode(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    assert d.error is None and d.image.getpixel((8, 8))[0] > 200


def _png_with_size(width, height):
    """A valid small PNG whose header claims `width` x `height` pixels (a decompression bomb's header)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize("data, error", [
    (b"", "empty file"),
    (b"hello, this is a text file\n" * 10, "not an image"),
    (_png_with_size(60_000, 60_000), "too large"),
])
def test_bad_inputs_are_errors_not_exceptions(data, error):
    d = decode(data)
    assert d.image is None and d.error == error


def test_truncated_and_corrupt():
    full = encode(noise_image(1, (200, 150)), "JPEG", quality=90)
    assert decode(full[: len(full) // 2]).error == "truncated"
    png = encode(noise_image(2, (64, 64)), "PNG")
    assert decode(png[: len(png) // 2]).error == "truncated"
    broken = bytearray(png)
    broken[60:400] = b"\xff" * 340  # 0xFF sets deflate block type 3, which zlib rejects
    assert decode(bytes(broken)).error == "corrupt"


def test_pixel_limit_is_configurable():
    data = encode(solid(RED, (100, 100)), "PNG")
    assert decode(data, max_pixels=9_999).error == "too large"
    assert decode(data, max_pixels=10_000).error is None


def test_large_jpeg_decoded_at_reduced_scale():
    data = encode(noise_image(3, (2000, 1500)), "JPEG", quality=80)
    small = decode(data, target_size=224, draft=True)
    full = decode(data, target_size=224, draft=False)
    assert (small.width, small.height) == (full.width, full.height) == (2000, 1500)
    assert full.image.size == (2000, 1500)
    # 1/4 is the strongest DCT reduction that keeps both sides >= 224 (1/8 would give 250 x 188)
    assert small.image.size == (500, 375)


@pytest.mark.parametrize("name", ["lakelens-tiny", "ViT-B-32"])
def test_transform_equals_open_clips_preprocess_bit_for_bit(name):
    from lakelens.models import registry as models

    loaded = models.load(models.ModelSpec(name))
    transform = loaded.transform  # Transform.from_cfg of the model's preprocess_cfg
    assert transform is not None and transform.size == loaded.image_size
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (65, 64), (300, 200), (200, 301), (1, 50), (224, 224), (225, 224), (63, 63), (10, 7),
             (1000, 750)]
    for w, h in sizes:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want, got = loaded.preprocess(img).numpy(), transform(img)
        assert got.dtype == np.float32 and got.shape == want.shape == (3, transform.size, transform.size)
        assert np.array_equal(got, want), (w, h)


def test_transform_covers_squash_and_declines_what_it_does_not_cover():
    base = {"size": (32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    squash = Transform.from_cfg({**base, "resize_mode": "squash"})
    x = squash(Image.new("RGB", (100, 20), (255, 0, 0)))
    assert x.shape == (3, 32, 32) and np.allclose(x[0], 2.0) and np.allclose(x[1], -2.0)
    assert Transform.from_cfg({**base, "resize_mode": "longest"}) is None
    assert Transform.from_cfg({**base, "size": (32, 48)}) is None
