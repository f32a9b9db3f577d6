"""A tiny Stable Diffusion pipeline, made in code (no network).

`t2i-tiny-model` writes a full diffusers-layout folder, under PyTorch parameter names, that mindone's and PyTorch
diffusers' `StableDiffusionPipeline.from_pretrained` load: random UNet and text encoder, and a VAE trained for about a
minute to draw the demo's images (t2i.demo.tiny_vae); with `--family sdxl`, an SDXL folder that their
`StableDiffusionXLPipeline.from_pretrained` load (two text encoders, a text_time UNet, SDXL base's Euler scheduler).
The demo's images and captions are t2i/demo/shapes.py's.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

from t2i.core.atomic import atomic_dir
from t2i.core.flags import DEVICE_TARGET_HELP, check, command, flag
from t2i.demo.shapes import COLOURS, SHAPES, render
from t2i.demo.tiny_vae import VaeRecipe, train_vae, vae_quality

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


@dataclass(frozen=True)
class TinyGeometry:
    """Model sizes; the defaults are the test/demo model, `small()` a larger one for benchmarks."""

    unet_channels: tuple = (32, 64)
    layers_per_block: int = 1
    vae_channels: tuple = (32, 64)
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 4
    norm_groups: int = 8
    sample_size: int = 64  # image resolution the model is built for
    max_length: int = 8  # tokens per caption; demo captions are 3 words, and fewer pad tokens carry more signal

    @classmethod
    def small(cls):
        return cls(unet_channels=(32, 64), layers_per_block=2, vae_channels=(32, 64), text_hidden=64)


def bytes_to_unicode():
    """GPT-2/CLIP byte-to-printable-unicode table (the CLIP tokenizer's base alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def demo_words():
    return sorted(set(COLOURS) | set(SHAPES) | {"a", "on", "white", "background", "yoda", "small", "large"})


def build_bpe(words):
    """A CLIP BPE vocabulary: every byte symbol (plain and word-final), one merge chain per word, special tokens."""
    alphabet = bytes_to_unicode()
    # Ordered dicts, not lists: SD-1.5's 48,894 merges would make list lookups quadratic.
    vocab = dict.fromkeys(alphabet + [c + "</w>" for c in alphabet])
    merges = {}
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if pair not in merges:
                merges[pair] = None
                vocab.setdefault(merged)
            symbols = [merged] + symbols[2:]
    return {tok: i for i, tok in enumerate([*vocab, *SPECIAL_TOKENS])}, list(merges)


def write_tokenizer(path: Path, words, max_length=77, pad_token=None):
    """pad_token: None pads with <|endoftext|> as SD's tokenizer does; SDXL's tokenizer_2 pads with "!"."""
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_bpe(words)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    padding = {} if pad_token is None else {"pad_token": pad_token}
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=max_length,
                              **padding)
    tokenizer.save_pretrained(str(path))
    return tokenizer


