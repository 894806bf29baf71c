"""Thumbnails of a few samples, read from a split's shards by idx: the gallery of the HTML report.

The page shows at most a few hundred images of a split that may hold millions, so only what those
need is read: the shards that hold a wanted idx, and in them the ``idx`` members (``turnctl index``
shards: the label member, whose position gives the idx, as turnctl.report.keys reads them), then
the image members of the wanted keys. Every other member is skipped by seeking past it
(turnctl.data.iter_tar with a suffix filter); only the wanted images are decoded
(turnctl.data.decode.decode_image, under turnctl/pixels.py's limit).

Prepare numbers a split's samples in shard order, so the shard holding an idx is found from the
shard sizes; that is a guess checked against the ``idx`` members, never trusted: an idx not found
where it should be is looked for in the other shards (nearest first) until every wanted one is found.
"""

from __future__ import annotations

import base64
import bisect
import io
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Set

from turnctl.data import iter_tar
from turnctl.data.decode import decode_image
from turnctl.data.format import IDX_TAR_ORDER, IMAGE_EXTS
from turnctl.data.tar import member_key, numbered_members

# Side of the square a thumbnail fits in: large enough to recognise a WebVision image, small
# enough that 100 of them weigh ~200-300 KB of data URIs.
THUMBNAIL_SIDE = 96
JPEG_QUALITY = 80


@dataclass(frozen=True)
class Thumbnail:
    """One encoded thumbnail (JPEG) and its size in pixels."""

    data: bytes
    width: int
    height: int
    mime: str = "image/jpeg"

    def data_uri(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


def make_thumbnail(image_bytes: bytes, side: int = THUMBNAIL_SIDE) -> Thumbnail:
    """Decode image bytes (decode_image: pixel limit, no half-decoded files) and shrink them to fit
    ``side`` x ``side`` (never enlarged), as a JPEG. Raises ``OSError``/``ValueError`` as decode_image.

    >>> from PIL import Image
    >>> buf = io.BytesIO(); Image.new("RGB", (300, 150), "red").save(buf, "PNG")
    >>> t = make_thumbnail(buf.getvalue(), 96)
    >>> (t.width, t.height), t.data[:2] == b"\\xff\\xd8", t.data_uri()[:23]
    ((96, 48), True, 'data:image/jpeg;base64,')
    """
    im = decode_image(image_bytes)
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return Thumbnail(buf.getvalue(), im.size[0], im.size[1])


def _shard_order(info: Any, wanted: Set[int]) -> List[int]:
    """Shard numbers to scan: first those that hold the wanted idx if prepare numbered the split in
    shard order (the usual case: nothing else is read), then the rest, nearest to those first."""
    if info.layout.idx == IDX_TAR_ORDER:
        # turnctl index: the shard of an idx is exact (first_idx per shard, checked by open_split).
        starts = [start for _, start, _ in info.layout.shards]
        return sorted({bisect.bisect_right(starts, i) - 1 for i in wanted if i >= 0})
    ends, total = [], 0
    for n in info.shard_sizes:
        total += n
        ends.append(total)
    likely = sorted({min(bisect.bisect_right(ends, i), len(ends) - 1) for i in wanted})
    rest = sorted((s for s in range(len(ends)) if s not in likely),
                  key=lambda s: min(abs(s - t) for t in likely) if likely else s)
    return likely + rest


def _keys_in_shard(info: Any, shard_no: int, f: Any, wanted: Set[int]) -> Dict[str, int]:
    """``{key: idx}`` of the wanted samples in one shard, from its idx (or label) members only."""
    found: Dict[str, int] = {}
    if info.layout.idx == IDX_TAR_ORDER:
        _, first, _ = info.layout.shards[shard_no]
        for name, _, pos in numbered_members(iter_tar(f, ("." + info.layout.label_member,))):
            if first + pos in wanted:
                found.setdefault(name[:name.find(".", name.rfind("/") + 1)], first + pos)
        return found
    for name, data in iter_tar(f, (".idx",)):
        kx = member_key(name)
        if kx is None or kx[1] != "idx":  # not e.g. train_idx
            continue
        try:
            i = int(data)
        except ValueError:
            continue  # a malformed member: the reader counts such samples as corrupt
        if i in wanted:
            found.setdefault(kx[0], i)
    return found


def read_thumbnails(info: Any, wanted: Iterable[int], *, side: int = THUMBNAIL_SIDE) -> Dict[int, Thumbnail]:
    """``{idx: Thumbnail}`` for the wanted idx of the split ``info`` (a turnctl.data.SplitInfo).

    An idx that is not in the shards, or whose image does not decode, is absent from the result
    (the page shows a placeholder); a shard that cannot be read raises ``OSError`` or
    ``tarfile.TarError``. The caller checks that the shards are the run's (turnctl.report.keys.keys_for).

    >>> from turnctl.data import open_split
    >>> sorted(read_thumbnails(open_split("shards/toy", "train"), [3, 7]))     # doctest: +SKIP
    [3, 7]
    """
    remaining = {int(i) for i in wanted if 0 <= int(i) < info.num_samples}
    out: Dict[int, Thumbnail] = {}
    image_exts = set(IMAGE_EXTS)
    for shard_no in _shard_order(info, remaining):
        if not remaining:
            break
        path = info.shard_paths[shard_no]
        with open(path, "rb", buffering=1 << 20) as f:
            keys = _keys_in_shard(info, shard_no, f, remaining)
            if not keys:
                continue
            f.seek(0)
            # The image members of exactly these keys: iter_tar's suffix filter matches name ends, so
            # "<key>.<ext>" also lets through a longer key ending the same way; member_key decides.
            suffixes = tuple(f"{k}.{e}".lower() for k in keys for e in IMAGE_EXTS)
            for name, data in iter_tar(f, suffixes):
                kx = member_key(name)
                if kx is None or kx[0] not in keys or kx[1] not in image_exts:
                    continue
                i = keys[kx[0]]
                if i in out:
                    continue  # a second image member of the same sample: the first one is shown
                try:
                    out[i] = make_thumbnail(data, side)
                except (OSError, ValueError):
                    pass  # undecodable: the reader counts it as corrupt; the page shows a placeholder
        remaining -= set(keys.values())
    return out


__all__ = ["THUMBNAIL_SIDE", "Thumbnail", "make_thumbnail", "read_thumbnails"]
