"""Prompt weighting and long prompts as AUTOMATIC1111's web UI reads them: `(word:1.3)`, `(word)` = x1.1,
`[word]` = x1/1.1, nesting multiplies, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters, `BREAK` starts a new
chunk. A prompt of any length is encoded in chunks of model_max_length - 2 tokens (75 for SD's CLIP), each wrapped in
BOS/EOS and padded as the plain pipeline pads, and the chunks' states are concatenated along the sequence (77 x k).

How t2i-infer (and validation) call it, once per prompt as they call the pipeline, with the pipeline's own parts:

    from t2i.interop.prompts import encode_prompt_embeds
    embeds, negative = encode_prompt_embeds(pipe.tokenizer, pipe.text_encoder, [prompt], [negative_prompt or ""])
    pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_images_per_prompt=n, ...)

and pass neither `prompt=` nor `negative_prompt=` (mindone refuses both at once). Always pass the negative embeddings:
given only `prompt_embeds`, mindone encodes the empty negative prompt at prompt_embeds' length, which a text encoder of
77 positions cannot do for a long prompt. The two come back with the same number of chunks (the shorter padded with
encodings of the empty prompt, A1111's padding), so classifier-free guidance can concatenate them; the pipeline tiles
them for num_images_per_prompt. `--no_prompt_weighting` is the plain `pipe(prompt, negative_prompt=...)` call.

A prompt without weights that fits in one chunk gives exactly the pipeline's own `encode_prompt` states."""

import re
from dataclasses import dataclass

ROUND = 1.1  # (word) multiplies by this, [word] divides by it
BREAK = ("BREAK", -1.0)  # parse_weighted's fragment for the BREAK keyword (A1111's marker)

# A1111's modules/prompt_parser.py tokens, in its order of precedence.
_SYNTAX = re.compile(r"""
\\[()\[\]\\]          # an escaped bracket or backslash: that character
| \\                  # a lone backslash: dropped, as A1111 drops it
| [(\[]
| :([+-]?[.\d]+)\)    # an explicit weight closing the innermost round bracket
| [)\]]
| [^\\()\[\]:]+
| :
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_weighted(text: str) -> list:
    """[(fragment, weight)] of an A1111 prompt, BREAK as the BREAK fragment. As A1111's parse_prompt_attention:
    closing brackets without an opening one are text, brackets left open weigh everything after them (round ones
    first), neighbours of equal weight are merged, "" gives [("", 1.0)]. Unlike it, brackets around a BREAK do not
    turn it into a word of weight -1.1."""
    out = []  # [fragment, weight]; weight None marks a BREAK
    opened = {"(": [], "[": []}

    def scale(start, factor):
        for item in out[start:]:
            if item[1] is not None:
                item[1] *= factor

    for match in _SYNTAX.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            out.append([token[1:], 1.0])
        elif token in ("(", "["):
            opened[token].append(len(out))
        elif weight is not None and opened["("]:
            scale(opened["("].pop(), _weight(weight, text))
        elif token == ")" and opened["("]:
            scale(opened["("].pop(), ROUND)
        elif token == "]" and opened["["]:
            scale(opened["["].pop(), 1 / ROUND)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    out.append([BREAK[0], None])
                out.append([part, 1.0])
    for start in opened["("]:
        scale(start, ROUND)
    for start in opened["["]:
        scale(start, 1 / ROUND)
    merged = []
    for fragment, weight in out or [["", 1.0]]:
        if merged and weight is not None and merged[-1][1] == weight:
            merged[-1][0] += fragment
        else:
            merged.append([fragment, weight])
    return [BREAK if weight is None else (fragment, weight) for fragment, weight in merged]


def _weight(number: str, text: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise ValueError(f"prompt {text!r}: {number!r} is not a weight; write a number, as in (word:1.2)") from None


@dataclass(frozen=True)
class Chunk:
    """One text-encoder input: BOS, up to model_max_length - 2 prompt tokens, EOS, padding; a weight per id (1 for
    BOS, EOS and padding)."""

    ids: tuple
    weights: tuple


def token_chunks(tokenizer, text: str) -> list:
    """The prompt's tokens with their weights, split into Chunks as A1111 splits them (without its optional
    comma word wrap): a full chunk, or a BREAK, starts the next; a prompt ending on a BREAK adds no empty chunk."""
    fragments = parse_weighted(text)
    words = [fragment[0] for fragment in fragments if fragment != BREAK]
    # Each fragment tokenized on its own, without BOS/EOS, as in A1111: "(house)s" is "house" + "s".
    ids = iter(tokenizer(words, add_special_tokens=False, verbose=False).input_ids)
    size = tokenizer.model_max_length - 2
    rows, row = [], []
    for fragment in fragments:
        if fragment == BREAK:
            rows.append(row)
            row = []
            continue
        for token in next(ids):
            if len(row) == size:
                rows.append(row)
                row = []
            row.append((token, fragment[1]))
    if row or not rows:
        rows.append(row)
    return [_wrap(tokenizer, row, size) for row in rows]


def _wrap(tokenizer, row, size) -> Chunk:
    # The padding the pipeline's tokenizer call adds (EOS for SD 1.x, "!" for SD 2.x), as A1111's id_pad.
    pad = size - len(row)
    ids = (tokenizer.bos_token_id, *(t for t, _ in row), tokenizer.eos_token_id) + (tokenizer.pad_token_id,) * pad
    return Chunk(ids=ids, weights=(1.0, *(w for _, w in row), 1.0) + (1.0,) * pad)


def emphasize(states, weights):
    """A1111's "Original" emphasis on one chunk's states (L, D), numpy or MindSpore: each token's states times its
    weight, then the whole chunk rescaled so that its mean is what it was. A1111 takes that mean over the batch of
    prompts encoded together; here it is each prompt's own chunk, which is A1111's result for one prompt at a time."""
    weighted = states * weights[:, None]
    return weighted * (states.mean() / weighted.mean())


def _emphasized(states, chunk: Chunk):
    """`emphasize` on one chunk's MindSpore states, in the states' dtype; unweighted chunks unchanged (bit for bit)."""
    import mindspore as ms

    if all(w == 1.0 for w in chunk.weights):
        return states
    # In float32 whatever the encoder's dtype: the rule divides one mean by another, and fp16 or bf16 would round each
    # to 3 or 2 significant digits.
    return emphasize(states.float(), ms.tensor(chunk.weights, ms.float32)).to(states.dtype)


def _encode(text_encoder, chunk: Chunk, cache: dict):
    """The chunk's emphasized states (L, D) in the encoder's dtype; the encoder sees one chunk at a time, as the
    pipeline's one prompt, so an unweighted chunk gives the pipeline's states bit for bit."""
    import mindspore as ms
    import numpy as np

    if chunk not in cache:
        cache[chunk] = _emphasized(text_encoder(ms.tensor(np.array([chunk.ids], np.int64)))[0][0], chunk)
    return cache[chunk]


def encode_prompt_embeds(tokenizer, text_encoder, prompts, negative_prompts=None):
    """(prompt_embeds, negative_prompt_embeds), MindSpore tensors of shape (len(prompts), L x k, D) in the text
    encoder's dtype, for mindone's StableDiffusionPipeline(prompt_embeds=..., negative_prompt_embeds=...). k is the
    largest chunk count of all the prompts and negative prompts; shorter ones are padded with the empty prompt's
    chunk. negative_prompts None means "" for each prompt (the pipeline's default)."""
    from mindspore import ops

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if negative_prompts is None:
        negative_prompts = [""] * len(prompts)
    negative_prompts = [negative_prompts] if isinstance(negative_prompts, str) else list(negative_prompts)
    if not prompts or len(negative_prompts) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts and {len(negative_prompts)} negative prompts: give one negative "
                         "prompt per prompt (\"\" for none), and at least one prompt")
    chunked = [token_chunks(tokenizer, text) for text in prompts + negative_prompts]
    count = max(len(chunks) for chunks in chunked)
    empty = token_chunks(tokenizer, "")
    cache = {}
    padded = [chunks + empty * (count - len(chunks)) for chunks in chunked]
    embeds = ops.stack([ops.cat([_encode(text_encoder, chunk, cache) for chunk in chunks]) for chunks in padded])
    return embeds[: len(prompts)], embeds[len(prompts):]


