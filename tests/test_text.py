"""The word-level tokenizer and the prompt encoder."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion_fast.models.text import TextConfig, TextEncoder, WordTokenizer
from diffusion_fast.pipeline import WEIGHTS_DIR

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(scope="module")
def tok() -> WordTokenizer:
    """The embedded digits model's tokenizer, as shipped."""
    cfg = json.loads((WEIGHTS_DIR / "digits" / "config.json").read_text())
    return WordTokenizer.from_dict(cfg["tokenizer"])


@pytest.mark.parametrize("prompt", ["a handwritten seven", "seven", "7", "the digit 7", "number 7",
                                    "A Handwritten SEVEN.", "  seven!  ", "a hand-written seven",
                                    "a picture of the handwritten digit 7"])
def test_documented_prompt_forms_tokenize(tok, prompt):
    ids = tok.encode(prompt)
    assert len(ids) == tok.max_length
    words = [tok.vocab[i] for i in ids]
    assert words[0] == "<bos>" and "<eos>" in words
    assert ("seven" in words) or ("7" in words)


def test_every_digit_has_a_word_and_a_numeral(tok):
    for d, w in enumerate(DIGIT_WORDS):
        assert w in tok.words and str(d) in tok.words


def test_normalisation_is_case_and_punctuation_blind(tok):
    assert tok.encode("A Handwritten SEVEN!") == tok.encode("a handwritten seven")
    assert tok.encode("hand-written 7") == tok.encode("hand written 7")


def test_empty_prompt_is_bos_eos_then_padding(tok):
    assert tok.encode("") == [1, 2] + [0] * (tok.max_length - 2)
    assert tok.encode("   ") == tok.encode("")


def test_unknown_word_lists_the_vocabulary(tok):
    with pytest.raises(ValueError) as exc:
        tok.encode("a handwritten banana")
    msg = str(exc.value)
    assert "'banana'" in msg and "vocabulary" in msg
    for w in tok.words:
        assert w in msg.split("vocabulary is: ")[1].split()


def test_several_unknown_words_are_all_named(tok):
    with pytest.raises(ValueError, match=r"unknown words 'purple', 'banana'"):
        tok.encode("purple banana 7")


def test_too_long_prompt_is_an_error(tok):
    with pytest.raises(ValueError, match=f"at most {tok.max_length - 2} fit"):
        tok.encode(" ".join(["seven"] * (tok.max_length - 1)))


def test_batch_call_and_types(tok):
    ids = tok(["seven", "7", ""])
    assert ids.shape == (3, tok.max_length) and ids.dtype == torch.long
    assert torch.equal(tok("seven"), ids[:1])
    with pytest.raises(TypeError, match="prompt must be a str"):
        tok.encode(7)


@pytest.mark.parametrize("vocab, max_length, match", [
    (["a", "a"], 8, "duplicate"),
    (["Seven"], 8, "lower-case"),
    (["two words"], 8, "lower-case word"),
    (["a"], 1, "max_length must be an int >= 2"),
])
def test_tokenizer_construction_errors(vocab, max_length, match):
    with pytest.raises(ValueError, match=match):
        WordTokenizer(vocab, max_length)


def test_text_encoder_shapes_backends_and_errors():
    torch.manual_seed(0)
    enc = TextEncoder(TextConfig(vocab_size=20, max_length=6, width=32, layers=2, heads=2)).eval()
    ids = torch.randint(0, 20, (3, 6))
    with torch.no_grad():
        a = enc(ids)
        b = enc.set_backend(attention="sdpa")(ids)
    assert a.shape == (3, 6, 32)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Every position sees the others: changing one token changes the context at all positions.
    ids2 = ids.clone()
    ids2[:, 3] = (ids2[:, 3] + 1) % 20
    with torch.no_grad():
        c = enc(ids2)
    assert ((c - a).abs().amax(dim=-1) > 1e-6).all()
    with pytest.raises(ValueError, match=r"ids must be \[B, 6\]"):
        enc(torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="head dim"):
        TextConfig(vocab_size=20, width=36, heads=3)
    with pytest.raises(ValueError, match="unknown TextConfig keys"):
        TextConfig.from_dict({"vocab_size": 3, "depth": 2})
