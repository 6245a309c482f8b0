"""What the benchmarks' rows are made of: a pool of distinct real images of LAION-like sizes
and the words of their captions (bench/compare.py's and bench/bucket.py's corpus on loopback,
bench/field.py's simulated web)."""

from __future__ import annotations

WORDS = ("photo", "vintage", "red", "dress", "summer", "beach", "house", "modern", "kitchen",
         "design", "cat", "dog", "wedding", "cake", "garden", "flower", "black", "white",
         "shoes", "car", "sale", "mountain", "lake", "sunset", "city", "art", "print",
         "poster", "wall", "decor", "logo", "icon", "stock", "image", "hd")


def image_pool(size: int, seed: int) -> list:
    """`size` distinct demo images (laion_dagster.demo.dataset.make_images) of 10-300 KB, mean
    about 60 KB: mostly JPEG, some PNG and WebP, of varied dimensions; about one in ten has no
    file extension, as on many CDNs."""
    from laion_dagster.demo.dataset import make_images

    candidates = make_images(int(size * 1.3) + 10, seed=seed, min_side=90, max_side=620)
    return [image for image in candidates if 10_000 <= len(image.body) <= 300_000][:size]
