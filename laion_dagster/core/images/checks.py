"""Checking that a body is an image, from its bytes alone.

The URL's extension and the Content-Type lie often on the web; the bytes do not. Only the header
is parsed (cheap: by hand for JPEG, PNG and simple WebP, see header.py; by Pillow for the
rest); a full decode is left for when an image must be resized. Pillow's
decompression-bomb guard stays on, and a bomb is a `decode_error`, not a crash.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from importlib import metadata

from PIL import Image, UnidentifiedImageError

from laion_dagster.core.images import header

# Pillow warns between its pixel limit and twice it; `inspect` refuses those itself.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp",
              "TIFF": "tiff", "MPO": "jpg", "AVIF": "avif", "HEIF": "heic", "ICO": "ico"}
# Magic numbers of formats we would expect to decode; a body that starts like one but does not
# parse is a broken image (decode_error), anything else is not an image at all (not_image).
MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00",
         b"MM\x00*")


@dataclass(frozen=True)
class ImageInfo:
    format: str
    ext: str
    width: int
    height: int
    sha256: str


class NotAnImage(Exception):
    """The body is refused; `error_class` says why (not_image, decode_error, filtered, ...)."""

    def __init__(self, error_class: str, message: str):
        super().__init__(message)
        self.error_class = error_class


@dataclass(frozen=True)
class Filters:
    """img2dataset's image filters, plus hash verification; the defaults keep every image."""

    min_size: int = 0
    max_area: int | None = None
    max_aspect_ratio: float | None = None

    def check(self, info: ImageInfo, expected_sha256: str | None = None) -> None:
        """Raise NotAnImage('filtered' or 'hash_mismatch') for an image we must not keep."""
        if expected_sha256 and expected_sha256.strip().lower() != info.sha256:
            raise NotAnImage("hash_mismatch",
                             f"sha256 {info.sha256} != expected {expected_sha256.strip()}")
        w, h = info.width, info.height
        if min(w, h) < self.min_size:
            raise NotAnImage("filtered", f"{w}x{h} is smaller than min_image_size "
                                         f"{self.min_size}")
        if self.max_area is not None and w * h > self.max_area:
            raise NotAnImage("filtered", f"{w}x{h} = {w * h:,} pixels > max_image_area "
                                         f"{self.max_area:,}")
        ratio = max(w, h) / min(w, h)
        if self.max_aspect_ratio is not None and ratio > self.max_aspect_ratio:
            raise NotAnImage("filtered", f"aspect ratio {ratio:.2f} > max_aspect_ratio "
                                         f"{self.max_aspect_ratio:g}")


def _looks_like_image(body: bytes) -> bool:
    return body.startswith(MAGIC) or (body[:4] == b"RIFF" and body[8:12] == b"WEBP")


def inspect(body: bytes) -> ImageInfo:
    """Identify the image in `body`; raises NotAnImage with a class when it is not one."""
    if not body:
        raise NotAnImage("not_image", "empty body")
    probed = header.probe(body)
    fmt, width, height = probed if probed is not None else _open_header(body)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        # Checked here rather than by turning Pillow's warning into an error: warning filters
        # are process-wide and not thread-safe, and checks run in a thread pool.
        raise NotAnImage("decode_error", f"decompression bomb: {width}x{height} pixels "
                                         f"> {limit:,}")
    if width <= 0 or height <= 0:
        raise NotAnImage("decode_error", f"bad dimensions {width}x{height}")
    return ImageInfo(format=fmt, ext=EXTENSIONS.get(fmt, fmt.lower()), width=width,
                     height=height, sha256=hashlib.sha256(body).hexdigest())


def _open_header(body: bytes) -> tuple[str, int, int]:
    """Pillow's reading of the header, for every file `header.probe` leaves to it."""
    try:
        with Image.open(io.BytesIO(body)) as image:
            return image.format or "UNKNOWN", *image.size
    except Image.DecompressionBombError as error:
        raise NotAnImage("decode_error", f"decompression bomb: {error}") from error
    except UnidentifiedImageError as error:
        kind = "decode_error" if _looks_like_image(body) else "not_image"
        head = body[:16]
        raise NotAnImage(kind, f"cannot identify image ({len(body)} bytes, starts {head!r})") \
            from error
    except (OSError, SyntaxError, ValueError) as error:
        raise NotAnImage("decode_error", f"{type(error).__name__}: {error}") from error


