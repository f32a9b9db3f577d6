"""README.md model card for a fine-tuned pipeline, in the shape the diffusers training scripts give theirs."""

from pathlib import Path

from t2i.atomic import atomic_write_bytes

TAGS = ["stable-diffusion", "text-to-image", "diffusers", "t2i", "mindspore"]
IMAGE_NAME = "val_imgs_grid.png"


def _hub_id(name) -> bool:
    """Front-matter fields such as base_model must name Hub repos; a local folder is mentioned in the text only."""
    return bool(name) and not Path(name).exists()


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _loss(value) -> str:
    return "not measured" if value is None else f"{value:.5f}"


def _image(output_dir: Path, validation_image) -> str | None:
    """Markdown path of the grid, relative to the card; an image outside output_dir is copied in so it gets uploaded."""
    if validation_image is None:
        return None
    source = Path(validation_image)
    if not source.is_file():
        raise ValueError(f"validation_image {source} does not exist")
    try:
        return source.resolve().relative_to(output_dir.resolve()).as_posix()
    except ValueError:
        atomic_write_bytes(output_dir / IMAGE_NAME, source.read_bytes())
        return IMAGE_NAME


def write_model_card(output_dir, *, base_model, dataset, config: dict, steps, final_loss, val_loss,
                     validation_image=None, lora: dict | None = None) -> Path:
    """Write output_dir/README.md: YAML front matter (licence placeholder, base model, tags) and the training record;
    `lora` (rank, alpha, target_modules): the folder holds a LoRA adapter for base_model, not a pipeline."""
    from huggingface_hub import ModelCard, ModelCardData

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data = ModelCardData(
        # The fine-tune inherits the base model's licence (SD 1.x: creativeml-openrail-m); "other" until it is set.
        license="other",
        base_model=base_model if _hub_id(base_model) else None,
        datasets=[dataset] if _hub_id(dataset) else None,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=TAGS + (["lora"] if lora else []),
        inference=True,
    )
    image = _image(output_dir, validation_image)
    lines = [
        f"# {output_dir.resolve().name}",
        "",
        (f"A LoRA adapter (rank {lora['rank']}, alpha {lora['alpha']:g}, on the UNet's "
         f"{', '.join(lora['target_modules'])} layers) for the base model **{base_model}**, trained on "
         f"**{dataset or 'a local image folder'}** with t2i (MindSpore + mindone) on cached VAE latents and CLIP text "
         "states. The base model is not in this folder: load it, then this adapter." if lora else
         f"A Stable Diffusion pipeline fine-tuned from **{base_model}** on **{dataset or 'a local image folder'}** "
         "with t2i (MindSpore + mindone): only the UNet was trained, on cached VAE latents and CLIP text states."),
        "",
        "Set `license` in the front matter above to the base model's licence before publishing.",
        "",
        "## Results",
        "",
        f"- optimizer steps: {steps}",
        f"- final training loss: {_loss(final_loss)}",
        f"- validation loss (held-out samples): {_loss(val_loss)}",
        "",
    ]
    if image:
        lines += ["Images generated from the validation prompts at the end of training:", ""]
        lines += [f"![validation images]({image})", ""]
    lines += [
        "## Usage",
        "",
        "The folder is in diffusers layout with PyTorch parameter names, so both libraries load it:",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline  # PyTorch; with MindSpore: from mindone.diffusers import ...",
        "",
    ]
    if lora:
        lines += [f'pipe = StableDiffusionPipeline.from_pretrained("{base_model}")',
                  'pipe.load_lora_weights("<this repo or folder>")  # pytorch_lora_weights.safetensors']
    else:
        lines += ['pipe = StableDiffusionPipeline.from_pretrained("<this repo or folder>")']
    lines += [
        'image = pipe("a prompt").images[0]',
        "```",
        "",
        "## Training configuration",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in config.items()]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    path = output_dir / "README.md"
    atomic_write_bytes(path, str(card).encode())
    return path
