"""GGUF export of vocabularies whose ids leave holes, and of pre-tokenizers llama.cpp names or cannot express.

Every embedding row gets one vocabulary entry at its own id (llama.cpp's converter: a row no token uses is
`[PAD{id}]`, type UNUSED), read back with the `gguf` package (reference) and with our own reader.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from helpers.tiny import tiny_model
from test_gguf_export import bpe_tokenizer

from minigrpo import export
from minigrpo.models.gguf import GGUFCheckpoint
from minigrpo.models.gguf_vocab import _QWEN2_REGEX
from minigrpo.models.gguf_write import GGUFExportError, encode_tensor
from minigrpo.models.loading import load_pretrained
from minigrpo.tokenizer import Tokenizer

MERGES = [("1", "2"), ("12", "3"), ("Ġ", "c"), ("a", "f"), ("Ġc", "af")]
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
TEXTS = [" caf<|endoftext|>123", "café 12\n\n  x", "cafe\u0301 caf"]


def holed_tokenizer() -> Tokenizer:
    """Byte-level BPE whose ids skip 260 and 261: 256 bytes, 12 123 Ġc af at 256-259, `Ġcaf` at 262,
    then the added `<|endoftext|>` (tokenizers gives it the first id past its count: 261)."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers as pt

    vocab = {t: i for i, t in enumerate(sorted(pt.ByteLevel.alphabet()))}
    vocab.update({"12": 256, "123": 257, "Ġc": 258, "af": 259, "Ġcaf": 262})
    tk = Backend(models.BPE(vocab=vocab, merges=MERGES))
    tk.pre_tokenizer = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return Tokenizer(tk, eos_token="<|endoftext|>")


def test_a_filler_never_repeats_a_token_of_another_id(tmp_path):
    """Id 260 is a hole and id 262 is the token `[PAD260]`: the filler of row 260 was `[PAD260]` too, two
    ids of one text (a reader maps the text to one of them). The filler takes more brackets instead; a
    token `[PAD{id}]` at its own id stays, typed UNUSED as llama.cpp's converter types it."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models
    from tokenizers import pre_tokenizers as pt

    vocab = {t: i for i, t in enumerate(sorted(pt.ByteLevel.alphabet()))}
    vocab.update({"12": 256, "123": 257, "Ġc": 258, "af": 259, "[PAD260]": 262, "[PAD263]": 263})
    tk = Backend(models.BPE(vocab=vocab, merges=MERGES[:4]))
    tk.pre_tokenizer = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    path = export.save_gguf(tiny_model(0, vocab_size=265), Tokenizer(tk), tmp_path / "f.gguf", "f16")
    tokens, types = reference_vocab(path)
    assert tokens[259:] == ["af", "[[PAD260]]", "[PAD261]", "[PAD260]", "[PAD263]", "[PAD264]"]
    assert types[259:] == [NORMAL, UNUSED, UNUSED, NORMAL, UNUSED, UNUSED]
    assert len(set(tokens)) == len(tokens)


def test_added_tokens_written_as_control_tokens_are_control(tmp_path):
    """Qwen2.5 leaves `<|fim_prefix|>` and its kin unmarked as special; llama.cpp's converter types them
    CONTROL (its output never prints them), as it does special tokens. `<think>`, also unmarked, stays
    USER_DEFINED: text the model writes and a reader shows."""
    from tokenizers import AddedToken

    tok = holed_tokenizer()
    tok.backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<|fim_prefix|>", "<think>")])
    tok.backend.add_tokens([AddedToken("<｜end▁of▁sentence｜>", special=False, normalized=False)])
    ids = [tok.token_to_id(t) for t in ("<|endoftext|>", "<|fim_prefix|>", "<think>", "<｜end▁of▁sentence｜>")]
    path = export.save_gguf(tiny_model(0, vocab_size=270), tok, tmp_path / "c.gguf", "f16")
    _, types = reference_vocab(path)
    assert [types[i] for i in ids] == [CONTROL, CONTROL, USER_DEFINED, CONTROL]


def reference_vocab(path) -> tuple[list[str], list[int]]:
    """Tokens and token types as the `gguf` package reads them."""
    reader = gguf.GGUFReader(str(path))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    return tokens, reader.fields["tokenizer.ggml.token_type"].contents()


def test_a_vocabulary_with_id_holes_keeps_every_token_at_its_id(tmp_path, monkeypatch):
    """Ids 260/261 are a hole and an added token, `Ġcaf` sits at 262 past the tokenizer's count (262), and
    the model has 270 rows (as Qwen2.5: more rows than tokens). Once, every id from the count on was
    written as `[PAD{id}]`: `Ġcaf` was lost and " caf" encoded as two tokens after the round trip.
    Our reader and transformers' GGUF tokenizer both encode as the original does."""
    tok = holed_tokenizer()
    assert tok.vocab_size == 262 and tok.token_to_id("Ġcaf") == 262 and tok.eos_token_id == 261
    path = export.save_gguf(tiny_model(0, vocab_size=270), tok, tmp_path / "h.gguf", "f16")
    tokens, types = reference_vocab(path)
    assert len(tokens) == len(types) == 270
    assert tokens[256:263] == ["12", "123", "Ġc", "af", "[PAD260]", "<|endoftext|>", "Ġcaf"]
    assert types[256:263] == [NORMAL] * 4 + [UNUSED, CONTROL, NORMAL]
    assert tokens[263:] == [f"[PAD{i}]" for i in range(263, 270)] and set(types[263:]) == {UNUSED}
    ckpt = GGUFCheckpoint(path)
    assert ckpt.get("tokenizer.ggml.eos_token_id") == 261
    back = ckpt.tokenizer()
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text), text
    assert back.encode(" caf") == [262] and back.decode(tok.encode(TEXTS[0])) == TEXTS[0]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert len(hf) == 270 and hf.convert_ids_to_tokens([260, 262, 269]) == ["[PAD260]", "Ġcaf", "[PAD269]"]
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text


