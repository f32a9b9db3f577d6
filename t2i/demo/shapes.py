"""The demo's data: coloured shapes on a light background, captioned "a <colour> <shape>", made in code.

`t2i-demo-data` writes them as an HF imagefolder (PNG files + metadata.jsonl) whose captions truly describe the images.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageDraw

from t2i.core.atomic import atomic_dir
from t2i.core.flags import check, command, flag

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 60, 220),
    "yellow": (235, 215, 40),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (245, 245, 245)


def render(colour, shape, rng, size):
    """One image: a coloured shape of random size and position on a light background."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    r = rng.uniform(0.25, 0.4) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    draw_shape(ImageDraw.Draw(img), shape, (cx - r, cy - r, cx + r, cy + r), COLOURS[colour])
    return img


def draw_shape(draw, shape, box, fill):
    """A shape filling the box (left, top, right, bottom): the demo images' and the learning check's templates."""
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=fill)


def demo_classes():
    return [(c, s) for c in COLOURS for s in SHAPES]


def caption(colour, shape):
    return f"a {colour} {shape}"


def class_of_caption(text):
    """(colour, shape) of a caption made by `caption`."""
    _, colour, shape = text.split()
    return colour, shape


def aspect_size(size: int, ratio: float) -> tuple:
    """(width, height) of about size² pixels with width / height about `ratio`, in multiples of 8."""
    return (max(8, round(size * ratio**0.5 / 8) * 8), max(8, round(size / ratio**0.5 / 8) * 8))


def render_aspect(colour, shape, rng, size, ratio):
    """`render`'s picture on a canvas of about size² pixels and aspect ratio `ratio` (width / height), at a random
    place along the long side."""
    if ratio == 1:
        return render(colour, shape, rng, size)
    width, height = aspect_size(size, ratio)
    square = render(colour, shape, rng, min(width, height))
    img = Image.new("RGB", (width, height), BACKGROUND)
    img.paste(square, (int(rng.integers(0, width - square.width + 1)), int(rng.integers(0, height - square.height + 1))))
    return img


def make_demo_data(output_dir, num_images: int = 48, size: int = 64, seed: int = 0, aspect_ratios=(1.0,)):
    """Write `num_images` PNGs cycling through every colour x shape class, with metadata.jsonl captions; with several
    aspect ratios (width / height), each round of the classes takes the next ratio, so every class has every ratio."""
    rng = np.random.default_rng(seed)
    classes = demo_classes()
    with atomic_dir(output_dir) as tmp:
        rows = []
        for i in range(num_images):
            colour, shape = classes[i % len(classes)]
            ratio = aspect_ratios[i // len(classes) % len(aspect_ratios)]
            name = f"{i:05d}_{colour}_{shape}.png"
            render_aspect(colour, shape, rng, size, ratio).save(Path(tmp) / name)
            rows.append({"file_name": name, "text": caption(colour, shape)})
        with open(Path(tmp) / "metadata.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return Path(output_dir)


@dataclass(frozen=True)
class DemoDataConfig:
    output_dir: str = flag(help="Folder to write the images to.")
    num_images: int = flag(48, min=1)
    resolution: int = flag(64, min=8)
    seed: int = flag(0)
    aspect_ratios: str = flag("1", "Comma-separated width/height ratios, e.g. 1,1.5,0.5: a mixed-aspect set for "
                                   "--aspect_buckets.")

    def __post_init__(self):
        check(self)
        if not self.ratios or min(self.ratios) <= 0:
            raise ValueError(f"--aspect_ratios must be positive numbers separated by commas, got {self.aspect_ratios!r}")

    @property
    def ratios(self) -> tuple:
        try:
            return tuple(float(r) for r in self.aspect_ratios.split(","))
        except ValueError:
            return ()


def write_demo_data(config: DemoDataConfig):
    click.echo(f"wrote {make_demo_data(config.output_dir, config.num_images, config.resolution, config.seed, config.ratios)}")


demo_data_cli = command(DemoDataConfig, write_demo_data, "Write a synthetic captioned image set (HF imagefolder with "
                        "metadata.jsonl).")
