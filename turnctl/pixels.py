"""The one image-size limit, applied identically wherever turnctl decodes an image.

``turnctl prepare`` reads raw files, ``train`` / ``eval`` / ``report`` decode shard members: a
decompression bomb (a small PNG that declares 100 megapixels) must be refused at every one of
those places, before its pixels are allocated, and with the same bound, so that a shard written by
hand (or by an older turnctl) cannot get past the check that prepare applies.

The bound is Pillow's own default (``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485 pixels, about a
9459 x 9459 image): Pillow only *warns* between that and twice that, and turnctl treats the warning
as the limit. Real datasets stay far below it (WebVision and Clothing1M images are under 1 MP).
"""

from __future__ import annotations

import io
import warnings
from typing import Union

from PIL import Image

MAX_PIXELS = 89_478_485  # = PIL.Image.MAX_IMAGE_PIXELS as shipped; fixed here so a library cannot raise it


class TooManyPixels(ValueError):
    """An image declares more pixels than :data:`MAX_PIXELS`; nothing was decoded."""


def check_size(im: Image.Image) -> Image.Image:
    """Raise :class:`TooManyPixels` if the opened (not yet loaded) ``im`` is too large.

    >>> check_size(Image.new("L", (10, 10))).size
    (10, 10)
    """
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise TooManyPixels(f"{w} x {h} = {w * h:,} pixels, more than the limit of {MAX_PIXELS:,}")
    return im


def open_image(data: Union[bytes, bytearray, memoryview]) -> Image.Image:
    """Open image bytes lazily (header only) and check their size; the caller calls ``load()``.

    >>> buf = io.BytesIO(); Image.new("RGB", (4, 3)).save(buf, "PNG")
    >>> open_image(buf.getvalue()).size
    (4, 3)
    """
    with warnings.catch_warnings():
        # Pillow warns (on stderr, once per image) before our own refusal says the same in one line.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return check_size(Image.open(io.BytesIO(bytes(data))))