def pillow_build() -> str:
    """Which Pillow does the decoding and resampling: resizing costs much more CPU with stock
    Pillow than with Pillow-SIMD (bench/README.md has the figures), so workers say which they
    use."""
    try:
        return f"Pillow-SIMD {metadata.version('pillow-simd')}"
    except metadata.PackageNotFoundError:
        return f"Pillow {Image.__version__}"


RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
ENCODERS = {"jpg": ("JPEG", "image/jpeg"), "png": ("PNG", "image/png"),
            "webp": ("WEBP", "image/webp")}


@dataclass(frozen=True)
class Resize:
    """img2dataset's resize modes and encoding options; mode "no" keeps the original bytes."""

    mode: str = "no"
    size: int = 256
    only_if_bigger: bool = False
    encode_format: str = "jpg"
    quality: int = 95

    def target(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int] | None]:
        """(size to resize to, final canvas or crop size) for an image of width × height."""
        side = self.size
        if self.mode in ("keep_ratio", "center_crop"):
            scale = side / min(width, height)
        else:  # keep_ratio_largest, border
            scale = side / max(width, height)
        if self.only_if_bigger and scale >= 1:
            scale = 1.0
        resized = (max(1, round(width * scale)), max(1, round(height * scale)))
        if self.mode == "center_crop":
            return resized, (min(side, resized[0]), min(side, resized[1]))
        if self.mode == "border":
            return resized, (max(side, resized[0]), max(side, resized[1]))
        return resized, None


def transform(body: bytes, info: ImageInfo, resize: Resize) -> tuple[bytes, str, int, int]:
    """The bytes to store, their extension, width and height.

    Nothing is decoded when nothing would change: the original bytes are kept when the mode
    is "no", or when the size is right already and the format is the one asked for.
    """
    if resize.mode == "no":
        return body, info.ext, info.width, info.height
    resized, canvas = resize.target(info.width, info.height)
    final = canvas or resized
    same_geometry = resized == (info.width, info.height) and final == resized
    if same_geometry and info.ext == resize.encode_format:
        return body, info.ext, info.width, info.height
    pil_format, _ = ENCODERS[resize.encode_format]
    try:
        with Image.open(io.BytesIO(body)) as image:
            if resized[0] < info.width and image.format == "JPEG":
                # The JPEG decoder can scale by 1/2, 1/4, 1/8 while decoding: much cheaper
                # than decoding full size and shrinking afterwards.
                image.draft("RGB", resized)
            mode = "RGBA" if _keeps_alpha(image, pil_format) else "RGB"
            if image.mode != mode:  # convert() copies even when the mode is right already
                image = image.convert(mode)
            if image.size != resized:
                # img2dataset's defaults: area averaging to shrink (Pillow's BOX is exactly
                # that, and much cheaper than LANCZOS here), LANCZOS to enlarge.
                shrink = resized[0] < image.size[0]
                image = image.resize(resized, Image.Resampling.BOX if shrink
                                     else Image.Resampling.LANCZOS)
            if final != resized:
                image = _fit(image, final, resize.mode)
            out = io.BytesIO()
            options = {"quality": resize.quality} if pil_format in ("JPEG", "WEBP") else {}
            image.save(out, format=pil_format, **options)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise NotAnImage("decode_error", f"cannot decode to resize: {error}") from error
    return out.getvalue(), resize.encode_format, final[0], final[1]


def _keeps_alpha(image: Image.Image, pil_format: str) -> bool:
    return pil_format != "JPEG" and (image.mode in ("RGBA", "LA", "PA")
                                     or "transparency" in image.info)


def _fit(image: Image.Image, final: tuple[int, int], mode: str) -> Image.Image:
    """center_crop cuts the middle out; border pads to a square on black, as img2dataset does."""
    w, h = image.size
    if mode == "center_crop":
        left, top = (w - final[0]) // 2, (h - final[1]) // 2
        return image.crop((left, top, left + final[0], top + final[1]))
    canvas = Image.new(image.mode, final, (0, 0, 0, 0) if image.mode == "RGBA" else (0, 0, 0))
    canvas.paste(image, ((final[0] - w) // 2, (final[1] - h) // 2))
    return canvas
