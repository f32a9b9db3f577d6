import numpy as np
import pytest

from t2i.interop.prompts import BREAK, encode_prompt_embeds, parse_weighted, token_chunks

PHRASE = "a red circle on white "  # 5 tokens of the tiny vocabulary: 15 fill a 75-token chunk


@pytest.mark.parametrize("text, expected", [
    # The examples in the docstring of A1111's modules/prompt_parser.py parse_prompt_attention, with its outputs.
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    # Its algorithm on the rest of the syntax.
    ("a (house:1.5) [in] (((the))) forest",
     [("a ", 1.0), ("house", 1.5), (" ", 1.0), ("in", 1 / 1.1), (" ", 1.0), ("the", 1.1 ** 3), (" forest", 1.0)]),
    ("[[a]] ([b]:2)", [("a", 1 / 1.1 / 1.1), (" ", 1.0), ("b", 1 / 1.1 * 2)]),
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("a) b] c: d", [("a) b] c: d", 1.0)]),
    (r"\\ and \) a\b", [("\\ and ) ab", 1.0)]),
    ("", [("", 1.0)]),
    ("a cat BREAK a dog", [("a cat", 1.0), BREAK, ("a dog", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),  # A1111 would make BREAK a word of weight -1.1
])
def test_parse_weighted(text, expected):
    parsed = parse_weighted(text)
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected], rel=1e-15)


def test_a_weight_that_is_no_number_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"prompt '\(a:1\.2\.3\)': '1\.2\.3' is not a weight"):
        parse_weighted("(a:1.2.3)")


@pytest.fixture(scope="module")
def pipes(tiny_model):
    """Pipelines on the tiny model with its own 8-token tokenizer and with SD's 77 (its CLIP has 77 positions).

    The random CLIP's final LayerNorm has beta 0, so every token's states have mean 0 and the mean-restoring rule's
    ratio would be rounding noise over rounding noise; a trained CLIP's beta gives its states a mean away from 0."""
    import mindspore as ms
    from transformers import CLIPTokenizer

    from t2i.interop import models
    from t2i.interop.pipeline import assemble, load_parts, load_scheduler

    parts = load_parts(tiny_model)
    beta = parts["text_encoder"].text_model.final_layer_norm.beta
    beta.set_data(ms.tensor(np.random.default_rng(0).normal(0.3, 0.5, beta.shape), beta.dtype))
    unet = models.load_unet(tiny_model)
    long = CLIPTokenizer.from_pretrained(str(tiny_model), subfolder="tokenizer", model_max_length=77)
    return {length: assemble(unet, load_scheduler(tiny_model), **{**parts, "tokenizer": tokenizer})
            for length, tokenizer in ((8, parts["tokenizer"]), (77, long))}


def plain(pipe, prompt, negative=None):
    """The pipeline's own encoding of a prompt and its negative, as numpy."""
    embeds, negative = pipe.encode_prompt(prompt, 1, True, negative_prompt=negative)
    return embeds.asnumpy(), negative.asnumpy()


def test_token_weights_and_chunks(pipes):
    tok = pipes[77].tokenizer
    (chunk,) = token_chunks(tok, "a ((red)) [circle]")
    assert chunk.ids == tuple(tok("a red circle", padding="max_length", max_length=77).input_ids)
    assert chunk.weights[:5] == pytest.approx([1.0, 1.0, 1.21, 1 / 1.1, 1.0])
    assert chunk.weights[5:] == (1.0,) * 72
    broken = token_chunks(tok, "a red BREAK circle")
    assert [c.ids[:5] for c in broken] == [tuple(tok("a red").input_ids) + (tok.pad_token_id,),
                                           tuple(tok("circle").input_ids) + (tok.pad_token_id,) * 2]
    assert [len(c.ids) for c in token_chunks(tok, PHRASE * 40)] == [77, 77, 77]  # 200 tokens: 75 + 75 + 50
    assert [len(c.ids) for c in token_chunks(pipes[8].tokenizer, "a red circle on white")] == [8]  # 6 a chunk


