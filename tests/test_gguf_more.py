"""GGUF files the converters and corrupt downloads produce beyond the common case: llama.cpp's other names of
the pre-tokenizers, chat templates that do not compile, counts that are no counts, arrays nested without
end, and storage types the installed `gguf` package is too old to read. Each is read right or refused with
one line naming the file, before any weight is read."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from test_gguf import add_tokenizer, write_gguf, write_raw
from test_gguf_read import embedding, encode, model_kv, write_bytes_gguf

from minigrpo.chat_template import ChatTemplateError
from minigrpo.models.gguf import GGUFCheckpoint, GGUFError
from minigrpo.models.loading import load_pretrained

HIDDEN, VOCAB = 32, 300
TEXTS = ["hello world", " 12345  678", "a<|eot_id|>b<tool>c", "  x\n\n y ", "café  über", "I'll pay $3.50!"]


def vocab_only(path: Path, pre: str, template: str | None = None, **named: str) -> Path:
    """A llama GGUF of one embedding and the byte-level test vocabulary, its pre-tokenizer named `pre`;
    `template` replaces the default chat template, `named` adds named ones."""

    def tokenizer(w):
        add_tokenizer(w, "gpt2", pre)
        if template is not None:
            w.kv_data[0].pop("tokenizer.chat_template")
            w.add_chat_template(template)
        if named:
            w.add_array("tokenizer.chat_templates", list(named))
            for name, source in named.items():
                w.add_string(f"tokenizer.chat_template.{name}", source)

    emb = np.random.default_rng(0).standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    return write_gguf(path, "llama", {"token_embd.weight": emb}, tokenizer=tokenizer)


def ids(tok, texts=TEXTS) -> list[list[int]]:
    return [tok.encode(t, add_special_tokens=True) for t in texts]


@pytest.mark.parametrize(
    ("pre", "same_as"),
    [("gpt-2", "gpt2"), ("phi-2", "gpt2"), ("deepseek-r1-qwen", "qwen2"), ("falcon3", "llama-bpe")],
)
def test_llama_cpp_pre_tokenizer_names(tmp_path, pre, same_as):
    """llama.cpp's converter writes "gpt-2" (with a hyphen) for GPT-2's regex, and its runtime reads "phi-2"
    alike, "deepseek-r1-qwen" (DeepSeek-R1's Qwen distills) as Qwen2's regex and "falcon3" as Llama 3's
    (merges ignored, BOS added): each once refused as an unsupported pre-tokenizer."""
    tok = GGUFCheckpoint(vocab_only(tmp_path / f"{pre}.gguf", pre)).tokenizer()
    ref = GGUFCheckpoint(vocab_only(tmp_path / f"ref-{same_as}.gguf", same_as)).tokenizer()
    assert ids(tok) == ids(ref)
    assert tok.add_bos_token == ref.add_bos_token == (same_as == "llama-bpe")
    pieces = [tok.id_to_token(i) for i in tok.encode("hello 12345", add_special_tokens=False)]
    assert (
        pieces
        == {
            "gpt2": [*"hello", "Ġ", "123", "45"],  # " ?\p{N}+" then the merges
            "qwen2": [*"hello", *"Ġ12345"],  # one digit each
            "llama-bpe": ["hello", "Ġ", "123", "45"],  # a word of the vocabulary taken whole, then \p{N}{1,3}
        }[same_as]
    )
    decomposed = " cafe\u0301"  # no NFC for DeepSeek's distills (llama.cpp has none): the composed é is not made
    if pre == "deepseek-r1-qwen":
        assert tok.encode(decomposed, add_special_tokens=False) != ref.encode(decomposed, add_special_tokens=False)


def test_a_chat_template_that_does_not_compile_fails_before_the_weights(tmp_path, monkeypatch):
    """A broken default or named template is a ChatTemplateError naming the file and the key when the model
    loads, before any weight is read (it once loaded, and the first prompt failed naming nothing)."""
    path = vocab_only(tmp_path / "t.gguf", "qwen2", tool_use="{% for m in messages %}{{ m.content }")
    monkeypatch.setattr(GGUFCheckpoint, "tensors", lambda *a, **k: pytest.fail("weights read before the tokenizer"))
    expected = f"{path}: tokenizer.chat_template.tool_use: chat template does not parse (line 1)"
    with pytest.raises(ChatTemplateError, match="^" + re.escape(expected)):
        load_pretrained(path)
    bad_default = vocab_only(tmp_path / "d.gguf", "qwen2", template="{% if %}")
    with pytest.raises(ChatTemplateError, match="^" + re.escape(f"{bad_default}: tokenizer.chat_template: ")):
        GGUFCheckpoint(bad_default).tokenizer()


def test_a_chat_template_that_raises_names_the_file(tmp_path):
    """A template's own error (raise_exception) names the GGUF file it came from, as for a model folder."""
    template = "{% if messages[0].role != 'system' %}{{ raise_exception('a system message comes first') }}{% endif %}"
    path = vocab_only(tmp_path / "r.gguf", "qwen2", template=template)
    tok = GGUFCheckpoint(path).tokenizer()
    assert tok.apply_chat_template([{"role": "system", "content": "x"}]) == ""
    with pytest.raises(ChatTemplateError, match="^" + re.escape(f"{path}: ") + ".*a system message comes first"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def without(kv: list, key: str) -> list:
    return [entry for entry in kv if entry[0] != key]


@pytest.mark.parametrize(
    ("key", "vtype", "value", "shown"),
    [
        ("qwen2.attention.head_count", 4, 0, "0"),  # once a ZeroDivisionError
        ("qwen2.attention.head_count", 8, "four", "'four'"),  # once int()'s ValueError naming no file
        ("qwen2.attention.head_count_kv", 9, (4, []), "[]"),  # an empty per-layer array
        ("qwen2.embedding_length", 6, 32.5, "32.5"),  # once truncated to 32 silently
        ("qwen2.attention.key_length", 4, 0, "0"),
        ("qwen2.context_length", 4, 0, "0"),
        ("qwen2.feed_forward_length", 7, True, "True"),
    ],
)
def test_counts_that_are_no_counts_are_one_line_naming_the_key(tmp_path, key, vtype, value, shown):
    """Sizes and counts must be positive whole numbers (llama.cpp reads them as u32): anything else is one
    GGUFError naming the file and the key when the config is read."""
    path = write_bytes_gguf(tmp_path / "c.gguf", [*without(model_kv(), key), (key, vtype, value)], [embedding()])
    with pytest.raises(GGUFError) as info:
        _ = GGUFCheckpoint(path).config
    assert str(info.value) == f"{path}: metadata key {key} = {shown} is not a positive whole number"


def test_per_layer_counts_that_differ_name_the_values(tmp_path):
    path = write_bytes_gguf(tmp_path / "d.gguf", model_kv(heads=[4, 8]), [embedding()])
    with pytest.raises(GGUFError, match=re.escape("qwen2.attention.head_count differs between layers (4, 8)")):
        _ = GGUFCheckpoint(path).config


def test_arrays_nested_without_end_are_one_line(tmp_path):
    """A corrupt metadata value of arrays inside arrays 5000 deep (60 kB): one GGUFError naming the file and
    the key, once a RecursionError; nesting a few levels deep still reads."""
    inner = struct.pack("<IQ", 4, 1) + struct.pack("<I", 7)  # [7] (u32)
    for depth, ok in ((3, True), (5000, False)):
        value = inner
        for _ in range(depth):
            value = struct.pack("<IQ", 9, 1) + value
        raw = write_bytes_gguf(tmp_path / "n.gguf", model_kv(), [embedding()]).read_bytes()
        count = struct.unpack("<Q", raw[16:24])[0] + 1
        path = tmp_path / f"deep{depth}.gguf"
        key = "x.deep" + "_" * (-(8 + 6 + 4 + len(value)) % 32)  # the data section moves by whole alignments
        entry = encode(8, key) + struct.pack("<I", 9) + value
        path.write_bytes(raw[:16] + struct.pack("<Q", count) + entry + raw[24:])
        if ok:
            nested = GGUFCheckpoint(path).get(key)
            for _ in range(depth):
                nested = nested[0]
            assert nested == [7]
        else:
            with pytest.raises(GGUFError, match="^" + re.escape(f"{path}: metadata key {key!r} nests arrays")):
                GGUFCheckpoint(path)


def test_a_type_the_installed_gguf_package_cannot_read_fails_at_open(tmp_path, monkeypatch):
    """MXFP4 is read through the `gguf` package; a release without it (as before 0.18) is one GGUFError naming
    the tensor and type when the file opens, not gguf's NotImplementedError in the middle of the load."""
    import gguf
    import gguf.quants

    qtype = gguf.GGMLQuantizationType.MXFP4
    data = np.random.default_rng(0).integers(0, 256, (VOCAB, 17), dtype=np.uint8) & 0xBF  # one block per row
    path = write_raw(tmp_path / "fp4.gguf", "qwen2", {"token_embd.weight": (data, qtype)})
    assert torch.isfinite(dict(GGUFCheckpoint(path).tensors())["model.embed_tokens.weight"]).all()
    monkeypatch.delattr(gguf.quants, "MXFP4")
    monkeypatch.delitem(gguf.quants._type_traits, qtype)
    expected = f"{path}: tensor 'token_embd.weight' is stored as MXFP4, which is read with the gguf package"
    with pytest.raises(GGUFError, match="^" + re.escape(expected)):
        GGUFCheckpoint(path)


def test_template_names_given_as_one_string_are_one_line(tmp_path):
    """tokenizer.chat_templates is an array of names; a string there was read letter by letter (the named
    templates then silently missing): one line naming the file and the key."""
    path = tmp_path / "s.gguf"

    def tokenizer(w):
        add_tokenizer(w, "gpt2", "gpt2")
        w.add_string("tokenizer.chat_templates", "tool_use")
        w.add_string("tokenizer.chat_template.tool_use", "{{ messages[0].content }}")

    emb = np.random.default_rng(0).standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    write_gguf(path, "llama", {"token_embd.weight": emb}, tokenizer=tokenizer)
    with pytest.raises(GGUFError, match="^" + re.escape(f"{path}: tokenizer.chat_templates must be an array")):
        GGUFCheckpoint(path).tokenizer()