def test_a_token_past_the_model_rows_is_refused(tmp_path):
    """A model of 262 rows (the tokenizer's count) has no row for `Ġcaf` (id 262): an error naming the
    token, not a file that silently drops it."""
    with pytest.raises(GGUFExportError, match=r"token 'Ġcaf' has id 262, but the model has only 262 embedding rows"):
        export.save_gguf(tiny_model(0, vocab_size=262), holed_tokenizer(), tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


def byte_level_tokenizer(pre_tokenizer: dict, normalizer: dict | None = None) -> Tokenizer:
    """The holed tokenizer with another pre-tokenizer / normalizer (as tokenizer.json spells them)."""
    import tokenizers

    spec = json.loads(holed_tokenizer().backend.to_str())
    spec["pre_tokenizer"], spec["normalizer"] = pre_tokenizer, normalizer
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)), eos_token="<|endoftext|>")


def byte_level(add_prefix_space: bool, use_regex: bool = True) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": True, "use_regex": use_regex}


@pytest.mark.parametrize("digits", [False, True])
def test_a_byte_level_space_prefix_is_refused(tmp_path, digits):
    """ByteLevel(add_prefix_space=true) turns "caf" into "Ġcaf" (one token); llama.cpp never adds that
    space to a `gpt2` vocabulary (nor does the reader): once written as "gpt-2"/"smollm", "caf" came back
    as two tokens (c, af). Refused, naming the pre-tokenizer."""
    pre = byte_level(True)
    if digits:
        pre = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, pre]}
    tok = byte_level_tokenizer(pre)
    assert tok.encode("caf") == [262]
    with pytest.raises(GGUFExportError, match=r"not one llama.cpp names .*\"add_prefix_space\": true"):
        export.save_gguf(tiny_model(0, vocab_size=270), tok, tmp_path / "x.gguf", "f16")


def test_qwen2_regex_without_nfc_is_written_as_deepseek_r1_qwen(tmp_path):
    """Qwen2's split regex with no normalizer (DeepSeek-R1's Qwen distills) is llama.cpp's
    "deepseek-r1-qwen" (split as "qwen2"; the reader applies NFC to "qwen2" files only), so a decomposed
    "e\u0301" stays two characters after the round trip; once refused. With NFC it is "qwen2"."""
    split = {"type": "Split", "pattern": {"Regex": _QWEN2_REGEX}, "behavior": "Isolated", "invert": False}
    pre = {"type": "Sequence", "pretokenizers": [split, byte_level(False, use_regex=False)]}
    for normalizer, name in ((None, "deepseek-r1-qwen"), ({"type": "NFC"}, "qwen2")):
        tok = byte_level_tokenizer(pre, normalizer)
        path = export.save_gguf(tiny_model(0, vocab_size=270), tok, tmp_path / f"{name}.gguf", "f16")
        ckpt = GGUFCheckpoint(path)
        assert ckpt.get("tokenizer.ggml.pre") == name
        back = ckpt.tokenizer()
        for text in TEXTS:
            assert back.encode(text) == tok.encode(text), (name, text)
        # c, af, then e + U+0301's two bytes, or NFC's é (two bytes)
        assert len(back.encode("cafe\u0301")) == (5 if normalizer is None else 4)


# ---- weights the file cannot hold ------------------------------------------------------------------------


def test_inf_nan_weights_are_refused_and_leave_no_file(tmp_path):
    """A weight with a nan (a diverged run) was once written: the file then failed to load (ours: "a corrupt
    block scale"; llama.cpp: nan logits). Now an error naming the count, and no file."""
    model = tiny_model(0, vocab_size=264)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
        model.model.layers[0].mlp.up_proj.weight[4, 1] = float("inf")
    for quant in ("f16", "q8_0", "q4_k_m"):
        with pytest.raises(GGUFExportError, match=r"holds 2 inf/nan values: it cannot be exported"):
            export.save_gguf(model, bpe_tokenizer(), tmp_path / f"m.{quant}.gguf", quant)
    assert list(tmp_path.iterdir()) == []


def test_f16_values_beyond_its_range_are_refused_and_q8_0_holds_them(tmp_path):
    """|w| = 1e5 > 65504 was written to an f16 file as inf (unreadable); now refused, naming the way out.
    q8_0 (an fp16 scale per 32 values: up to 127 * 65504) stores it within one step of 1e5 / 127."""
    model = tiny_model(0, vocab_size=264)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[2, 7] = -1e5
    with pytest.raises(GGUFExportError, match=r"values up to 100000, beyond float16's range \(65504\): export it as"):
        export.save_gguf(model, bpe_tokenizer(), tmp_path / "m.f16.gguf", "f16")
    back, _ = load_pretrained(export.save_gguf(model, bpe_tokenizer(), tmp_path / "m.q8_0.gguf", "q8_0"))
    value = back.model.layers[1].mlp.down_proj.weight[2, 7].item()
    assert abs(value + 1e5) <= 1e5 / 127 / 2 + 1, value
    w = np.full((2, 32), 7e4, np.float32)
    with pytest.raises(GGUFExportError, match=r"^tensor 'blk.0.ffn_up.weight' holds values up to 70000"):
        encode_tensor(w, gguf.GGMLQuantizationType.F16, "blk.0.ffn_up.weight")
    bf16 = gguf.GGMLQuantizationType.BF16
    assert np.allclose(dequantize(encode_tensor(w, bf16), bf16), 7e4, rtol=2**-8)  # bf16: fp32's range
