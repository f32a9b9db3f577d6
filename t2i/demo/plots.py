"""The demo's pictures, drawn with matplotlib's Agg canvas (no display needed): the loss curves and the grid of samples
from the base and the trained model."""

import io

import numpy as np

from t2i.core.atomic import atomic_write_bytes


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path, dpi):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    return path


def moving_average(values, window):
    return np.convolve(values, np.ones(window) / window, mode="valid")


def loss_plot(history, path, title="training loss"):
    """Train loss and its moving average per step, and the held-out loss with the right and with shuffled captions
    at each validation, from train_log.jsonl's records."""
    rows = [r for r in history if r.get("loss") is not None]
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows], float)
    window = max(1, len(loss) // 20)
    val = [r for r in history if r.get("val_loss") is not None]
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    ax.plot(steps, loss, lw=0.8, alpha=0.35, color="tab:blue", label="train loss")
    ax.plot(steps[window - 1 :], moving_average(loss, window), lw=2, color="tab:blue",
            label=f"train loss, moving average of {window} steps")
    if val:
        val_steps = [r["step"] for r in val]
        ax.plot(val_steps, [r["val_loss"] for r in val], "o-", color="tab:green",
                label="held-out loss, right captions")
        ax.plot(val_steps, [r["val_loss_shuffled"] for r in val], "s--", color="tab:red",
                label="held-out loss, shuffled captions")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (MSE of the predicted noise)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path, dpi=100)


def mosaic(images, gap=2):
    """(rows, cols, H, W, 3) uint8 -> one image, white gaps between the tiles."""
    rows, cols, h, w, _ = images.shape
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for r in range(rows):
        for c in range(cols):
            out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = images[r, c]
    return out


def sample_grid(panels: dict, prompts, path, title=None, pixels_per_pixel=2):
    """Panels side by side, one per model (title -> images of shape (len(prompts), n, H, W, 3)), a row per prompt,
    labelled with the prompt."""
    tiles = {name: mosaic(images) for name, images in panels.items()}
    height, width = next(iter(tiles.values())).shape[:2]
    dpi = 100
    label_width = 1.4
    fig = _figure(label_width + len(tiles) * width * pixels_per_pixel / dpi + 0.3,
                  height * pixels_per_pixel / dpi + (0.9 if title else 0.6))
    axes = fig.subplots(1, len(tiles), sharey=True)
    rows = len(prompts)
    centres = (np.arange(rows) + 0.5) * (height + 2) / rows - 1
    for ax, (name, tile) in zip(np.atleast_1d(axes), tiles.items()):
        ax.imshow(tile, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks(centres, prompts, fontsize=9)
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path, dpi=dpi)
