"""One row to the declared format: the ingest's settings (row format, split rule, limits), an image decoded,
converted to the declared mode and resized (or quarantined), points checked against their manifold, and a row's
split from its id alone. Run in the Ray tasks of `pipelines.ingest.run`."""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np

from pipelines.ingest.parts import Record, stable_hash

TRANSFORMS = ("center-crop", "resize")
WRITE_ROWS = 512  # rows a task buffers before appending a row group
WRITE_BYTES = 64 << 20  # ... or fewer, when they would hold more bytes than this (large images)
MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS): the default of --max-pixels
TASK_BASE_BYTES = 512 << 20  # a Ray worker with pyarrow, numpy and PIL loaded, before any row
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N")


@dataclass(frozen=True)
class Settings:
    """What every task needs besides its part: the declared row format and the split rule."""

    channels: int | None  # 1 or 3 (None for points)
    resolution: int | None  # H = W; None for points
    transform: str | None  # None: wrong sizes are quarantined
    seed: int
    test_fraction: float
    points: bool
    staging: str  # where the tasks write shards (a location of `pipelines.core.storage`)
    num_parts: int
    manifold: str | None = None  # points must lie on it (`fm.manifolds.get_manifold`)
    file_prefix: str = ""  # what the manifest puts before a shard's name: "" (moved into --out), "shards-<id>/"
    max_pixels: int = MAX_PIXELS  # an encoded image that decodes to more pixels is quarantined, never decoded

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of an image row (H = W = `resolution`); point rows have none."""
        if self.resolution is None or self.channels is None:
            raise ValueError("point rows have no image shape")
        return self.resolution, self.resolution, self.channels

    @property
    def row_bytes(self) -> int:
        if self.points:
            return 8  # a few floats
        h, w, c = self.image_shape
        return h * w * c

    @property
    def group_rows(self) -> int:
        """Rows per row group: `WRITE_ROWS`, fewer for large rows, so that a task's buffer stays near WRITE_BYTES."""
        return max(1, min(WRITE_ROWS, WRITE_BYTES // max(1, self.row_bytes)))

    def task_memory(self, encoded: bool) -> int:
        """Bytes one ingest task holds at most: its row group twice (the rows and the arrow table written from
        them), one decoded image of up to `max_pixels` (RGBA) and its converted copy, and the worker itself."""
        decoded = 2 * 4 * self.max_pixels if encoded else 0
        return TASK_BASE_BYTES + 2 * self.group_rows * self.row_bytes + decoded


# --- one image to the declared format ------------------------------------------------------------------------


def convert_mode(im, target: str):
    """A PIL image in mode `target` ("L" or "RGB") and the conversion made ("RGBA->RGB", None when none).

    Alpha is dropped (not composited), palettes expanded, CMYK converted by PIL's rule, grey replicated, RGB to grey
    by ITU-R 601 luma, and 16- or 32-bit grey scaled to 8 bits (x / 257), not clipped."""
    from PIL import Image

    mode = im.mode
    if mode == target:
        return im, None
    if mode.startswith("I"):  # 16-bit PNGs open as I;16 or I: scale 0..65535 to 0..255
        arr = np.asarray(im).astype(np.float64)
        im = Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        raise ValueError("floating-point image (mode F): no 8-bit meaning")
    elif mode == "P":  # via RGBA: a palette with a transparent index keeps its colours
        im = im.convert("RGBA")
    return (im if im.mode == target else im.convert(target)), f"{mode}->{target}"


def _resize(im, size: int, transform: str):
    """EDM dataset_tool's transforms with a Lanczos (antialiasing) filter: "center-crop" scales the shorter side to
    `size` and keeps the centre square; "resize" stretches to size x size."""
    from PIL import Image

    if transform == "resize":
        return im.resize((size, size), Image.Resampling.LANCZOS)
    w, h = im.size
    scale = size / min(w, h)
    w2, h2 = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((w2, h2), Image.Resampling.LANCZOS)
    left, top = (w2 - size) // 2, (h2 - size) // 2
    return im.crop((left, top, left + size, top + size))


def _from_array(array: np.ndarray):
    """A uint8 HW / HWC array as a PIL image ("L", "LA", "RGB", "RGBA" by channel count)."""
    from PIL import Image

    if array.dtype != np.uint8:
        raise ValueError(f"pixel dtype {array.dtype} is not uint8")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    modes: dict[int, str | dict[int, str]] = {2: "L", 3: {2: "LA", 3: "RGB", 4: "RGBA"}}
    by_ndim = modes.get(array.ndim)
    mode = by_ndim.get(array.shape[2]) if isinstance(by_ndim, dict) else by_ndim
    if mode is None:
        raise ValueError(
            f"wrong channel count: an image array of shape {list(array.shape)} (allowed: HW, or HWC "
            "with C in 1, 2, 3, 4)"
        )
    return Image.fromarray(np.ascontiguousarray(array), mode)


class _TooLarge(Exception):
    """An image above the pixel limit (raised before PIL decodes it)."""


def open_image(encoded: bytes, max_pixels: int = MAX_PIXELS):
    """A decoded PIL image; ValueError with the reason when the bytes are empty, undecodable, or would decode to
    more than `max_pixels` pixels (checked from the header, before any pixel is decoded)."""
    from PIL import Image, UnidentifiedImageError

    if not encoded:
        raise ValueError("empty file (0 bytes)")
    Image.MAX_IMAGE_PIXELS = None  # the limit is ours (`max_pixels`), checked below; PIL's would raise its own error
    try:
        im = Image.open(io.BytesIO(encoded))
        w, h = im.size
        if w * h > max_pixels:
            raise _TooLarge(
                f"decodes to {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,} "
                "(--max-pixels; a decompression bomb, or a photo larger than the limit allows)"
            )
        im.load()
        return im
    except _TooLarge as err:
        raise ValueError(str(err)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        why = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))  # the same reason in every process
        raise ValueError(f"undecodable image bytes ({type(err).__name__}: {why})") from None


def prepare(record: Record, s: Settings) -> tuple[np.ndarray, str | None, bool]:
    """A record as the declared uint8 [H, W, C] array (float32 [D] for points), the mode conversion made and
    whether it was resized; raises ValueError with the reason it cannot be used."""
    if record.error:
        raise ValueError(record.error)
    if s.points:
        point = np.asarray(record.array, dtype=np.float32)
        if s.manifold:
            _check_on_manifold(point, s.manifold)
        return point, None, False
    size, _, channels = s.image_shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's decompression-bomb and palette notes: the row is checked below
        if record.array is not None:
            im = _from_array(record.array)
        elif record.encoded is not None:
            im = open_image(record.encoded, s.max_pixels)
        else:
            raise ValueError("the record holds neither an array nor encoded bytes")
        im, conversion = convert_mode(im, "L" if channels == 1 else "RGB")
        resized = False
        if im.size != (size, size):
            if s.transform is None:
                w, h = im.size
                raise ValueError(
                    f"wrong size {h}x{w}, expected {size}x{size} (--transform center-crop or resize makes it fit)"
                )
            im, resized = _resize(im, size, s.transform), True
        arr = np.asarray(im, dtype=np.uint8)
    return arr.reshape(size, size, channels), conversion, resized


def _check_on_manifold(point: np.ndarray, manifold: str) -> None:
    """Raise ValueError with the reason a point row is not on the manifold (shape, norm or angle range)."""
    import torch

    from fm.manifolds import get_manifold

    m = get_manifold(manifold)
    x = torch.from_numpy(point.reshape(1, -1))
    if x.shape[1] != m.ambient_dim:
        m.check_points(x, "point")  # names the shape
    bad, what = m.outside(x)
    if bad.any():
        raise ValueError(f"point: {point.tolist()} {what}")


def split_of(record: Record, s: Settings) -> str:
    """The source's own split, else "test" for a fraction of ids by a hash of (seed, id): the same row lands in the
    same split whatever the order, the batching or the parallelism."""
    if record.split:
        return record.split
    return "test" if stable_hash(f"{s.seed}/{record.id}") < s.test_fraction else "train"
