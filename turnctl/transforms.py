"""Image preprocessing and training augmentation without torchvision.

Every transform here is a picklable, module-level callable ``PIL.Image -> FloatTensor[3, H, W]``,
so WebDataset/DataLoader workers started with spawn or forkserver can use it.
torchvision is deliberately absent: its PyPI wheel does not import next to the CPU torch wheel, and
transformers' image processors may try to import it. Decoding, resizing and cropping use PIL;
normalisation is one fused multiply-add on a tensor made with ``torch.from_numpy`` (no per-pixel
Python), so a transform costs little more than the JPEG decode it follows.

With ``normalize=False`` a transform returns the uint8 tensor [3, H, W] instead, and
:func:`normalize` does the float conversion per batch, e.g. on the GPU: a quarter of the bytes
between DataLoader workers and the trainer, and no per-image float pass on the CPU. Use it where
the reader's throughput matters (small images, where the float pass is a sizeable part of a decode).

Randomness comes from torch's global RNG only. DataLoader seeds it differently in every worker
(``base_seed + worker_id``), so augmentation is reproducible from the run seed and differs across
workers, without any seeding code here.

>>> from PIL import Image
>>> pp = Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
>>> eval_transform(pp)(Image.new("L", (50, 40))).shape
torch.Size([3, 32, 32])
>>> train_transform(pp, "cifar")(Image.new("RGB", (50, 40))).shape
torch.Size([3, 32, 32])
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from PIL import Image

AUGMENTS = ("none", "flip", "cifar", "imagenet")

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# PIL's integer codes, as Hugging Face image-processor configs store them ("resample": 3).
RESAMPLE_BY_CODE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input tensor (a backbone's ``preprocess``).

    * ``image_size``: side of the square tensor fed to the model.
    * ``resize_to``: shorter side after an aspect-preserving resize, before a centre crop to
      ``image_size`` (ConvNeXt/ResNet style: 256 -> 224). ``None``: no separate resize side.
    * ``crop``: centre-crop to ``image_size``. With ``resize_to=None`` and ``crop=True`` the shorter
      side is resized to ``image_size`` and the rest cropped (CLIP style); with ``crop=False`` the
      whole image is resized to ``image_size x image_size`` ignoring the aspect (ViT style, and
      the right thing for small square datasets such as CIFAR or digits).
    * ``mean``, ``std``, ``rescale``: ``x = (pixel * rescale - mean) / std`` per channel.
    * ``interpolation``: PIL resampling filter (nearest, bilinear, bicubic, lanczos).

    >>> Preprocess(224, resize_to=256, crop=True).with_image_size(112).resize_to
    128
    """

    image_size: int
    resize_to: Optional[int] = None
    crop: bool = False
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    rescale: float = 1.0 / 255.0
    interpolation: str = "bilinear"

    def __post_init__(self):
        # Frozen dataclass: normalise sequences to tuples so instances hash and compare by value.
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.resize_to is not None and not self.crop:
            raise ValueError("resize_to needs crop=True (an aspect-preserving resize alone is not square)")
        if self.resize_to is not None and self.resize_to < self.image_size:
            raise ValueError(f"resize_to={self.resize_to} is smaller than image_size={self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std must have 3 entries and std must be positive")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}")

    def with_image_size(self, image_size: int) -> "Preprocess":
        """The same recipe at another input size; ``resize_to`` keeps its ratio to the crop."""
        resize_to = None
        if self.resize_to is not None:
            resize_to = max(image_size, int(round(image_size * self.resize_to / self.image_size)))
        return dataclasses.replace(self, image_size=int(image_size), resize_to=resize_to)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Preprocess":
        return cls(**d)


# ---- the shared pieces -----------------------------------------------------------------------