def test_chunks_pad_as_the_tokenizer_pads(tiny_model):
    """SD 2.x's tokenizer pads with "!", not EOS (the tiny one, as SD 1.x's, pads with EOS)."""
    from transformers import CLIPTokenizer

    sd2 = CLIPTokenizer.from_pretrained(str(tiny_model), subfolder="tokenizer", model_max_length=77, pad_token="!")
    assert sd2.pad_token_id != sd2.eos_token_id
    (chunk,) = token_chunks(sd2, "a (red) circle")
    assert chunk.ids == tuple(sd2("a red circle", padding="max_length", max_length=77).input_ids)


@pytest.mark.parametrize("length", [8, 77])
@pytest.mark.parametrize("negative", [None, "a blue square"])
def test_no_weights_gives_the_pipelines_embedding(pipes, length, negative):
    pipe = pipes[length]
    embeds, neg = encode_prompt_embeds(pipe.tokenizer, pipe.text_encoder, ["a red circle"],
                                       None if negative is None else [negative])
    expected, expected_neg = plain(pipe, "a red circle", negative)
    assert embeds.shape == neg.shape == (1, length, 32) and embeds.dtype == pipe.text_encoder.dtype
    np.testing.assert_array_equal(embeds.asnumpy(), expected)
    np.testing.assert_array_equal(neg.asnumpy(), expected_neg)


def test_weight_scales_its_tokens_then_restores_the_mean(pipes):
    """A1111's rule: z * w per token, then z * mean(z) / mean(z * w) over the chunk."""
    pipe = pipes[77]
    z = plain(pipe, "a red circle")[0][0]  # tokens: BOS a red circle EOS pad...
    weighted = encode_prompt_embeds(pipe.tokenizer, pipe.text_encoder, ["a (red:1.5) [circle]"])[0].asnumpy()[0]
    w = np.ones(77, np.float32)
    w[2], w[3] = 1.5, 1 / 1.1
    scaled = z.astype(np.float64) * w[:, None]
    restored = scaled * (z.astype(np.float64).mean() / scaled.mean())
    np.testing.assert_allclose(weighted, restored, rtol=1e-5, atol=1e-6)
    ratio = weighted / z
    np.testing.assert_allclose(ratio[2] / ratio[1], 1.5, rtol=1e-5)  # red against an unweighted token
    assert not np.allclose(ratio[1], 1.0, rtol=1e-4)  # the mean restoration did rescale the chunk


def test_long_prompt_is_three_chunks_and_samples(pipes):
    """200 tokens: 3 chunks of 77, each the pipeline's encoding of its 75 (or 50) tokens; the 1-chunk negative padded
    to 3 with the empty prompt's chunk; a 2-step sample reads the third chunk."""
    pipe = pipes[77]
    embeds, neg = encode_prompt_embeds(pipe.tokenizer, pipe.text_encoder, [PHRASE * 40], ["a blue square"])
    assert embeds.shape == neg.shape == (1, 231, 32)
    e, n = embeds.asnumpy()[0], neg.asnumpy()[0]
    full, empty = plain(pipe, PHRASE * 15)
    np.testing.assert_array_equal(e[:77], full[0])
    np.testing.assert_array_equal(e[77:154], full[0])
    np.testing.assert_array_equal(e[154:], plain(pipe, PHRASE * 10)[0][0])
    np.testing.assert_array_equal(n, np.concatenate([plain(pipe, "a blue square")[0][0], empty[0], empty[0]]))

    other = encode_prompt_embeds(pipe.tokenizer, pipe.text_encoder, [PHRASE * 30 + "a blue square " * 10],
                                 ["a blue square"])

    def sample(prompt_embeds, negative_prompt_embeds):
        return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, height=32, width=32,
                    num_inference_steps=2, generator=np.random.default_rng(0), output_type="latent")[0].asnumpy()

    latents = sample(embeds, neg)
    assert latents.shape == (1, 4, 16, 16) and np.isfinite(latents).all()
    assert np.abs(sample(*other) - latents).max() > 1e-3