def _tame_vae(vae, images, whiten=False):
    """Make a VAE usable for learning: near-deterministic posterior and unit-variance latents.

    A random quant_conv gives logvar ~ 0, so sampled latents would be mostly noise; zeroing the logvar half and biasing
    it to -12 (std 0.0025) keeps the mean. The mean half's bias is shifted so each channel is centred (a random VAE's
    per-channel offsets were ~1, twice the content's spread), then the scaling factor gives unit variance.

    whiten (for a trained VAE): the latents are also decorrelated to unit variance in every direction, and
    post_quant_conv takes the whole transform back, so the decoder draws exactly what it drew. The VAE trained by
    t2i.demo.tiny_vae puts 97% of the latent variance in one direction (eigenvalues of the channel covariance 3.9, 0.065,
    0.008, 0.0009) and the colours in the small ones, which the diffusion loss barely weighs: the UNet learned no colour
    in the demo's 300 steps until they were whitened.
    """
    import mindspore as ms

    latent = vae.config.latent_channels
    w = vae.quant_conv.weight.asnumpy().copy()
    b = vae.quant_conv.bias.asnumpy().copy()
    w[latent:] = 0.0
    b[latent:] = -12.0
    mean = vae.encode(ms.Tensor(images))[0].asnumpy()[:, :latent]
    centre = mean.mean(axis=(0, 2, 3))
    b[:latent] -= centre
    if whiten:
        values, vectors = np.linalg.eigh(np.cov(mean.transpose(1, 0, 2, 3).reshape(latent, -1)))
        to_white = vectors @ np.diag(values**-0.5) @ vectors.T
        from_white = vectors @ np.diag(values**0.5) @ vectors.T
        w[:latent] = np.einsum("ij,jkxy->ikxy", to_white, w[:latent])
        b[:latent] = to_white @ b[:latent]
        post_w = vae.post_quant_conv.weight.asnumpy()
        post_b = vae.post_quant_conv.bias.asnumpy() + post_w[:, :, 0, 0] @ centre
        vae.post_quant_conv.weight.set_data(ms.Tensor(np.einsum("ijxy,jk->ikxy", post_w, from_white)))
        vae.post_quant_conv.bias.set_data(ms.Tensor(post_b.astype(np.float32)))
    vae.quant_conv.weight.set_data(ms.Tensor(w.astype(np.float32)))
    vae.quant_conv.bias.set_data(ms.Tensor(b.astype(np.float32)))
    mean = vae.encode(ms.Tensor(images))[0].asnumpy()[:, :latent]
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))


def _tame_text_encoder(text_encoder):
    """Make a random CLIP tell captions apart: token embeddings at unit scale instead of init's 0.01.

    At init, token and position embeddings are equally small, and two captions that differ in one word gave hidden
    states 99.6% alike (between-caption variance / total, measured on the demo captions); a model cannot learn much
    text conditioning from that.
    """
    import mindspore as ms

    table = text_encoder.text_model.embeddings.token_embedding.embedding_table
    w = table.asnumpy()
    table.set_data(ms.Tensor(w / w.std()))


def _seed(seed):
    import mindspore as ms

    ms.set_seed(seed)
    np.random.seed(seed)


def _tiny_text_encoder(model_cls, tokenizer, g: TinyGeometry, hidden: int, projection_dim: int, **config):
    """A tamed random CLIP text model of class `model_cls` (mindone's CLIPTextModel or CLIPTextModelWithProjection)
    over the tokenizer's vocabulary."""
    from transformers import CLIPTextConfig

    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=g.text_layers,
        num_attention_heads=g.text_heads,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim,
        **config,
    )
    text_encoder = model_cls(text_config)
    _tame_text_encoder(text_encoder)
    return text_encoder


def _tiny_vae(g: TinyGeometry, seed: int, vae_recipe):
    """(the tamed VAE, its training report or None): trained first with a recipe of more than 0 steps."""
    from mindone.diffusers import AutoencoderKL

    n_blocks = len(g.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        block_out_channels=g.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=g.norm_groups,
        sample_size=g.sample_size,
    )
    trained = vae_recipe is not None and vae_recipe.steps > 0
    vae_report = train_vae(vae, vae_recipe) if trained else None
    rng = np.random.default_rng(seed)
    probe = np.stack([np.asarray(render(c, s, rng, g.sample_size), np.float32)
                      for _ in range(4) for c in COLOURS for s in SHAPES])
    _tame_vae(vae, probe.transpose(0, 3, 1, 2) / 127.5 - 1.0, whiten=trained)
    if trained:
        vae_report.update(vae_quality(vae, vae_recipe))
    return vae, vae_report


def _tiny_unet(g: TinyGeometry, cross_attention_dim: int, **config):
    """A random UNet2DConditionModel for latents of the VAE's size: cross attention in all but the lowest block."""
    from mindone.diffusers import UNet2DConditionModel

    n_unet = len(g.unet_channels)
    return UNet2DConditionModel(
        sample_size=g.sample_size // 2 ** (len(g.vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=g.unet_channels,
        layers_per_block=g.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (n_unet - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_unet - 1),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=g.norm_groups,
        **config,
    )