def _encode_sdxl(encoders, chunks, cache: dict):
    """SDXL's states of one chunk position (L, D1 + D2), each encoder's penultimate layer (the pipeline's default
    clip_skip) emphasized on its own, and the second encoder's pooled projection of it (P,)."""
    import mindspore as ms
    import numpy as np

    key = tuple(chunks)
    if key not in cache:
        states, pooled = [], None
        for encoder, chunk in zip(encoders, chunks):
            out = encoder(ms.tensor(np.array([chunk.ids], np.int64)), output_hidden_states=True)
            states.append(_emphasized(out[-1][-2][0], chunk))
            if out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
                pooled = out[0][0]
        cache[key] = (ms.ops.cat(states, axis=-1), pooled)
    return cache[key]


def encode_prompt_embeds_sdxl(tokenizers, encoders, prompts, negative_prompts) -> tuple:
    """SDXL's (prompt_embeds, negative_prompt_embeds, pooled, negative_pooled) for StableDiffusionXLPipeline: both
    encoders read the A1111-weighted prompt chunk by chunk (as encode_prompt_embeds), their states side by side; the
    pooled embedding is the first chunk's, as compel and A1111 take it for long prompts."""
    from mindspore import ops

    texts = list(prompts) + list(negative_prompts)
    chunked = [[token_chunks(tokenizer, text) for tokenizer in tokenizers] for text in texts]
    count = max(len(chunks) for per_text in chunked for chunks in per_text)
    empty = [token_chunks(tokenizer, "") for tokenizer in tokenizers]
    cache, embeds, pooled = {}, [], []
    for per_text in chunked:
        padded = [chunks + pad * (count - len(chunks)) for chunks, pad in zip(per_text, empty)]
        encoded = [_encode_sdxl(encoders, position, cache) for position in zip(*padded)]
        embeds.append(ops.cat([states for states, _ in encoded]))
        pooled.append(encoded[0][1])
    embeds, pooled, n = ops.stack(embeds), ops.stack(pooled), len(prompts)
    return embeds[:n], embeds[n:], pooled[:n], pooled[n:]


def pipeline_prompt_args(pipe, prompt: str, negative_prompt: str | None, weighting: bool = True) -> dict:
    """The prompt arguments of one pipeline call: A1111-weighted, chunked embeddings, or (weighting False) the text
    as it is, for the pipeline to encode (77 tokens at most, brackets read as characters). For SDXL, both encoders'
    and the pooled embedding; without a negative prompt, the pipeline's own unconditional branch (zeros where
    force_zeros_for_empty_prompt says so)."""
    if not weighting:
        return {"prompt": prompt, "negative_prompt": negative_prompt}
    if getattr(pipe, "text_encoder_2", None) is None:
        embeds, negative = encode_prompt_embeds(pipe.tokenizer, pipe.text_encoder, [prompt], [negative_prompt or ""])
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
    embeds, negative, pooled, negative_pooled = encode_prompt_embeds_sdxl(
        [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], [prompt], [negative_prompt or ""])
    args = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if negative_prompt is not None or not pipe.config.force_zeros_for_empty_prompt:
        args.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
    return args
