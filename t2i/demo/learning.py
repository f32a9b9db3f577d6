"""Does the demo's model draw what its prompt asks for? Measured on samples, in pixel space and in latent space.

Pixel space, what `demo/grid.png` shows: an image's colour is the demo palette colour that most of its foreground
pixels (those far from the background) lie nearest to; its shape is the template -- circle, square or triangle, drawn
as the demo data draws them, in the bounding box of that colour's pixels -- that overlaps those pixels best.
Latent space: whether a sampled latent lies nearest its own class's mean training latent, on the whole latent and on
pooled per-channel statistics.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from t2i.demo.shapes import BACKGROUND, COLOURS, SHAPES, class_of_caption, draw_shape

FOREGROUND = 60  # summed |RGB - background| over which a pixel is foreground; palette colours are >= 245 away
NEAR_PALETTE = 120  # RGB distance within which a foreground pixel counts for a palette colour
MIN_PIXELS = 8  # fewer pixels of the dominant colour than this: no shape drawn


@dataclass(frozen=True)
class Seen:
    """What an image shows: its dominant palette colour and best-matching shape (None when there is no shape)."""

    colour: str | None
    shape: str | None


def shape_templates(box, size) -> dict:
    """shape -> boolean mask of that shape filling `box` in a size x size image."""
    out = {}
    for shape in SHAPES:
        img = Image.new("L", (size, size), 0)
        draw_shape(ImageDraw.Draw(img), shape, box, 255)
        out[shape] = np.asarray(img) > 127
    return out


def foreground(pixels) -> np.ndarray:
    """Boolean mask of the pixels (RGB, any leading dims) far from the demo background."""
    return np.abs(np.asarray(pixels, np.float32) - np.array(BACKGROUND, np.float32)).sum(-1) > FOREGROUND


def classify(image) -> Seen:
    """The colour and shape an RGB uint8 image shows."""
    pixels = np.asarray(image, np.float32)
    foreground_pixels = foreground(pixels)
    names = list(COLOURS)
    dist = np.linalg.norm(pixels[..., None, :] - np.array([COLOURS[n] for n in names], np.float32), axis=-1)
    nearest = np.where(foreground_pixels & (dist.min(-1) < NEAR_PALETTE), dist.argmin(-1), -1)
    counts = np.bincount(nearest[nearest >= 0], minlength=len(names))
    if counts.max() < MIN_PIXELS:
        return Seen(None, None)
    best = int(counts.argmax())
    mask = nearest == best
    ys, xs = np.nonzero(mask)
    box = (xs.min(), ys.min(), xs.max(), ys.max())
    overlap = {shape: (mask & t).sum() / (mask | t).sum() for shape, t in shape_templates(box, mask.shape[0]).items()}
    return Seen(names[best], max(overlap, key=overlap.get))


def pixel_measures(images, prompts) -> dict:
    """Shares of images (images[i] sampled for prompts[i]) showing the prompt's colour, its shape, and both."""
    hits = np.array([(seen.colour == c, seen.shape == s) for seen, (c, s) in
                     ((classify(img), class_of_caption(p)) for img, p in zip(images, prompts))], bool)
    return {"colour": float(hits[:, 0].mean()), "shape": float(hits[:, 1].mean()),
            "colour_and_shape": float(hits.all(1).mean())}


def pixel_chance() -> dict:
    return {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "colour_and_shape": 1 / (len(COLOURS) * len(SHAPES))}


def class_means(store_path, data_dir) -> dict:
    """caption -> mean scaled training latent (posterior means of the unflipped view)."""
    import json

    from t2i.data.store import LatentStore

    rows = [json.loads(line) for line in (Path(data_dir) / "metadata.jsonl").read_text().splitlines() if line]
    captions = {r["file_name"]: r["text"] for r in rows}
    store = LatentStore.open(store_path)
    slots = store.valid_slots()
    moments = store.read(slots).moments
    ids = store["sample_id"][:][slots]
    means = moments[:, 0, : moments.shape[2] // 2].astype(np.float32) * store.scaling_factor
    by_class = {}
    for sid, m in zip(ids, means):
        by_class.setdefault(captions[str(sid)], []).append(m)
    return {c: np.mean(v, axis=0) for c, v in sorted(by_class.items())}


def pooled(latent):
    """Per-channel spatial mean and std: what a class's colour changes, whatever the shape's position and size."""
    flat = latent.reshape(latent.shape[0], -1)
    return np.concatenate([flat.mean(1), flat.std(1)])


def latent_measures(latents, prompts, means) -> dict:
    """Shares of latents (latents[i] sampled for prompts[i]) nearest their own class's mean training latent: on the
    whole latent, and on pooled statistics (the demo's shapes sit at random positions, so the whole-latent class mean
    is a blur and its distance is dominated by position), for the class and for its colour alone."""
    names = list(means)
    full = np.stack([means[n].ravel() for n in names])
    pool = np.stack([pooled(means[n]) for n in names])
    hits = []
    for latent, prompt in zip(latents, prompts):
        nearest_full = names[int(np.argmin(((full - latent.ravel()) ** 2).sum(1)))]
        nearest_pool = names[int(np.argmin(((pool - pooled(latent)) ** 2).sum(1)))]
        hits.append((nearest_full == prompt, nearest_pool == prompt,
                     class_of_caption(nearest_pool)[0] == class_of_caption(prompt)[0]))
    hits = np.array(hits, bool)
    return {"nearest_class_mean": float(hits[:, 0].mean()), "pooled_nearest_class": float(hits[:, 1].mean()),
            "pooled_nearest_colour": float(hits[:, 2].mean())}


def latent_chance(classes: int) -> dict:
    return {"nearest_class_mean": 1 / classes, "pooled_nearest_class": 1 / classes,
            "pooled_nearest_colour": 1 / len(COLOURS)}


def decode(model, latents) -> np.ndarray:
    """Scaled latents (N, C, h, w) to RGB uint8 images (N, H, W, 3) with the model's VAE, as the pipeline decodes."""
    import mindspore as ms

    from t2i.interop.models import load_vae

    vae = load_vae(Path(model))
    images = vae.decode(ms.Tensor(latents / vae.config.scaling_factor, ms.float32))[0].asnumpy()
    images = np.clip(images / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return (images * 255).round().astype(np.uint8)


def sample_latents(model, prompts, per_prompt, out_dir, resolution, steps, guidance_scale, scheduler=None,
                   device_target=None):
    """`per_prompt` latents for each prompt from t2i-infer (one compiled run, seed 0), prompt by prompt:
    (len(prompts) * per_prompt, C, h, w)."""
    from t2i.infer import InferConfig, run

    paths = run(InferConfig(prompt=tuple(prompts), model=str(model), output=str(out_dir), output_type="latent",
                            num_images_per_prompt=per_prompt, height=resolution, width=resolution,
                            num_inference_steps=steps, guidance_scale=guidance_scale, scheduler=scheduler, seed=0,
                            overwrite=True, jit=True,
                            device_target=device_target))
    return np.stack([np.load(p) for p in paths])