def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Grayscale is replicated; 16-bit grayscale keeps its high byte."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # PIL's convert("RGB") clips 16-bit values at 255; scale to 8 bits instead.
        arr = np.asarray(img, dtype=np.int64)
        top = max(int(arr.max()), 1)
        shift = max(0, top.bit_length() - 8)
        img = Image.fromarray((arr >> shift).clip(0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def _draft(img: Image.Image, side: int) -> None:
    """Let libjpeg decode at a reduced scale when the image is much larger than needed.

    DCT-domain downscaling skips most of the decode work for large photos (WebVision, Clothing1M);
    PIL guarantees the drafted size stays >= the requested one, so the final resize still only
    shrinks. PIL ignores the call once the pixels are loaded. Note that it changes how the
    caller's (not yet loaded) image object decodes: transforms consume their input.
    """
    if getattr(img, "format", None) == "JPEG":
        try:
            img.draft("RGB", (side, side))
        except (AttributeError, ValueError, OSError):  # pragma: no cover - decoder without draft
            pass


def resize_crop(img: Image.Image, pp: Preprocess) -> Image.Image:
    """Deterministic geometry of :class:`Preprocess`: resize (+ centre crop) to a square."""
    s = pp.image_size
    resample = _RESAMPLE[pp.interpolation]
    if not pp.crop:
        _draft(img, s)
        img = to_rgb(img)
        return img if img.size == (s, s) else img.resize((s, s), resample)
    short = pp.resize_to or s
    _draft(img, short)
    img = to_rgb(img)
    w, h = img.size
    if min(w, h) != short:
        # Hugging Face rounds the long side down (int), as does torchvision; keep that.
        if w <= h:
            nw, nh = short, max(short, int(short * h / w))
        else:
            nw, nh = max(short, int(short * w / h)), short
        img = img.resize((nw, nh), resample)
        w, h = nw, nh
    if (w, h) != (s, s):
        left, top = (w - s) // 2, (h - s) // 2  # Hugging Face's centre_crop convention
        img = img.crop((left, top, left + s, top + s))
    return img


def _affine_params(pp: Preprocess):
    """Per-channel scale and shift so that normalisation is a single fused multiply-add."""
    std = torch.tensor(pp.std, dtype=torch.float32).view(3, 1, 1)
    mean = torch.tensor(pp.mean, dtype=torch.float32).view(3, 1, 1)
    return pp.rescale / std, -mean / std


def to_tensor(img: Image.Image, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB PIL image -> normalised float tensor [3, H, W] (contiguous)."""
    return torch.addcmul(shift, to_uint8_tensor(img).to(torch.float32), scale)


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, H, W] (contiguous, writable)."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def normalize(x: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """uint8 (or raw-valued float) images [..., 3, H, W] -> normalised float32, on x's device.

    The batch counterpart of the transforms' own normalisation, for ``normalize=False`` pipelines.

    >>> pp = Preprocess(2, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    >>> normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8), pp).shape
    torch.Size([1, 3, 2, 2])
    """
    scale, shift = _affine_params(preprocess)
    return torch.addcmul(shift.to(x.device), x.to(torch.float32), scale.to(x.device))


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


# ---- transforms ------------------------------------------------------------------------------

class EvalTransform:
    """Resize (+ centre crop), rescale and normalise; grayscale and palette images become RGB.

    >>> from PIL import Image
    >>> t = EvalTransform(Preprocess(8, mean=(0, 0, 0), std=(1, 1, 1)))
    >>> float(t(Image.new("RGB", (16, 16), (255, 0, 0)))[0].mean())
    1.0
    """

    def __init__(self, preprocess: Preprocess, *, normalize: bool = True):
        self.preprocess, self.normalize = preprocess, normalize
        self._scale, self._shift = _affine_params(preprocess)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = resize_crop(img, self.preprocess)
        if not self.normalize:
            return to_uint8_tensor(img)
        return to_tensor(img, self._scale, self._shift)

    def __repr__(self) -> str:
        return f"EvalTransform({self.preprocess}, normalize={self.normalize})"


class TrainTransform:
    """Training-time augmentation followed by the same normalisation as :class:`EvalTransform`.

    * ``none``: identical to the eval transform.
    * ``flip``: eval geometry, then a horizontal flip with probability 0.5.
    * ``cifar`` (paper: flip + random affine): eval geometry, then a random affine with rotation
      in [-15, 15] degrees, translation up to 10% of the side and scale in [0.9, 1.1] (the paper
      does not give the parameters; these are ours), black fill, then a flip with p = 0.5.
    * ``imagenet`` (paper: random resized crop + flip + colour jitter): a crop of 8-100% of the
      area with aspect ratio in [3/4, 4/3] (10 tries, then the central crop, as torchvision),
      resized to ``image_size``; a flip with p = 0.5; brightness, contrast and saturation jitter
      of +-0.4 each, applied in a random order.
    """

    def __init__(self, preprocess: Preprocess, augment: str = "none", *,
                 degrees: float = 15.0, translate: float = 0.1, scale: Tuple[float, float] = (0.9, 1.1),
                 crop_scale: Tuple[float, float] = (0.08, 1.0),
                 crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3), jitter: float = 0.4,
                 normalize: bool = True):
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        self.preprocess, self.augment, self.normalize = preprocess, augment, normalize
        self.degrees, self.translate, self.scale = degrees, translate, tuple(scale)
        self.crop_scale, self.crop_ratio, self.jitter = tuple(crop_scale), tuple(crop_ratio), jitter
        self._scale, self._shift = _affine_params(preprocess)

    # -- geometry ------------------------------------------------------------------------------
    def _random_affine(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        angle = math.radians(_uniform(-self.degrees, self.degrees))
        s = _uniform(*self.scale)
        tx = round(_uniform(-self.translate, self.translate) * w)
        ty = round(_uniform(-self.translate, self.translate) * h)
        cx, cy = w * 0.5, h * 0.5
        # PIL maps each output pixel to an input pixel, so it needs the inverse of
        # out = R(angle) * s * (in - c) + c + t, i.e. in = R(-angle) / s * (out - c - t) + c.
        cos, sin = math.cos(angle) / s, math.sin(angle) / s
        a, b, d, e = cos, sin, -sin, cos
        ox, oy = cx + tx, cy + ty
        c = cx - a * ox - b * oy
        f = cy - d * ox - e * oy
        return img.transform((w, h), Image.Transform.AFFINE, (a, b, c, d, e, f),
                             resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))

    def _random_resized_crop(self, img: Image.Image) -> Image.Image:
        img = to_rgb(img)
        w, h = img.size
        area = w * h
        log_r = (math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]))
        box = None
        for _ in range(10):
            target = area * _uniform(*self.crop_scale)
            ratio = math.exp(_uniform(*log_r))
            cw = int(round(math.sqrt(target * ratio)))
            ch = int(round(math.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                left = int(torch.randint(0, w - cw + 1, ()))
                top = int(torch.randint(0, h - ch + 1, ()))
                box = (left, top, left + cw, top + ch)
                break
        if box is None:  # torchvision's fallback: the central crop at the clamped aspect ratio
            in_ratio = w / h
            if in_ratio < self.crop_ratio[0]:
                cw, ch = w, int(round(w / self.crop_ratio[0]))
            elif in_ratio > self.crop_ratio[1]:
                ch, cw = h, int(round(h * self.crop_ratio[1]))
            else:
                cw, ch = w, h
            left, top = (w - cw) // 2, (h - ch) // 2
            box = (left, top, left + cw, top + ch)
        s = self.preprocess.image_size
        # resize(box=...) crops and resizes in one pass over the pixels.
        return img.resize((s, s), _RESAMPLE[self.preprocess.interpolation], box=box)

    # -- colour (on the float tensor in [0, 255], before normalisation) ----------------------
    def _colour_jitter(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = max(0.0, 1.0 - self.jitter), 1.0 + self.jitter
        weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        for op in torch.randperm(3).tolist():
            f = _uniform(lo, hi)
            if op == 0:  # brightness
                x = x * f
            elif op == 1:  # contrast: blend with the mean grey level
                grey = (x * weights).sum(0).mean()
                x = x * f + grey * (1.0 - f)
            else:  # saturation: blend with the per-pixel grey image
                grey = (x * weights).sum(0, keepdim=True)
                x = x * f + grey * (1.0 - f)
            x = x.clamp_(0.0, 255.0)
        return x

    def __call__(self, img: Image.Image) -> torch.Tensor:
        pp = self.preprocess
        if self.augment == "imagenet":
            img = self._random_resized_crop(img)
        else:
            img = resize_crop(img, pp)
            if self.augment == "cifar":
                img = self._random_affine(img)
        if self.augment != "none" and float(torch.rand(())) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.augment == "imagenet":
            x = self._colour_jitter(to_uint8_tensor(img).to(torch.float32))
            if not self.normalize:
                return x.round_().to(torch.uint8)
            return torch.addcmul(self._shift, x, self._scale)
        if not self.normalize:
            return to_uint8_tensor(img)
        return to_tensor(img, self._scale, self._shift)

    def __repr__(self) -> str:
        return f"TrainTransform({self.preprocess}, augment={self.augment!r}, normalize={self.normalize})"


def eval_transform(preprocess: Preprocess, *, normalize: bool = True) -> EvalTransform:
    """The deterministic transform used for feature extraction, per-sample losses and eval.

    ``normalize=False``: return uint8 [3, H, W] and call :func:`normalize` on the batch.

    >>> from PIL import Image
    >>> eval_transform(Preprocess(16))(Image.new("RGB", (20, 30))).shape
    torch.Size([3, 16, 16])
    """
    return EvalTransform(preprocess, normalize=normalize)


def train_transform(preprocess: Preprocess, augment: str = "none", **options) -> TrainTransform:
    """The training transform for ``data.augment`` (none | flip | cifar | imagenet).

    ``options`` tune the augmentation (``degrees``, ``translate``, ``scale``, ``crop_scale``,
    ``crop_ratio``, ``jitter``, ``normalize``); the defaults are documented on
    :class:`TrainTransform`.

    >>> from PIL import Image
    >>> _ = torch.manual_seed(0)
    >>> train_transform(Preprocess(16), "imagenet")(Image.new("RGB", (40, 30))).shape
    torch.Size([3, 16, 16])
    """
    return TrainTransform(preprocess, augment, **options)
