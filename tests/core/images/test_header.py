"""The hand-written header parsers must agree with Pillow on every file they answer for, and
leave every file Pillow refuses (or that they do not fully understand) to Pillow."""

import io
import random
import struct
import zlib

import pytest
from PIL import Image

from laion_dagster.core.images import checks
from laion_dagster.core.images import header as image_header
from laion_dagster.demo.dataset import make_images

# Pillow warns about the damaged EXIF blocks the fuzzing makes; that is its business.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def pillow_header(body: bytes) -> tuple[str, int, int] | None:
    try:
        with Image.open(io.BytesIO(body)) as image:
            return image.format, *image.size
    except Exception:
        return None


def encoded(fmt: str, size=(173, 91), mode="RGB", **options) -> bytes:
    out = io.BytesIO()
    picture = Image.linear_gradient("L").resize(size).convert(mode)
    picture.save(out, fmt, **options)
    return out.getvalue()


def with_exif(body: bytes) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation
    exif[0x010F] = "camera"
    picture = Image.open(io.BytesIO(body))
    out = io.BytesIO()
    picture.save(out, "JPEG", exif=exif.tobytes(), icc_profile=b"\0" * 3000)
    return out.getvalue()


def png_with_text_chunk(body: bytes) -> bytes:
    data = b"Comment\0hello"
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + data))
    return body[:33] + chunk + body[33:]


VARIANTS = {
    "jpeg baseline": lambda: encoded("JPEG", quality=90),
    "jpeg progressive": lambda: encoded("JPEG", progressive=True),
    "jpeg grayscale": lambda: encoded("JPEG", mode="L"),
    "jpeg cmyk": lambda: encoded("JPEG", mode="CMYK"),
    "jpeg exif and icc": lambda: with_exif(encoded("JPEG")),
    "jpeg restart markers": lambda: encoded("JPEG", restart_marker_rows=1),
    "png rgb": lambda: encoded("PNG"),
    "png rgba": lambda: encoded("PNG", mode="RGBA"),
    "png palette": lambda: encoded("PNG", mode="P"),
    "png 16-bit": lambda: encoded("PNG", mode="I;16"),
    "png text chunk": lambda: png_with_text_chunk(encoded("PNG")),
    "webp lossy": lambda: encoded("WEBP", quality=80),
    "webp lossless": lambda: encoded("WEBP", lossless=True),
    "webp alpha (VP8X)": lambda: encoded("WEBP", mode="RGBA"),
    "webp odd size": lambda: encoded("WEBP", size=(1, 16383)),
    "gif": lambda: encoded("GIF"),
    "bmp": lambda: encoded("BMP"),
    "tiff": lambda: encoded("TIFF"),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_agrees_with_pillow_on_well_formed_files(name):
    body = VARIANTS[name]()
    expected = pillow_header(body)
    assert expected is not None
    probed = image_header.probe(body)
    assert probed in (None, expected)
    info = checks.inspect(body)
    assert (info.format, info.width, info.height) == expected


def test_answers_for_the_formats_that_matter():
    """The point is speed on the common case: plain JPEG, PNG and simple WebP never need
    Pillow's header reader."""
    for name in ("jpeg baseline", "jpeg progressive", "jpeg grayscale", "jpeg cmyk",
                 "jpeg exif and icc", "png rgb", "png rgba", "png palette", "png text chunk",
                 "webp lossy", "webp lossless"):
        assert image_header.probe(VARIANTS[name]()) is not None, name
    corpus = make_images(60, seed=7, min_side=16, max_side=400)
    answered = sum(image_header.probe(image.body) is not None for image in corpus)
    assert answered >= 0.9 * len(corpus)
    for image in corpus:
        assert image_header.probe(image.body) in (None, pillow_header(image.body))


def test_never_accepts_a_damaged_header_pillow_refuses():
    """Cut, flip and shuffle bytes of real files: whenever the parser answers, Pillow reads
    the same format and size; whenever Pillow refuses, the parser does not answer."""
    rnd = random.Random(5)
    bodies = [make() for make in VARIANTS.values()]
    bodies += [image.body for image in make_images(20, seed=3, min_side=16, max_side=300)]
    checked = answered = 0
    for body in bodies:
        header_end = min(len(body), 400)
        damaged = [body[:cut] for cut in range(0, header_end, 3)]
        for _ in range(60):
            flipped = bytearray(body)
            flipped[rnd.randrange(header_end)] = rnd.randrange(256)
            damaged.append(bytes(flipped))
        for sample in damaged:
            probed = image_header.probe(sample)
            checked += 1
            if probed is None:
                continue
            answered += 1
            if probed[1] * probed[2] > 2 * Image.MAX_IMAGE_PIXELS:  # Pillow: a bomb
                with pytest.raises(checks.NotAnImage, match="decompression bomb"):
                    checks.inspect(sample)
            else:
                expected = pillow_header(sample)
                assert probed == expected, (sample[:40], probed, expected)
    assert checked > 5000 and answered > 500  # the parsers did answer for damaged bodies


def test_truncated_and_garbage_bodies_keep_their_error_classes():
    jpeg = VARIANTS["jpeg baseline"]()
    with pytest.raises(checks.NotAnImage) as caught:
        checks.inspect(jpeg[:40])
    assert caught.value.error_class == "decode_error"
    with pytest.raises(checks.NotAnImage) as caught:
        checks.inspect(b"<html>not found</html>")
    assert caught.value.error_class == "not_image"
    png = bytearray(VARIANTS["png rgb"]())
    png[20] ^= 0xFF  # width changed: the IHDR checksum no longer matches
    with pytest.raises(checks.NotAnImage) as caught:
        checks.inspect(bytes(png))
    assert caught.value.error_class == "decode_error"


def test_a_bomb_found_by_the_parser_is_still_a_decode_error():
    header = bytearray(VARIANTS["png rgb"]())
    struct.pack_into(">II", header, 16, 60_000, 60_000)
    struct.pack_into(">I", header, 29, zlib.crc32(bytes(header[12:29])))
    assert image_header.probe(bytes(header)) == ("PNG", 60_000, 60_000)
    with pytest.raises(checks.NotAnImage, match="decompression bomb") as caught:
        checks.inspect(bytes(header))
    assert caught.value.error_class == "decode_error"
