"""Image bytes for the shards: arrays become PNG; files pass through unless ``--max-side`` shrinks them.

Files are always decoded once (JPEGs at 1/8 scale through libjpeg's DCT scaling, which is cheap)
so that a truncated or corrupt image is found here, skipped and listed in the manifest, instead of
failing a training run hours later. JPEG, PNG and WebP bytes are kept as they are; other formats
(BMP, GIF, TIFF, ...) are re-encoded as PNG, losslessly. A shrink keeps the format (JPEG and WebP
at quality 90). The worker functions are module-level so that process pools can pickle them.

An image that declares more pixels than :data:`turnctl.pixels.MAX_PIXELS` (a decompression bomb)
is unreadable here, before its pixels are allocated: the same bound ``train``, ``eval`` and
``report`` apply to shard members (turnctl/pixels.py), so prepare never writes what they refuse.

    >>> import numpy as np
    >>> load_sample(np.zeros((8, 8), dtype=np.uint8))[0]
    'png'
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image

from turnctl import pixels

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
THUMB_SIDE = 8  # instance-noise features of file datasets: an 8x8 RGB thumbnail (D = 192)
QUALITY = 90
_KEEP = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class UnreadableImage(Exception):
    """The file is missing, truncated or not an image PIL can decode."""


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) or (H, W, 3) array (deterministic: fixed zlib level, no metadata).

    >>> encode_png(np.zeros((2, 2), dtype=np.uint8))[:4]
    b'\\x89PNG'
    """
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _shrink(im: Image.Image, max_side: int) -> Image.Image:
    if im.mode not in ("L", "RGB", "RGBA", "LA"):
        im = im.convert("RGBA" if ("transparency" in im.info or im.mode.endswith("A")) else "RGB")
    im = im.copy()
    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return im


def _encode(im: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext == "jpg":
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGB")
        im.save(buf, format="JPEG", quality=QUALITY)
    elif ext == "webp":
        im.save(buf, format="WEBP", quality=QUALITY)
    else:
        if im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
            im = im.convert("RGBA" if im.mode.endswith("A") else "RGB")
        im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def load_array(array: np.ndarray, *, max_side: Optional[int] = None) -> Tuple[str, bytes]:
    """("png", bytes) for an array image, shrunk first when larger than ``max_side``."""
    if max_side and max(array.shape[:2]) > max_side:
        return "png", _encode(_shrink(Image.fromarray(np.ascontiguousarray(array)), max_side), "png")
    return "png", encode_png(array)


def load_file(path: Union[str, Path], *, max_side: Optional[int] = None) -> Tuple[str, bytes]:
    """(extension, bytes) of an image file, verified by decoding; raises :class:`UnreadableImage`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UnreadableImage(f"cannot read: {exc.strerror or exc}") from None
    try:
        with warnings.catch_warnings():
            # pixels.check_size decides; Pillow's own warning (between its limit and twice it) is noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = pixels.open_image(data)
            fmt = im.format
            shrink = bool(max_side) and max(im.size) > max_side
            if fmt == "JPEG":
                # Decode at the smallest DCT scale that still covers what we need: full entropy
                # decoding (so truncation is caught) at a fraction of the cost.
                im.draft(im.mode if im.mode in ("L", "RGB") else "RGB",
                         (max_side, max_side) if shrink else (1, 1))
            im.load()
    except pixels.TooManyPixels as exc:
        raise UnreadableImage(f"too many pixels: {exc}") from None
    except Exception as exc:  # PIL raises many types for bad files; all mean "skip it"
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from None
    ext = _KEEP.get(fmt or "", "png")
    if not shrink and fmt in _KEEP:
        return ext, data
    return ext, _encode(_shrink(im, max_side) if shrink else im, ext)


def load_sample(item: Union[np.ndarray, str], max_side: Optional[int] = None
                ) -> Tuple[Optional[str], Union[bytes, str]]:
    """Worker entry point: (ext, bytes), or (None, reason) for an unreadable file."""
    if isinstance(item, np.ndarray):
        return load_array(item, max_side=max_side)
    try:
        return load_file(item, max_side=max_side)
    except UnreadableImage as exc:
        return None, str(exc)


def thumbnail(item: Union[np.ndarray, str], side: int = THUMB_SIDE) -> Optional[np.ndarray]:
    """A (side, side, 3) uint8 thumbnail for instance-noise features; None when unreadable."""
    try:
        if isinstance(item, np.ndarray):
            im = Image.fromarray(np.ascontiguousarray(item))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(item)
            try:
                pixels.check_size(im)
            except pixels.TooManyPixels:
                im.close()
                raise
            im.draft("RGB", (side, side))
        return np.asarray(im.convert("RGB").resize((side, side), Image.Resampling.BILINEAR), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None  # unreadable (pixels.TooManyPixels is a ValueError): the writer skips and lists it