def _write_record(folder: Path, g: TinyGeometry, seed: int, vae_report, **extra):
    (folder / "t2i_tiny.json").write_text(
        json.dumps({"geometry": asdict(g), "seed": seed, "vae_training": vae_report, **extra}, indent=2))


def build_tiny_model(output_dir, geometry: TinyGeometry = TinyGeometry(), seed: int = 0, vae_recipe=None):
    """Write a random-initialised SD pipeline in diffusers layout to `output_dir` (atomically); with a
    `t2i.demo.tiny_vae.VaeRecipe`, its VAE is first trained to draw (about a minute: the tests' models skip it)."""
    from mindone.diffusers import PNDMScheduler, StableDiffusionPipeline
    from mindone.transformers import CLIPTextModel

    from t2i.interop.models import save_pretrained_pytorch

    _seed(seed)
    g = geometry
    with atomic_dir(output_dir) as tmp:
        tokenizer = write_tokenizer(Path(tmp) / "tokenizer", demo_words(), max_length=g.max_length)
        text_encoder = _tiny_text_encoder(CLIPTextModel, tokenizer, g, g.text_hidden, projection_dim=g.text_hidden)
        vae, vae_report = _tiny_vae(g, seed, vae_recipe)
        unet = _tiny_unet(g, cross_attention_dim=g.text_hidden)
        scheduler = PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            set_alpha_to_one=False,
            skip_prk_steps=True,
            steps_offset=1,
        )
        # Training loads this config as a DDPMScheduler, whose default clip_sample=True would clamp x0 to [-1, 1]:
        # SD 1.5's config carries clip_sample=false for that reason, and so does this one.
        scheduler.register_to_config(clip_sample=False)
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp)
        # mindone saves the text encoder under MindSpore names (`embedding_table`, `gamma`/`beta`) that PyTorch
        # transformers cannot load; the UNet and VAE names are already PyTorch's.
        save_pretrained_pytorch(text_encoder, Path(tmp) / "text_encoder")
        _write_record(Path(tmp), g, seed, vae_report)
    return Path(output_dir)


def sdxl_sizes(geometry: TinyGeometry) -> dict:
    """The SDXL model's sizes beyond the geometry's. text_encoder_2 is 1.5x as wide as text_encoder (48 and 32 for the
    tiny geometry), so the two are told apart by shape, as SDXL's CLIP-L (768) and OpenCLIP bigG (1280) are; the
    UNet's text_time embedding takes the 6 micro-conditioning numbers (original size, crop corner, target size), each
    embedded in addition_time_embed_dim sinusoids, and text_encoder_2's pooled projection."""
    text_2_hidden = geometry.text_hidden * 3 // 2
    projection_dim = geometry.text_hidden
    addition_time_embed_dim = 8
    return {
        "text_encoder_2_hidden": text_2_hidden,
        "projection_dim": projection_dim,
        "addition_time_embed_dim": addition_time_embed_dim,
        "cross_attention_dim": geometry.text_hidden + text_2_hidden,
        "projection_class_embeddings_input_dim": 6 * addition_time_embed_dim + projection_dim,
    }


