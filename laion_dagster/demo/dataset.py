"""A seeded, LAION-like dataset: Spark-named parquet parts plus the images their URLs point at.

The demo and the tests need input that looks like the real release (column names and types,
part names, Spark's side files, a real LAION shard's failure mix) but costs seconds to make and
never leaves the machine. Rows therefore reuse a small pool of real encoded images, and every
failing row points at a route of `laion_dagster.demo.server.ImageServer` that fails in a known
way, so each row's outcome is known in advance (`DemoDataset.expected_by_row`).
"""

from __future__ import annotations

import io
import random
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

SUCCESS = "success"
OUTCOMES = ("success", "http_4xx", "http_5xx", "not_image", "decode_error", "connection",
            "timeout", "dns", "invalid_url")

# Failure kinds and their weights, shaped after the failure mix of a real LAION shard
# (404 dominates, then 403 and DNS, then decoding errors; closed connections are rare).
# Timeouts are not here: they cost real seconds, so they are opt-in (`slow_rows`).
FAILURE_WEIGHTS: dict[str, int] = {
    "status_404": 50, "status_403": 12, "status_400": 3, "status_401": 1,
    "dns": 12, "decode_error": 7, "not_image": 5,
    "status_503": 3, "status_500": 2, "connection": 3, "invalid_url": 2,
}
SLOW_ROWS_PER_PART = 2
DEAD_HOSTS = 8
DUPLICATE_SHARE = 0.01
# Success rows served through the server's /flaky/ route: their first try is dropped (its quick
# retry too), their later try (Settings.retry_rounds, retry_delay above FLAKY_SECONDS) succeeds.
FLAKY_SHARE = 0.02

# One encoded body that Pillow rejects at Image.open: JPEG magic, then no valid marker.
# A merely truncated JPEG would pass a header-only check, so it would not reliably fail.
CORRUPT_JPEG = b"\xff\xd8\xff" + bytes(range(7, 256, 3)) * 8

_FORMATS = (("JPEG", "image/jpeg", "jpg", 75), ("PNG", "image/png", "png", 15),
            ("WEBP", "image/webp", "webp", 10))
_GRADIENT = Image.linear_gradient("L").resize((64, 64))

_WORDS = ("photo", "vintage", "red", "dress", "summer", "beach", "house", "modern", "kitchen",
          "design", "ideas", "cat", "dog", "puppy", "wedding", "cake", "garden", "flower",
          "rose", "black", "white", "leather", "shoes", "men", "women", "kids", "toy", "car",
          "sale", "new", "free", "shipping", "the", "a", "of", "and", "with", "for", "in",
          "mountain", "lake", "sunset", "city", "night", "street", "art", "print", "poster",
          "canvas", "wall", "decor", "logo", "vector", "icon", "illustration", "stock", "image",
          "hd", "wallpaper", "2019", "2021", "size", "xl", "cotton", "t-shirt", "ring", "gold")
_FOREIGN = ("café", "Straße", "Schöne", "niño", "été", "maison", "красивый", "кошка",
            "東京", "写真", "猫", "デザイン", "美丽", "花园", "사진", "여름", "ήλιος", "بيت",
            "सूर्य", "😍", "🌸", "ünlü", "zażółć")
_LANGUAGES = (("de", 14), ("fr", 12), ("es", 12), ("ru", 10), ("ja", 9), ("zh", 8),
              ("it", 7), ("pt", 7), ("nl", 5), ("pl", 5), ("ko", 3), ("tr", 3), ("ar", 2),
              ("el", 1), ("hi", 1), ("", 1))
_LICENSES = (("?", 95), ("https://creativecommons.org/licenses/by/4.0/", 2),
             ("https://creativecommons.org/licenses/by-sa/4.0/", 2),
             ("https://creativecommons.org/publicdomain/zero/1.0/", 1))
_NSFW = (("UNLIKELY", 90), ("UNSURE", 7), ("NSFW", 3))


@dataclass(frozen=True)
class DemoImage:
    path: str
    body: bytes
    content_type: str


@dataclass(frozen=True)
class DemoDataset:
    parts: list[Path]
    images: dict[str, DemoImage]
    expected: dict[str, str]
    expected_by_row: dict[tuple[str, int], str]

    def outcome_counts(self) -> Counter[str]:
        """Rows per expected outcome: what a complete download should report."""
        return Counter(self.expected_by_row.values())


# ---------------------------------------------------------------- images

def make_images(count: int, seed: int = 0, min_side: int = 32,
                max_side: int = 256) -> list[DemoImage]:
    """`count` distinct real images; smooth shapes plus noise keep encoded sizes realistic."""
    return [_make_image(random.Random(f"image:{seed}:{i}"), i, min_side, max_side)
            for i in range(count)]


