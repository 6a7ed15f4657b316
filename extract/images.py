"""Decode any image file into RGB uint8, and fit it to a model's input size.

Every failure raises ``ImageDecodeError`` naming the file, so a bad image in a
dataset of thousands is found at once.
"""

from __future__ import annotations

import errno
import io
import os
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps
from extract.errors import UserError

# Decoding threads already use every core; OpenCV's own pool would only oversubscribe them.
cv2.setNumThreads(1)

INTERPOLATIONS = {
    "auto": None,
    "area": cv2.INTER_AREA,
    "bicubic": cv2.INTER_CUBIC,
    "bilinear": cv2.INTER_LINEAR,
    "nearest": cv2.INTER_NEAREST,
    "lanczos": cv2.INTER_LANCZOS4,
}
# How a non-square image becomes a square model input: the centre square of the shorter side
# (the ImageNet evaluation transform), the whole image stretched to a square (DeCAF's crops),
# or the whole image padded to a square with PAD_VALUE (the ImageNet mean colour).
RESIZES = ("centre", "warp", "pad")
PAD_VALUE = (124, 116, 104)
# The views of one image whose features are averaged into its row (``view_inputs``): the input
# as ``fit_to_input`` makes it; it and its mirror; the four corners and the centre of a larger
# square; those five and their mirrors. Ten crops of 224 from 256: Krizhevsky et al. (NIPS 2012).
VIEWS = ("centre", "flip", "crops5", "crops10")
VIEW_COUNTS = {"centre": 1, "flip": 2, "crops5": 5, "crops10": 10}
CROP_FRACTION = 0.875  # a crop's side over the side of the square it is cut from
# Transparent pixels are shown on white, as a viewer would show them.
ALPHA_BACKGROUND = (255, 255, 255)
# Refuse images above this many pixels (after JPEG draft reduction): 4x PIL's bomb warning
# limit. PIL's own check is lifted for the header read, so that draft can apply first.
MAX_PIXELS = 4 * 89_478_485


class ImageDecodeError(UserError):
    """An image file could not be decoded. ``path`` names it."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode image {self.path}: {reason}")

    def __reduce__(self):  # crosses process boundaries intact
        return type(self), (self.path, self.reason)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and float images: scale the full range to 8 bits instead of clipping it.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


_PIL_LIMIT_LOCK = threading.Lock()
# The reason of every image that is not there, dangling and looping symbolic links included.
MISSING = "file not found"


def _missing_reason(path: Path) -> str:
    if path.is_symlink():
        return f"{MISSING} (dangling symbolic link to {os.readlink(path)})"
    return MISSING


# --ship-bytes (extract.distributed): the driver captures each file's encoded bytes instead of
# decoding it, and a worker decodes those bytes where ``read_image`` would have opened the file.
_CAPTURE: ContextVar[bool] = ContextVar("capture_bytes", default=False)
_SHIPPED: ContextVar[list | None] = ContextVar("shipped_bytes", default=None)


class _Captured(Exception):
    def __init__(self, data: bytes):
        self.data = data


def _read_error(path: Path, error: Exception, source=None) -> ImageDecodeError:
    """The ``ImageDecodeError`` for an exception raised while reading or decoding ``path``
    (from ``source``, its shipped bytes, if given: the reason names the path all the same)."""
    if isinstance(error, FileNotFoundError):
        return ImageDecodeError(path, _missing_reason(path))
    if isinstance(error, OSError) and error.errno == errno.ELOOP:
        return ImageDecodeError(path, MISSING + " (symbolic link loop)")
    text = str(error) if source is None else str(error).replace(repr(source), repr(str(path)))
    return ImageDecodeError(path, f"{type(error).__name__}: {text}")


def encoded_image(read, row: int, *, min_side: int | None = None) -> tuple[str, bytes]:
    """What a worker needs to compute ``read(row, min_side=...)`` without the file system:
    ``("file", the encoded bytes of the file read_image would open)``, or for datasets that are
    arrays (Fashion-MNIST), ``("array", the decoded image as .npy bytes)``. Raises
    ``ImageDecodeError`` as reading would. One image file per row."""
    token = _CAPTURE.set(True)
    try:
        image = read(row, min_side=min_side)
    except _Captured as captured:
        return "file", captured.data
    finally:
        _CAPTURE.reset(token)
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(image, dtype=np.uint8), allow_pickle=False)
    return "array", buffer.getvalue()


@contextmanager
def shipped_bytes(data: bytes):
    """Inside, the next ``read_image`` decodes ``data`` instead of opening its path."""
    token = _SHIPPED.set([data])
    try:
        yield
    finally:
        _SHIPPED.reset(token)


def decode_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _open_unchecked(path) -> Image.Image:
    """``Image.open`` without PIL's decompression-bomb check, which looks at the full size
    before a JPEG's reduced-scale decode (``draft``) can apply; ``read_image`` checks the
    size it will really decode against ``MAX_PIXELS`` instead. Opening reads the header only."""
    with _PIL_LIMIT_LOCK:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def read_image(path: str | Path, *, min_side: int | None = None) -> np.ndarray:
    """Return the image at ``path`` as an RGB ``uint8`` array of shape (H, W, 3).

    EXIF orientation is applied. With ``min_side``, large JPEGs are decoded at a
    reduced scale (a power of two) that keeps both sides at least ``min_side``, so
    a 20-megapixel photo costs little more than a thumbnail.
    """
    path = Path(path)
    if _CAPTURE.get():
        try:
            raise _Captured(path.read_bytes())
        except OSError as error:
            raise _read_error(path, error) from None
    shipped = _SHIPPED.get()
    source = io.BytesIO(shipped.pop()) if shipped else path
    try:
        with _open_unchecked(source) as image:
            if min_side is not None and image.format == "JPEG":
                width, height = image.size
                scale = max(min_side / min(width, height), 1e-6)
                image.draft("RGB", (max(1, round(width * scale)), max(1, round(height * scale))))
            if image.size[0] * image.size[1] > MAX_PIXELS:
                raise ImageDecodeError(
                    path, f"image of {image.size[0]}x{image.size[1]} = {image.size[0] * image.size[1]:,} pixels is beyond "
                    f"the limit of {MAX_PIXELS:,} pixels" + (" after reduced-scale decoding" if image.format == "JPEG" and min_side else "")
                    + "; downscale the file, or leave it out (ON_ERROR=skip)",
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
    except ImageDecodeError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise _read_error(path, error, None if source is path else source) from None
    array = np.asarray(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) == 0:
        raise ImageDecodeError(path, f"decoded to an unusable array of shape {array.shape}")
    return array


def fit_to_input(rgb: np.ndarray, size: int, *, crop_pct: float = 1.0, interpolation: str = "auto", resize: str = "centre") -> np.ndarray:
    """Turn an image into a ``size`` x ``size`` model input.

    ``resize="centre"``: centre-crop a square of ``crop_pct`` of the shorter side and resize
    it; the same output as "resize the shorter side to size / crop_pct, then centre-crop",
    the evaluation transform of timm and of the official EfficientNet code, but only the
    pixels that survive the crop are resampled. ``"warp"``: the central ``crop_pct`` of each
    side, stretched to the square (nothing of a wide bird box is lost). ``"pad"``: the
    central ``crop_pct`` of each side, padded to a square with ``PAD_VALUE``, then resized.
    ``auto`` resamples with area averaging when shrinking (no aliasing) and bicubic when enlarging.
    """
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"interpolation={interpolation!r} is not one of {sorted(INTERPOLATIONS)}")
    if not 0.0 < crop_pct <= 1.0:
        raise UserError(f"crop_pct must be in (0, 1]. Received: crop_pct={crop_pct}")
    if resize not in RESIZES:
        raise UserError(f"resize={resize!r} is not one of {RESIZES}")
    height, width = rgb.shape[:2]
    if resize == "centre":
        crop_height = crop_width = max(1, round(min(height, width) * crop_pct))
    else:
        crop_height, crop_width = max(1, round(height * crop_pct)), max(1, round(width * crop_pct))
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    crop = np.ascontiguousarray(rgb[top : top + crop_height, left : left + crop_width])
    if resize == "pad" and crop_height != crop_width:
        side = max(crop_height, crop_width)
        pad_top, pad_left = (side - crop_height) // 2, (side - crop_width) // 2
        crop = cv2.copyMakeBorder(crop, pad_top, side - crop_height - pad_top, pad_left, side - crop_width - pad_left,
                                  cv2.BORDER_CONSTANT, value=PAD_VALUE)
    if crop.shape[:2] == (size, size):
        return crop
    if interpolation == "auto":
        interpolation = "area" if min(crop.shape[:2]) > size else "bicubic"
    return cv2.resize(crop, (size, size), interpolation=INTERPOLATIONS[interpolation])


def model_input(rgb: np.ndarray, size: int, views: str, *, crop_pct: float = 1.0, interpolation: str = "auto",
                resize: str = "centre") -> np.ndarray:
    """A CNN featurizer's input for one image: (size, size, 3) for the centre view, else every view, (V, size, size, 3)."""
    options = dict(crop_pct=crop_pct, interpolation=interpolation, resize=resize)
    return fit_to_input(rgb, size, **options) if views == "centre" else view_inputs(rgb, size, views, **options)


