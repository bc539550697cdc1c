"""Stop strings against text that decodes a character only once all its bytes came: a token that ends
inside a multi-byte UTF-8 character decodes it as U+FFFD until a later token completes it. A stop
string matches where its text appears in the completion's decoded text, never on such a U+FFFD.

Two tiny tokenizers with one token per byte: byte-level (GPT-2 style, as Llama 3 / Qwen) and
SentencePiece byte fallback (as Llama 2 / Mistral), which write U+FFFD differently."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from minigrpo.sampling.rollout import settled_text, stop_string_cut, stop_string_seen
from minigrpo.tokenizer import Tokenizer

TEXT = "aé\ufffdb😀c"  # é: 2 bytes, the real U+FFFD: 3 (EF BF BD), 😀: 4


def byte_level() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    backend = Backend(models.BPE(vocab, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend, eos_token="</s>", pad_token="<pad>")


def byte_fallback() -> Tokenizer:
    pieces = ["<pad>", "</s>", "<unk>", *(f"<0x{b:02X}>" for b in range(256)), "a", "b", "c"]
    backend = Backend(models.BPE({t: i for i, t in enumerate(pieces)}, [], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return Tokenizer(backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def byte_tokens(tok: Tokenizer, text: str) -> list[int]:
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode()), "one token per byte"
    return ids


@pytest.mark.parametrize("make", [byte_level, byte_fallback], ids=["byte-level", "byte-fallback"])
@pytest.mark.parametrize(
    "stop,want",
    [
        ("\ufffd", 6),  # the real U+FFFD's last byte (tokens 4 and 5 end inside it: U+FFFD too)
        ("é\ufffd", 6),
        ("\ufffdb", 7),
        ("é", 3),  # the token completing é, as any stop string split over tokens
        ("😀", 11),
        ("b😀", 11),
    ],
)
def test_a_stop_string_ends_at_the_token_that_completes_its_text(make, stop, want):
    """A prefix ending inside a character read as U+FFFD, so a stop string holding U+FFFD matched the
    start of the real U+FFFD (or of any character) and cut the completion there: 4 tokens, not 6."""
    tok = make()
    tokens = byte_tokens(tok, TEXT)
    assert stop_string_cut(tok, tokens, [stop]) == want
    assert stop in tok.decode(tokens[:want])


@pytest.mark.parametrize("make", [byte_level, byte_fallback], ids=["byte-level", "byte-fallback"])
def test_a_stop_string_never_matches_the_u_fffd_of_an_unfinished_character(make):
    """No U+FFFD in the completion: no stop, whichever prefix showed one (é and 😀 arrive byte by byte)."""
    tok = make()
    tokens = byte_tokens(tok, "aébc😀")
    assert [stop_string_cut(tok, tokens, [s]) for s in ("\ufffd", "a\ufffd", "\ufffdb")] == [None, None, None]
    assert stop_string_cut(tok, tokens, ["x", "\ufffd", "😀"]) == len(tokens)


def test_a_completion_still_growing_reads_a_trailing_u_fffd_as_unfinished():
    """The check made while decoding (the completion so far): the first byte of é is no U+FFFD yet,
    a real U+FFFD is read once a token follows it."""
    tok = byte_level()
    tokens = byte_tokens(tok, "aé\ufffdb")
    assert [stop_string_seen(tok, tokens[:n], ["\ufffd"]) for n in range(1, 8)] == [False] * 6 + [True]
    assert [stop_string_seen(tok, tokens[:n], ["é"]) for n in range(1, 8)] == [False, False] + [True] * 5
    assert settled_text("x\ufffd", "\ufffd\ufffdy", "x\ufffdy") == "x"  # ends inside a character
    assert settled_text("x\ufffd", "y", "x\ufffdy") == "x\ufffd"  # a real U+FFFD


def test_the_sampler_cuts_each_row_where_its_whole_text_shows_the_stop_string():
    """The own sampler's check while decoding: a row whose text shows U+FFFD only because its last token
    is the first byte of a character must go on, so that the row ends where the text of all its draws
    (the same draws without stop strings: counter-based noise) first shows a whole U+FFFD."""
    from helpers.tiny import tiny_model

    from minigrpo.sampling.kv_sampler import KVCacheSampler
    from minigrpo.sampling.params import SamplingParams

    tok = byte_level()
    sampler = KVCacheSampler(tiny_model(seed=0, vocab_size=len(tok)), tok)
    prompts = [tok.encode("ab", add_special_tokens=False)] * 4
    free = sampler.generate(prompts, SamplingParams(n=4, max_new_tokens=12, ignore_stop=True), key=(1, 0, 0))
    params = SamplingParams(n=4, max_new_tokens=12, stop_ids=(), stop_strings=("\ufffd",))
    out = sampler.generate(prompts, params, key=(1, 0, 0))
    want = [stop_string_cut(tok, row, ["\ufffd"]) or 12 for row in free.completion_ids.tolist()]
    assert out.completion_mask.sum(-1).tolist() == want
    assert len(set(want)) > 2 and 12 not in want  # rows cut at several places
