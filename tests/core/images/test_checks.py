"""Resizing and re-encoding with img2dataset's modes, on real image bytes."""

import io

import pytest
from PIL import Image

from laion_dagster.core.images import checks as image_checks
from tests.outputs import shard_rows, tar_members
from tests.pool import download


def encoded(size, fmt="JPEG", mode="RGB"):
    image = Image.new(mode, size, (200, 30, 30, 128) if mode == "RGBA" else (200, 30, 30))
    for x in range(0, size[0], 7):  # some structure, so encoders have work to do
        for y in range(0, size[1], 5):
            image.putpixel((x, y), (x % 255, y % 255, 90) + ((255,) if mode == "RGBA" else ()))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def run(body, **options):
    info = image_checks.inspect(body)
    stored, ext, w, h = image_checks.transform(body, info, image_checks.Resize(**options))
    with Image.open(io.BytesIO(stored)) as image:
        assert image.size == (w, h)
        return stored, ext, image.size, image.format, image.mode


@pytest.mark.parametrize(("mode", "expected"), [
    ("keep_ratio", (512, 256)),            # smallest side to 256
    ("keep_ratio_largest", (256, 128)),    # largest side to 256
    ("center_crop", (256, 256)),           # smallest side to 256, middle cut out
    ("border", (256, 256)),                # largest side to 256, padded to a square
])
def test_each_mode_gives_img2dataset_geometry(mode, expected):
    _, ext, size, fmt, _ = run(encoded((800, 400)), mode=mode, size=256)
    assert size == expected and ext == "jpg" and fmt == "JPEG"


def test_border_pads_with_black_and_center_crop_keeps_the_middle():
    body = encoded((800, 400))
    stored, *_ = run(body, mode="border", size=256)
    with Image.open(io.BytesIO(stored)) as image:
        assert max(image.getpixel((128, 2))) < 20  # the top band is border
    cropped, *_ = run(body, mode="center_crop", size=256)
    with Image.open(io.BytesIO(cropped)) as image:
        assert image.getpixel((128, 128))[0] > 100  # picture, not border


def test_original_bytes_are_kept_when_nothing_would_change():
    body = encoded((256, 100))
    info = image_checks.inspect(body)
    same = image_checks.transform(body, info, image_checks.Resize(mode="keep_ratio_largest",
                                                                 size=256))
    assert same[0] is body  # not decoded, not re-encoded
    raw = image_checks.transform(body, info, image_checks.Resize(mode="no"))
    assert raw[0] is body and raw[1:] == ("jpg", 256, 100)


def test_only_if_bigger_leaves_small_images_alone():
    small = encoded((100, 50))
    stored, ext, size, *_ = run(small, mode="keep_ratio", size=256, only_if_bigger=True)
    assert size == (100, 50) and stored == small
    _, _, big, *_ = run(encoded((1000, 500)), mode="keep_ratio", size=256, only_if_bigger=True)
    assert big == (512, 256)


def test_encode_formats_and_transparency():
    rgba = encoded((300, 300), fmt="PNG", mode="RGBA")
    _, ext, size, fmt, mode = run(rgba, mode="keep_ratio", size=100, encode_format="webp")
    assert (ext, size, fmt, mode) == ("webp", (100, 100), "WEBP", "RGBA")
    _, ext, _, fmt, mode = run(rgba, mode="keep_ratio", size=100, encode_format="png")
    assert (ext, fmt, mode) == ("png", "PNG", "RGBA")
    _, ext, _, fmt, mode = run(rgba, mode="keep_ratio", size=100, encode_format="jpg")
    assert (ext, fmt, mode) == ("jpg", "JPEG", "RGB")  # JPEG has no alpha
    low = run(encoded((600, 600)), mode="keep_ratio", size=300, quality=20)[0]
    high = run(encoded((600, 600)), mode="keep_ratio", size=300, quality=95)[0]
    assert len(low) < len(high)


def test_an_image_that_breaks_while_decoding_is_a_decode_error():
    body = encoded((800, 600))
    truncated = body[: len(body) // 3]  # the header parses; the pixels do not
    info = image_checks.inspect(truncated)
    with pytest.raises(image_checks.NotAnImage) as error:
        image_checks.transform(truncated, info, image_checks.Resize(mode="keep_ratio", size=64))
    assert error.value.error_class == "decode_error"


def test_workers_store_resized_images_and_keep_the_original_size(settings, dataset):
    small = settings.with_overrides(resize_mode="center_crop", image_size=32,
                                    encode_format="webp")
    part_dir = download(small).part_dir
    rows = [r for r in shard_rows(part_dir).to_pylist() if r["status"] == "success"]
    members = tar_members(part_dir)
    assert rows
    for r in rows:
        assert (r["width"], r["height"], r["format"]) == (32, 32, "webp")
        assert min(r["original_width"], r["original_height"]) >= 32  # the demo's sizes
        with Image.open(io.BytesIO(members[f"{r['key']}.webp"])) as image:
            assert image.size == (32, 32) and image.format == "WEBP"
        assert r["bytes"] == len(members[f"{r['key']}.webp"])