def check_views(views: str) -> str:
    if views not in VIEWS:
        raise UserError(f"views={views!r} is not one of {', '.join(VIEWS)} (VIEWS= / --views)")
    return views


def views_side(size: int, views: str) -> int:
    """The side of the square that ``views`` are cut from, for a ``size`` x ``size`` input:
    ``size`` itself, or for the crops ``size / CROP_FRACTION`` (256 for 224)."""
    return round(size / CROP_FRACTION) if check_views(views).startswith("crops") else size


def corner_and_centre_crops(square: np.ndarray, size: int) -> np.ndarray:
    """(5, size, size, C): the top-left, top-right, bottom-left and bottom-right ``size`` x
    ``size`` crops of ``square``, then the centre one (offset ``(side - size) // 2``)."""
    side = square.shape[0]
    far, middle = side - size, (side - size) // 2
    corners = [(0, 0), (0, far), (far, 0), (far, far), (middle, middle)]
    return np.stack([square[top : top + size, left : left + size] for top, left in corners])


def view_inputs(rgb: np.ndarray, size: int, views: str, *, crop_pct: float = 1.0, interpolation: str = "auto",
                resize: str = "centre") -> np.ndarray:
    """The ``VIEW_COUNTS[views]`` model inputs of one image, (V, size, size, 3), from one decode.

    ``centre``: ``fit_to_input``'s input alone; ``flip``: it and its horizontal mirror.
    ``crops5``: ``fit_to_input`` at ``views_side(size, views)`` (the same ``resize`` and
    ``crop_pct``: the centre square, the warped image or the padded image, at 256 for a 224
    input), then its four corner crops and its centre crop at ``size``; ``crops10``: those
    five, then their mirrors in the same order.
    """
    square = fit_to_input(rgb, views_side(size, views), crop_pct=crop_pct, interpolation=interpolation, resize=resize)
    crops = square[None] if views in ("centre", "flip") else corner_and_centre_crops(square, size)
    if views in ("flip", "crops10"):
        crops = np.concatenate([crops, crops[:, :, ::-1]])
    return np.ascontiguousarray(crops)