def _make_image(rnd: random.Random, index: int, min_side: int, max_side: int) -> DemoImage:
    fmt, content_type, ext, _ = rnd.choices(_FORMATS, [f[3] for f in _FORMATS])[0]
    size = (rnd.randint(min_side, max_side), rnd.randint(min_side, max_side))
    picture = _picture(rnd, size, noise=rnd.uniform(0.06, 0.3) * (0.3 if fmt == "PNG" else 1))
    # Some real images are grayscale or carry alpha; downloaders must cope with both.
    if fmt == "JPEG" and rnd.random() < 0.05:
        picture = picture.convert("L")
    elif fmt == "PNG" and rnd.random() < 0.3:
        picture.putalpha(picture.convert("L"))
    # About one URL in ten has no extension, as on many CDNs.
    path = f"/img/{index:06d}" + (f".{ext}" if rnd.random() >= 0.1 else "")
    return DemoImage(path=path, body=_encode(picture, fmt, rnd), content_type=content_type)


def _picture(rnd: random.Random, size: tuple[int, int], noise: float) -> Image.Image:
    """Drawn at a quarter size and scaled up, so it is smooth and cheap; noise at full size."""
    small = (max(2, size[0] // 4), max(2, size[1] // 4))
    picture = Image.merge("RGB", [_gradient(rnd, small) for _ in range(3)])
    draw = ImageDraw.Draw(picture)
    for _ in range(rnd.randrange(1, 5)):
        x0, y0 = rnd.randrange(small[0]), rnd.randrange(small[1])
        box = (x0, y0, x0 + rnd.randrange(1, small[0]), y0 + rnd.randrange(1, small[1]))
        fill = tuple(rnd.randrange(256) for _ in range(3))
        (draw.ellipse if rnd.random() < 0.5 else draw.rectangle)(box, fill=fill)
    picture = picture.resize(size, Image.Resampling.BICUBIC)
    grain = Image.frombytes("RGB", size, rnd.randbytes(size[0] * size[1] * 3))
    return Image.blend(picture, grain, noise)


def _gradient(rnd: random.Random, size: tuple[int, int]) -> Image.Image:
    low, high = sorted((rnd.randrange(256), rnd.randrange(256)))
    turned = _GRADIENT.rotate(rnd.uniform(0, 360), resample=Image.Resampling.BILINEAR,
                              fillcolor=(low + high) // 2)
    return turned.resize(size, Image.Resampling.BILINEAR).point(
        [low + v * (high - low) // 255 for v in range(256)])


def _encode(picture: Image.Image, fmt: str, rnd: random.Random) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        picture.save(buf, "JPEG", quality=rnd.randrange(80, 96))
    elif fmt == "PNG":
        picture.save(buf, "PNG", compress_level=1)
    else:
        picture.save(buf, "WEBP", quality=rnd.randrange(70, 95), method=2)
    return buf.getvalue()


def image_size(image: DemoImage) -> tuple[int, int]:
    """(width, height) read from the encoded header, without decoding the pixels."""
    with Image.open(io.BytesIO(image.body)) as opened:
        return opened.size


# ---------------------------------------------------------------- parquet parts

def served_path(url: str) -> str:
    """The path of the image a success row's URL serves (through /flaky/ or not)."""
    path = urlsplit(url).path
    if path.startswith("/flaky/"):
        return "/" + path.split("/", 3)[3]
    return path


def spark_uuid(seed: int, subset: str) -> str:
    """One uuid per subset and seed, as Spark uses one per write job."""
    return str(uuid.UUID(int=random.Random(f"uuid:{seed}:{subset}").getrandbits(128), version=4))


def part_name(index: int, job_uuid: str) -> str:
    return f"part-{index:05d}-{job_uuid}-c000.snappy.parquet"


def schema_for(subset: str) -> pa.Schema:
    """The original release's columns; only the multilingual subset has LANGUAGE."""
    fields = [("SAMPLE_ID", pa.int64()), ("URL", pa.string()), ("TEXT", pa.string()),
              ("HEIGHT", pa.int32()), ("WIDTH", pa.int32()), ("LICENSE", pa.string()),
              ("NSFW", pa.string()), ("similarity", pa.float64())]
    if "multi" in subset:
        fields.append(("LANGUAGE", pa.string()))
    return pa.schema(fields)


def write_dataset(parquet_dir: Path, base_urls: Sequence[str],
                  subsets: Sequence[str] = ("laion2B-en", "laion2B-multi"),
                  parts_per_subset: int = 2, rows_per_part: int = 500, seed: int = 0,
                  failure_rate: float = 0.2, images: list[DemoImage] | None = None,
                  row_group_size: int | None = None, *, slow_rows: bool = False) -> DemoDataset:
    """Write `parquet_dir/<subset>/part-NNNNN-<uuid>-c000.snappy.parquet` plus Spark's side files.

    Success rows point at `base_url + image.path` (most with a `?id=` query so URLs stay
    distinct while the image pool stays small); failing rows point at server routes or at
    hosts that cannot resolve. With `slow_rows`, up to two rows per part hit `/slow/...`.
    """
    if not base_urls:
        raise ValueError("base_urls must name at least one image server")
    if not 0.0 <= failure_rate <= 1.0:
        raise ValueError(f"failure_rate must be within [0, 1], got {failure_rate}")
    pool = make_images(200, seed) if images is None else list(images)
    if not pool and failure_rate < 1.0:
        raise ValueError("images must not be empty when some rows should succeed")
    bases = [b.rstrip("/") for b in base_urls]
    sizes = {image.path: image_size(image) for image in pool}
    parts: list[Path] = []
    expected: dict[str, str] = {}
    by_row: dict[tuple[str, int], str] = {}
    for subset_index, subset in enumerate(subsets):
        folder = Path(parquet_dir) / subset
        folder.mkdir(parents=True, exist_ok=True)
        job_uuid = spark_uuid(seed, subset)
        for index in range(parts_per_subset):
            name = part_name(index, job_uuid)
            rnd = random.Random(f"part:{seed}:{subset}:{index}")
            plan = _PartPlan(rnd, subset, index, bases, pool, sizes)
            first_id = (subset_index + 1) * 1_000_000_000 + index * rows_per_part
            rows = plan.rows(rows_per_part, failure_rate, slow_rows, first_id)
            _write_part(folder / name, subset, rows, row_group_size)
            parts.append(folder / name)
            for row_index, row in enumerate(rows):
                by_row[(name, row_index)] = row.outcome
                if row.url is not None:
                    expected[row.url] = row.outcome
        _write_spark_side_files(folder, [p.name for p in parts if p.parent == folder])
    return DemoDataset(parts=parts, images={image.path: image for image in pool},
                       expected=expected, expected_by_row=by_row)


@dataclass
class _Row:
    sample_id: int
    url: str | None
    outcome: str
    width: int
    height: int


class _PartPlan:
    """Decides every row of one part; all randomness comes from the part's own seeded stream."""

    def __init__(self, rnd: random.Random, subset: str, index: int, bases: list[str],
                 pool: list[DemoImage], sizes: dict[str, tuple[int, int]]) -> None:
        self.rnd = rnd
        self.tag = f"{subset}-{index:05d}"
        self.bases = bases
        # A few hosts carry most URLs (CDNs), so weight them like 1, 1/2, 1/3, ...
        self.host_weights = [1 / (i + 1) for i in range(len(bases))]
        self.pool = pool
        self.sizes = sizes

    def rows(self, count: int, failure_rate: float, slow_rows: bool, first_id: int) -> list[_Row]:
        kinds = self._kinds(count, failure_rate, slow_rows)
        rows = [self._row(kind, n, first_id + n) for n, kind in enumerate(kinds)]
        self._duplicate_some(rows)
        return rows

    def _kinds(self, count: int, failure_rate: float, slow_rows: bool) -> list[str]:
        """Exact counts per kind, then shuffled: every failure kind shows up in a small part."""
        failures = round(count * failure_rate)
        slow = min(SLOW_ROWS_PER_PART, failures) if slow_rows else 0
        kinds = ["slow"] * slow + _apportion(failures - slow, FAILURE_WEIGHTS)
        kinds += [SUCCESS] * (count - len(kinds))
        self.rnd.shuffle(kinds)
        return kinds

    def _row(self, kind: str, n: int, sample_id: int) -> _Row:
        width, height = self.rnd.randint(64, 1024), self.rnd.randint(64, 1024)
        token = f"{self.tag}-{n:06d}"
        if kind == SUCCESS:
            image = self.rnd.choice(self.pool)
            width, height = self.sizes[image.path]
            query = f"?id={sample_id}" if self.rnd.random() < 0.75 else ""
            if self.rnd.random() < FLAKY_SHARE:  # each URL its own path: dropped once
                return _Row(sample_id, f"{self._base()}/flaky/{token}{image.path}", SUCCESS,
                            width, height)
            return _Row(sample_id, self._base() + image.path + query, SUCCESS, width, height)
        if kind == "invalid_url":
            return _Row(sample_id, self._invalid_url(token), "invalid_url", width, height)
        if kind == "dns":
            host = f"dead-host-{self.rnd.randrange(DEAD_HOSTS)}.invalid"
            return _Row(sample_id, f"http://{host}/{token}.jpg", "dns", width, height)
        route, outcome = _ROUTES[kind]
        return _Row(sample_id, f"{self._base()}{route}{token}.jpg", outcome, width, height)

    def _base(self) -> str:
        return self.rnd.choices(self.bases, self.host_weights)[0]

    def _invalid_url(self, token: str) -> str | None:
        return self.rnd.choice((None, "", f"ftp://files.invalid/{token}.jpg",
                                "data:image/gif;base64,R0lGODlhAQABAAAAACw="))

    def _duplicate_some(self, rows: list[_Row]) -> None:
        """Copy a few success URLs onto other success rows, as LAION repeats some URLs."""
        ok = [r for r in rows if r.outcome == SUCCESS]
        if len(ok) < 20:
            return
        for _ in range(max(1, round(len(ok) * DUPLICATE_SHARE))):
            source, target = self.rnd.sample(ok, 2)
            target.url, target.width, target.height = source.url, source.width, source.height


_ROUTES: dict[str, tuple[str, str]] = {
    **{f"status_{code}": (f"/status/{code}/", "http_4xx") for code in (400, 401, 403, 404)},
    **{f"status_{code}": (f"/status/{code}/", "http_5xx") for code in (500, 503)},
    "not_image": ("/html/", "not_image"),
    "decode_error": ("/corrupt/", "decode_error"),
    "connection": ("/close/", "connection"),
    "slow": ("/slow/", "timeout"),
}


def _apportion(total: int, weights: dict[str, int]) -> list[str]:
    """`total` kinds split by weight (largest remainder); each kind at least once if room."""
    if total <= 0:
        return []
    floor = 1 if total >= len(weights) else 0
    spare = total - floor * len(weights)
    weight_sum = sum(weights.values())
    shares = {k: spare * w / weight_sum for k, w in weights.items()}
    counts = {k: floor + int(s) for k, s in shares.items()}
    by_remainder = sorted(weights, key=lambda k: (shares[k] - int(shares[k]), weights[k]),
                          reverse=True)
    for kind in by_remainder[: total - sum(counts.values())]:
        counts[kind] += 1
    return [kind for kind, n in counts.items() for _ in range(n)]


def _write_part(path: Path, subset: str, rows: list[_Row], row_group_size: int | None) -> None:
    rnd = random.Random(f"columns:{path.name}")
    n = len(rows)
    columns: dict[str, list] = {
        "SAMPLE_ID": [r.sample_id for r in rows],
        "URL": [r.url for r in rows],
        "TEXT": [_caption(rnd, multilingual="multi" in subset) for _ in range(n)],
        "HEIGHT": [r.height for r in rows],
        "WIDTH": [r.width for r in rows],
        "LICENSE": _weighted(rnd, _LICENSES, n),
        "NSFW": _weighted(rnd, _NSFW, n),
        "similarity": [round(rnd.uniform(0.28, 0.45), 6) for _ in range(n)],
    }
    if "multi" in subset:
        columns["LANGUAGE"] = _weighted(rnd, _LANGUAGES, n)
    table = pa.table(columns, schema=schema_for(subset))
    pq.write_table(table, path, compression="snappy", row_group_size=row_group_size)


def _write_spark_side_files(folder: Path, part_names: list[str]) -> None:
    """Spark leaves `_SUCCESS` and hidden `.crc` checksums next to the parts; readers skip them."""
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / "._SUCCESS.crc").write_bytes(b"crc\x00\x00\x00\x00\x00\x00\x00\x00\x00")
    for name in part_names:
        (folder / f".{name}.crc").write_bytes(b"crc\x00" + uuid.uuid5(uuid.NAMESPACE_URL,
                                                                      name).bytes)


def _weighted(rnd: random.Random, choices: tuple[tuple[str, int], ...], n: int) -> list[str]:
    return rnd.choices([c for c, _ in choices], [w for _, w in choices], k=n)


def _caption(rnd: random.Random, multilingual: bool) -> str | None:
    roll = rnd.random()
    if roll < 0.005:
        return None
    if roll < 0.025:
        return ""
    words = rnd.choices(_WORDS, k=rnd.randint(1, 14))
    foreign = 0.5 if multilingual else 0.05
    for i in range(len(words)):
        if rnd.random() < foreign:
            words[i] = rnd.choice(_FOREIGN)
    text = " ".join(words)
    return text[0].upper() + text[1:] if rnd.random() < 0.6 else text