def build_tiny_sdxl_model(output_dir, geometry: TinyGeometry = TinyGeometry(), seed: int = 0, vae_recipe=None):
    """Write a random-initialised SDXL pipeline in diffusers layout to `output_dir` (atomically), every weight under
    PyTorch names: the VAE as build_tiny_model makes it (trained first with a `VaeRecipe`), text_encoder a CLIPTextModel
    and text_encoder_2 a wider CLIPTextModelWithProjection (sizes in `sdxl_sizes`) on the same tiny vocabulary,
    tokenizer_2 padding with "!" as SDXL's does, a UNet with SDXL's text_time conditioning that cross-attends to both
    encoders' hidden states concatenated, and SDXL base's EulerDiscreteScheduler config."""
    from mindone.diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from mindone.transformers import CLIPTextModel, CLIPTextModelWithProjection

    from t2i.interop.models import save_pretrained_pytorch

    _seed(seed)
    g = geometry
    sizes = sdxl_sizes(g)
    with atomic_dir(output_dir) as tmp:
        tokenizer = write_tokenizer(Path(tmp) / "tokenizer", demo_words(), max_length=g.max_length)
        tokenizer_2 = write_tokenizer(Path(tmp) / "tokenizer_2", demo_words(), max_length=g.max_length, pad_token="!")
        text_encoder = _tiny_text_encoder(CLIPTextModel, tokenizer, g, g.text_hidden, projection_dim=g.text_hidden)
        # OpenCLIP bigG, SDXL's second encoder, uses the exact GELU where CLIP-L uses quick_gelu.
        text_encoder_2 = _tiny_text_encoder(CLIPTextModelWithProjection, tokenizer_2, g, sizes["text_encoder_2_hidden"],
                                            projection_dim=sizes["projection_dim"], hidden_act="gelu")
        vae, vae_report = _tiny_vae(g, seed, vae_recipe)
        unet = _tiny_unet(
            g,
            cross_attention_dim=sizes["cross_attention_dim"],
            addition_embed_type="text_time",
            addition_time_embed_dim=sizes["addition_time_embed_dim"],
            projection_class_embeddings_input_dim=sizes["projection_class_embeddings_input_dim"],
            use_linear_projection=True,  # as SDXL's UNet: proj_in/proj_out are Linear, not 1x1 convolutions
        )
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            prediction_type="epsilon",
            interpolation_type="linear",
            use_karras_sigmas=False,
            timestep_spacing="leading",
            steps_offset=1,
        )
        # SDXL base's scheduler config carries these DDPM/PNDM keys too; clip_sample=false matters, as in
        # build_tiny_model: training loads the config as a DDPMScheduler.
        scheduler.register_to_config(clip_sample=False, sample_max_value=1.0, set_alpha_to_one=False,
                                     skip_prk_steps=True)
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
        pipe.save_pretrained(tmp)
        for name, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
            save_pretrained_pytorch(model, Path(tmp) / name)
        _write_record(Path(tmp), g, seed, vae_report, family="sdxl", sdxl=sizes)
    return Path(output_dir)


@dataclass(frozen=True)
class TinyModelConfig:
    output_dir: str = flag(help="Folder to write the model to.")
    family: str = flag("sd", "Pipeline family: sd (SD 1.x layout) or sdxl (two text encoders, text_time UNet).",
                       choices=("sd", "sdxl"))
    size: str = flag("tiny", "Model geometry.", choices=("tiny", "small"))
    resolution: int = flag(64, "Image size the model is built for.", multiple_of=8)
    seed: int = flag(0)
    vae_train_steps: int = flag(VaeRecipe.steps, "Steps training the VAE to draw demo-like images (about a minute on "
                                                 "2 CPU cores); 0 leaves it random.", min=0)
    device_target: str | None = flag(None, DEVICE_TARGET_HELP)

    def __post_init__(self):
        check(self)


def write_tiny_model(config: TinyModelConfig):
    from t2i.core import runtime

    runtime.setup(config.device_target)
    base = TinyGeometry() if config.size == "tiny" else TinyGeometry.small()
    geometry = TinyGeometry(**{**asdict(base), "sample_size": config.resolution})
    recipe = VaeRecipe(steps=config.vae_train_steps, seed=config.seed)
    build = build_tiny_sdxl_model if config.family == "sdxl" else build_tiny_model
    click.echo(f"wrote {build(config.output_dir, geometry, config.seed, recipe)}")


tiny_model_cli = command(TinyModelConfig, write_tiny_model, "Write a tiny Stable Diffusion pipeline in diffusers "
                         "layout (SD 1.x, or SDXL with --family sdxl): random UNet and text encoder(s), and a VAE "
                         "trained to draw the demo's coloured shapes (recipe and reconstruction error in "
                         "t2i_tiny.json).")
