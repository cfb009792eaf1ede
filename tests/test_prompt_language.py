"""AUTOMATIC1111's prompt language on the tiny SDXL model, through real pipelines: emphasis, escapes, long
prompts and BREAK, clip skip, textual-inversion embeddings, and the weight limits ingress enforces."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engines.eager import EagerEngine
from engines.models import tiny_info
from engines.prompt_encoder import CHUNK_TOKENS, PromptEncoder
from engines.tiny_extras import build_tiny_embedding
from forge.embeddings import EmbeddingCatalog
from forge.engine import Job
from forge.errors import InvalidRequest
from forge.prompt_syntax import check_weights, parse_prompt_attention
from tests.conftest import server_config

PLAIN = "red hair, knight"
# 200 tokens on the tiny model's byte-level tokenizer (a token a character; a comma is a word of its own).
LONG_HEAD = "a knight in silver armour, " * 8 + "with a long sword and a "
LONG, LONG_OTHER_END = LONG_HEAD + "shield", LONG_HEAD + "helmet"


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> EagerEngine:
    return EagerEngine(tiny_info(tiny_model), "cpu")


def job(engine: EagerEngine, prompt: str, negative: str = "", **fields: Any) -> Job:
    base: dict[str, Any] = dict(model=engine.model, prompt=prompt, negative_prompt=negative, width=64, height=64,
                                seeds=[3], steps=2, guidance_scale=5.0, scheduler="euler")  # fmt: skip
    return Job(**(base | fields))


def pixels(engine: EagerEngine, prompt: str, negative: str = "", **fields: Any) -> np.ndarray:
    return np.asarray(engine.run(job(engine, prompt, negative, **fields)).images[0], dtype=np.int16)


def differs(a: np.ndarray, b: np.ndarray) -> bool:
    return int(np.abs(a - b).max()) > 0


def as_pairs(text: str) -> list[tuple[str, float | None]]:
    return [(fragment.text, fragment.weight) for fragment in parse_prompt_attention(text)]


# -- the parser --


def test_the_parser_reads_prompts_as_a1111_does() -> None:
    """A1111's own doctests (modules/prompt_parser.py), and its leniency."""
    assert as_pairs("normal text") == [("normal text", 1.0)]
    assert as_pairs("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert as_pairs("(unbalanced") == [("unbalanced", 1.1)]
    assert as_pairs(r"\(literal\]") == [("(literal]", 1.0)]
    assert as_pairs("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    rounded = [(text, round(weight or 0, 4)) for text, weight in as_pairs("a (((house:1.3)) [on] a (hill:0.5), sun")]
    assert rounded == [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
                       (", sun", 1.1)]  # fmt: skip
    assert as_pairs("stray ) and ] close nothing") == [("stray ) and ] close nothing", 1.0)]
    assert as_pairs("[[x]]")[0][1] == pytest.approx(1 / 1.21)
    assert as_pairs("(red hair:1.0), knight") == [(PLAIN, 1.0)]  # weight 1 merges back into plain text
    assert as_pairs("red hair BREAK knight") == [("red hair", 1.0), ("BREAK", None), ("knight", 1.0)]
    assert as_pairs("BREAKFAST") == [("BREAKFAST", 1.0)]


def test_weights_outside_0_to_4_are_refused_naming_the_field() -> None:
    check_weights("(a:4) [b] (c:0) ((d))", "prompt")  # the bounds themselves are fine
    nested = "(" * 15 + "x" + ")" * 15  # 1.1 ** 15: 4.18
    for text, field in (("(a:4.5)", "prompt"), ("(blurry:-1)", "negative_prompt"), (nested, "prompt"),
                        ("(x:1.2.3)", "prompt")):  # fmt: skip
        with pytest.raises(InvalidRequest) as raised:
            check_weights(text, field)
        assert (raised.value.field, raised.value.rule) == (field, "range")
        assert field in raised.value.message


def test_ingress_refuses_a_bad_weight_and_takes_clip_skip(tmp_path: Path, tiny_model: Path) -> None:
    from actors.supervisor import load_resources
    from forge.requests import GenerationRequest
    from forge.resolve import resolve_request
    from forge.validation import convert

    resources = load_resources(server_config(tmp_path / "data", tiny_model))
    model = tiny_info(tiny_model)

    def resolve(**fields: object) -> Any:
        return resolve_request(convert({"prompt": "a knight", **fields}, GenerationRequest), model, resources)

    for fields, field in (({"prompt": "a (knight:5)"}, "prompt"), ({"negative_prompt": "[(x:-2)]"}, "negative_prompt"),
                          ({"views": [{"label": "a", "prompt": "(big:9)"}]}, "views[0].prompt")):  # fmt: skip
        with pytest.raises(InvalidRequest) as raised:
            resolve(**fields)
        assert (raised.value.field, raised.value.rule) == (field, "range")
    assert resolve().clip_skip == 2  # SDXL's own: the model's default
    assert resolve(clip_skip=1).clip_skip == 1
    with pytest.raises(InvalidRequest) as raised:
        convert({"prompt": "a knight", "clip_skip": 13}, GenerationRequest)
    assert raised.value.field == "clip_skip"


# -- encoding --


def test_a_plain_prompt_encodes_exactly_as_diffusers_does(engine: EagerEngine) -> None:
    pipe, encoder = engine.pipe, PromptEncoder(engine.pipe)
    for prompt, negative in ((PLAIN, ""), (PLAIN, "blurry, lowres"), ("x" * CHUNK_TOKENS, "y")):
        expected = pipe.encode_prompt(prompt=prompt, device="cpu", num_images_per_prompt=2,
                                      do_classifier_free_guidance=True, negative_prompt=negative or None)  # fmt: skip
        ours: tuple[Any, ...] = encoder.encode(job(engine, prompt, negative), guided=True).for_images(2)
        assert all(torch.equal(a, b) for a, b in zip(expected, ours, strict=True)), (prompt, negative)


def test_long_prompts_and_break_make_chunks_and_the_negative_follows(engine: EagerEngine) -> None:
    encoder = PromptEncoder(engine.pipe)
    long = encoder.encode(job(engine, LONG, "blurry"), guided=True)
    assert long.tokens == 3 * 77 and long.negative is not None and long.negative.shape == long.positive.shape
    empty_negative = encoder.encode(job(engine, LONG), guided=True)  # zeros, as SDXL's pipeline guides ""
    assert empty_negative.negative is not None and not empty_negative.negative.any()
    assert encoder.encode(job(engine, "red hair BREAK knight"), guided=True).tokens == 2 * 77
    assert encoder.encode(job(engine, "a", "b BREAK c BREAK d"), guided=True).tokens == 3 * 77  # the negative's
    # The pooled embedding is the first chunk's: what comes after the first 75 tokens leaves it alone.
    other_end = encoder.encode(job(engine, LONG_OTHER_END, "blurry"), guided=True)
    assert torch.equal(other_end.pooled, long.pooled) and not torch.equal(other_end.positive, long.positive)


def test_a_full_chunk_breaks_at_its_last_comma(engine: EagerEngine) -> None:
    """A1111's comma backtrack: the words after the last comma within the chunk's last 20 tokens move on."""
    encoder = PromptEncoder(engine.pipe)
    side = encoder._sides()[0]
    prompt = "a" * 60 + ", " + "b" * 30  # one token a byte: the comma is token 61, the chunk fills at 75
    first, second = encoder._chunks(prompt, side)
    text = [side.tokenizer.convert_ids_to_tokens(ids) for ids, _ in (first, second)]
    assert text[0][61] == ",</w>" and text[0][62] == "<|endoftext|>"  # the first chunk ends at the comma
    assert "".join(text[1][1:31]).replace("</w>", "") == "b" * 30  # the b's start the second
    far = encoder._chunks("a" * 40 + ", " + "b" * 60, side)[0]  # a comma 35 tokens back is too far: no backtrack
    assert far[0][CHUNK_TOKENS] != side.eos


def test_the_cache_encodes_a_repeated_prompt_once(engine: EagerEngine) -> None:
    encoder = PromptEncoder(engine.pipe)
    first = encoder.encode(job(engine, "(a knight:1.2)", "blurry"), guided=True)
    again = encoder.encode(job(engine, "(a knight:1.2)", "blurry", seeds=[1, 2]), guided=True)
    assert encoder.encodes == 1 and again is first
    encoder.encode(job(engine, "(a knight:1.2)", "blurry", clip_skip=1), guided=True)
    assert encoder.encodes == 2  # clip skip is part of the key


# -- images --


def test_weight_one_is_exactly_no_weight_and_other_weights_change_the_image(engine: EagerEngine) -> None:
    plain = pixels(engine, PLAIN)
    assert np.array_equal(pixels(engine, "(red hair:1.0), knight"), plain)
    variants = {
        prompt: pixels(engine, prompt)
        for prompt in ("(red hair:1.5), knight", "(red hair), knight", "((red hair)), knight", "[red hair], knight")
    }
    for prompt, image in variants.items():
        assert differs(image, plain), prompt
    assert differs(variants["((red hair)), knight"], variants["(red hair), knight"])  # nesting multiplies


def test_escaped_brackets_are_text(engine: EagerEngine) -> None:
    assert as_pairs(r"\(red hair\), knight") == [("(red hair), knight", 1.0)]
    escaped = pixels(engine, r"\(red hair\), knight")
    assert differs(escaped, pixels(engine, "(red hair), knight"))  # not emphasis
    assert differs(escaped, pixels(engine, PLAIN))  # the brackets are tokens of the prompt


def test_past_75_tokens_every_word_counts_and_break_starts_a_chunk(engine: EagerEngine) -> None:
    tokens = engine.pipe.tokenizer(LONG, add_special_tokens=False, verbose=False).input_ids
    assert len(tokens) == 200
    assert differs(pixels(engine, LONG), pixels(engine, LONG_OTHER_END))  # only the last word, 200 tokens in
    assert differs(pixels(engine, "red hair BREAK knight"), pixels(engine, "red hair knight"))


def test_clip_skip_picks_the_layer_from_the_end(engine: EagerEngine) -> None:
    default = pixels(engine, PLAIN)
    assert np.array_equal(pixels(engine, PLAIN, clip_skip=2), default)  # SDXL's own: the penultimate layer
    assert differs(pixels(engine, PLAIN, clip_skip=1), default)  # the last layer
    # The tiny encoders have 2 layers: deeper than that is their first layer's output, the penultimate here.
    assert np.array_equal(pixels(engine, PLAIN, clip_skip=12), default)


# -- textual inversion --


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("embeddings")
    build_tiny_embedding(folder / "inkneg.safetensors", seed=1, vectors=2)
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    return folder


def test_an_embedding_in_the_negative_prompt_changes_the_image_and_an_unknown_name_is_text(
    tiny_model: Path, engine: EagerEngine, embeddings: Path
) -> None:
    with_embeddings = EagerEngine(dataclasses.replace(tiny_info(tiny_model), embeddings_dir=str(embeddings)), "cpu")
    negative = "blurry, inkneg"
    used = pixels(with_embeddings, PLAIN, negative)
    assert with_embeddings.prompts.embeddings.loaded == {"inkneg": 2}
    assert "broken" in with_embeddings.prompts.embeddings.skipped
    assert differs(used, pixels(engine, PLAIN, negative))  # without the embedding, "inkneg" is plain text
    assert np.array_equal(pixels(with_embeddings, PLAIN, "blurry"), pixels(engine, PLAIN, "blurry"))
    # An unknown name is text, on either engine; the embedding's weight applies to its vectors too.
    assert np.array_equal(
        pixels(with_embeddings, PLAIN, "blurry, nosuchemb"), pixels(engine, PLAIN, "blurry, nosuchemb")
    )
    assert differs(pixels(with_embeddings, PLAIN, "blurry, (inkneg:1.4)"), used)
    # A file dropped in later is loaded at the next prompt.
    build_tiny_embedding(embeddings / "latecomer.safetensors", seed=2, vectors=1)
    assert differs(pixels(with_embeddings, PLAIN, "latecomer"), pixels(engine, PLAIN, "latecomer"))
    listing = EmbeddingCatalog(embeddings).a1111_listing()
    assert listing["loaded"]["inkneg"] == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                           "shape": 64, "vectors": 2}  # fmt: skip
    assert set(listing["skipped"]) == {"broken"}
