"""README.md model card for a fine-tuned pipeline, in the shape the diffusers training scripts give theirs."""

from pathlib import Path

from t2i.core.atomic import atomic_write_bytes

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


def _front_matter(base_model, dataset=None, tags=()) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        # The fine-tune inherits the base model's licence (SD 1.x: creativeml-openrail-m); "other" until it is set.
        license="other",
        base_model=base_model if _hub_id(base_model) else None,
        datasets=[dataset] if _hub_id(dataset) else None,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=TAGS + list(tags),
        inference=True,
    )
    return f"---\n{data.to_yaml()}\n---\n\n"


def _adapter(lora: dict) -> str:
    return (f"rank {lora['rank']}, alpha {lora['alpha']:g}, on the UNet's {', '.join(lora['target_modules'])} "
            "layers")


def _usage(load: list, pipeline_class: str) -> list:
    return ["## Usage", "",
            "The folder is in diffusers layout with PyTorch parameter names, so both libraries load it:", "",
            "```python",
            f"from diffusers import {pipeline_class}  # PyTorch; with MindSpore: from mindone.diffusers import ...",
            "", *load, 'image = pipe("a prompt").images[0]', "```", ""]


def _config_table(heading, config: dict) -> list:
    return [f"## {heading}", "", "| setting | value |", "| --- | --- |",
            *(f"| {_cell(k)} | {_cell(v)} |" for k, v in config.items())]


def _write(output_dir: Path, front: str, lines: list) -> Path:
    from huggingface_hub import ModelCard

    path = output_dir / "README.md"
    atomic_write_bytes(path, str(ModelCard(front + "\n".join(lines) + "\n")).encode())
    return path


def write_model_card(output_dir, *, base_model, dataset, config: dict, steps, final_loss, val_loss,
                     validation_image=None, lora: dict | None = None,
                     pipeline_class: str = "StableDiffusionPipeline") -> Path:
    """Write output_dir/README.md: YAML front matter (licence placeholder, base model, tags) and the training record;
    `lora` (lora.describe's): the folder holds a LoRA adapter for base_model, not a pipeline; `pipeline_class`: the
    diffusers pipeline that loads it (StableDiffusionXLPipeline for SDXL)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    image = _image(output_dir, validation_image)
    lines = [
        f"# {output_dir.resolve().name}",
        "",
        (f"A LoRA adapter ({_adapter(lora)}) for the base model **{base_model}**, trained on "
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
    if lora:
        lines += _usage([f'pipe = {pipeline_class}.from_pretrained("{base_model}")',
                         'pipe.load_lora_weights("<this repo or folder>")  # pytorch_lora_weights.safetensors'],
                        pipeline_class)
    else:
        lines += _usage([f'pipe = {pipeline_class}.from_pretrained("<this repo or folder>")'], pipeline_class)
    lines += _config_table("Training configuration", config)
    return _write(output_dir, _front_matter(base_model, dataset, ["lora"] if lora else []), lines)


def write_merged_card(output_dir, *, base_model, adapter, lora: dict, config: dict | None) -> Path:
    """Write output_dir/README.md for a LoRA fused into its base (t2i-export --merge_lora): a whole pipeline, what
    it was made of, and the adapter's training configuration when its t2i_train_config.json was found."""
    output_dir = Path(output_dir)
    lines = [
        f"# {output_dir.resolve().name}",
        "",
        f"The Stable Diffusion pipeline **{base_model}** with the LoRA adapter `{adapter}` ({_adapter(lora)}) fused "
        "into its UNet at scale 1 by `t2i-export --merge_lora` (t2i, MindSpore + mindone). Every other component is "
        "the base model's. It is a whole pipeline: no LoRA loading is needed.",
        "",
        "Set `license` in the front matter above to the base model's licence before publishing.",
        "",
        *_usage(['pipe = StableDiffusionPipeline.from_pretrained("<this repo or folder>")'], "StableDiffusionPipeline"),
    ]
    if config:
        lines += _config_table("Training configuration of the adapter", config)
    return _write(output_dir, _front_matter(base_model), lines)
