"""Image bytes -> RGB picture -> tensor, under the limits every reader holds images to.

:func:`decode_image` is the one decoder of shard images (the pixel limit of turnctl/pixels.py, no
half-decoded truncated files), :func:`check_pil` refuses a process where some library made PIL
accept truncated images, and :class:`ToTensorResize` is the minimal picklable transform of tests
and benchmarks.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFile

from turnctl import pixels
from turnctl.errors import TurnctlError


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes (JPEG, PNG, WebP, ...) to an RGB :class:`PIL.Image.Image`.

    Raises ``OSError`` (``PIL.UnidentifiedImageError`` for garbage) or ``ValueError`` for bytes that
    are not a complete image. Truncated files are an error, not a half-grey picture: this relies on
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` staying False (Pillow's default; turnctl never sets it).
    An image that declares more than ``turnctl.pixels.MAX_PIXELS`` pixels raises
    ``turnctl.pixels.TooManyPixels`` (a ValueError) before its pixels are allocated: the limit
    ``turnctl prepare`` applies, so a shard written by hand cannot carry a decompression bomb past it.

    >>> decode_image(open("cat.jpg", "rb").read()).mode      # doctest: +SKIP
    'RGB'
    """
    if not data:
        raise ValueError("empty image member")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone in this process flipped the global; a truncated JPEG would decode silently.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; turnctl needs it False")
    im = pixels.open_image(data)  # header only; the declared size is checked before any pixel
    im.load()  # decode now: errors surface here, inside the caller's try, not in the transform
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def check_pil() -> None:
    # Checked once per epoch in the main process; decode_image checks again in the workers.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise TurnctlError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True by some library in this process; "
            "turnctl needs it False so that truncated images are reported instead of half-decoded"
        )


class ToTensorResize:
    """Minimal transform: resize to ``size`` x ``size`` (bilinear) -> float tensor [3,H,W] in [0,1].

    Module-level and picklable, for tests and benchmarks; real preprocessing and augmentation
    live in ``turnctl.transforms``. Any picklable ``PIL.Image -> FloatTensor[3,H,W]`` works as a
    ``transform`` argument.
    """

    def __init__(self, size: int, *, resample: int = Image.BILINEAR):
        self.size = int(size)
        self.resample = resample

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), self.resample)
        # Contiguous CHW like turnctl.transforms: batching is then a plain copy (a permuted HWC view
        # costs ~4x more to stack).
        a = np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
        return torch.from_numpy(a).to(torch.float32).div_(255.0)

    def __repr__(self) -> str:
        return f"ToTensorResize({self.size})"
