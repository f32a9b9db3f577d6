"""Image bytes to the pixel crops precompute encodes: decoding to RGB, the seed's resize + crop, scaling to [-1, 1]."""

import io
import random

import numpy as np
from PIL import Image, ImageOps

from t2i.core.cli import first_line


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes to an RGB PIL image; raises ValueError with a one-line reason for anything unusable."""
    if not data:
        raise ValueError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ValueError(f"over PIL's decompression-bomb limit, which --max_image_pixels cannot lift ({e})") from None
    except Exception:
        raise ValueError("not an image") from None
    if img.width * img.height > max_pixels:
        raise ValueError(f"{img.width}x{img.height} exceeds the pixel limit {max_pixels} (--max_image_pixels)")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except Exception as e:
        raise ValueError(f"unreadable image ({first_line(e)})") from None
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):
        # 16-bit greyscale: PIL's convert clips at 255 (almost everything would turn white), so scale to 8 bits.
        grey = np.asarray(img, np.float64) / 257.0
        img = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become white, as most viewers show them, instead of whatever colour hides behind alpha.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def read_image(sample, max_pixels: int):
    """(bytes, RGB image) of a data set sample; ValueError with a one-line reason for anything unusable."""
    try:
        data = sample.read()
    except OSError as e:
        raise ValueError(f"unreadable file ({e.strerror or e})") from None
    return data, decode_image(data, max_pixels)


def target_size(resolution) -> tuple:
    """(width, height) of a crop: `resolution` is a square's side or an aspect bucket's (width, height)."""
    return (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)


def resized_size(size, resolution) -> tuple:
    """(width, height) an image of `size` is resized to before cropping: the smallest that covers the target."""
    target_w, target_h = target_size(resolution)
    width, height = size
    if width * target_h <= height * target_w:
        return (target_w, max(target_h, int(target_w * height / width)))
    return (max(target_w, int(target_h * width / height)), target_h)


def crops(img: Image.Image, resolution, center_crop: bool, num_crops: int, rng: random.Random | None):
    """The seed's torchvision transform, Resize bilinear until the image covers the target then Center/RandomCrop,
    taken `num_crops` times from one resize: [(crop, (top, left) in the resized image)]. `resolution` is a square's
    side or an aspect bucket's (width, height); a square is the seed's Resize(resolution) on the short side.

    Random crops draw top then left from `rng` for each crop in turn, so crop 0 of N is the crop a single-crop run
    takes with the same rng. An image of the target's shape has one crop position only, so its N crops are the same.
    """
    target_w, target_h = target_size(resolution)
    img = img.resize(resized_size(img.size, resolution), Image.BILINEAR)
    out = []
    for _ in range(num_crops):
        if center_crop:
            top, left = int(round((img.height - target_h) / 2)), int(round((img.width - target_w) / 2))
        else:
            top, left = rng.randint(0, img.height - target_h), rng.randint(0, img.width - target_w)
        out.append((img.crop((left, top, left + target_w, top + target_h)), (top, left)))
    return out


def to_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img, np.float32).transpose(2, 0, 1) / 127.5 - 1.0
