"""Tokenizer folders whose tokenizer_config.json names a class transformers 5 rebuilds (LlamaTokenizer,
GPT2Tokenizer, Qwen2Tokenizer): ids, decoded text and chat prompts equal transformers' AutoTokenizer's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.tok_fixtures import hf_tokenizer
from tokenizers import AddedToken, Regex, models, normalizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders as dec
from tokenizers import pre_tokenizers as pt

from minigrpo.tokenizer import Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog while 12345 apples cost $3.50 each!",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "def solve(x):\n    return x * 2  # double it\n\nfor i in range(10):\n    print(solve(i))\n",
    "You are a helpful assistant. Answer the question, then say why. What is 2+3?",
]
BYTES = [f"<0x{i:02X}>" for i in range(256)]
PHI3_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]
TEXTS = [
    "",
    " ",
    "x</s>y",
    " a b",
    "  two  spaces ",
    "a <tool> b<tool>c",
    "Hello world",
    "\nnew\n\nlines\n",
    "<|user|>\nWhat is 2+3?<|end|>\n<|assistant|>\n",
    "<s>[INST] hi [/INST] ok</s>[INST] more[/INST]",
    "bytes: é 😀 ü 日本",
    "12345 apples",
]
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [
        {"role": "system", "content": " Be brief."},
        {"role": "user", "content": "Natalia sold 48 clips.\nTotal?"},
        {"role": "assistant", "content": "48 + 24 = 72"},
        {"role": "user", "content": " And in June? é"},
    ],
]


def spm_backend(layout: str, model: str = "bpe") -> BackendTokenizer:
    """A small SentencePiece-like vocabulary with byte fallback, laid out as a converted SentencePiece model:
    "normalizer" (Llama-2, Phi-3: Prepend("▁") + Replace(" ", "▁")) or "metaspace" (newer conversions:
    a Metaspace pre-tokenizer, prepend_scheme "first"); BOS added by the post-processor."""
    specials = ["<unk>", "<s>", "</s>", *BYTES]
    if model == "bpe":
        tk = BackendTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False)
    else:
        tk = BackendTokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=400, special_tokens=specials, unk_token="<unk>", show_progress=False
        )
    tk.pre_tokenizer = pt.Metaspace(prepend_scheme="first", split=True)
    tk.train_from_iterator(CORPUS * 10, trainer)
    if layout == "normalizer":
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tk.pre_tokenizer = None
    else:
        tk.pre_tokenizer = pt.Metaspace(prepend_scheme="first", split=False)
    tk.decoder = dec.Sequence([dec.Replace("▁", " "), dec.ByteFallback(), dec.Fuse(), dec.Strip(" ", 1, 0)])
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tk.token_to_id("<s>"))]
    )
    tk.add_special_tokens([AddedToken(t, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tk.add_tokens([AddedToken(t, normalized=False, special=True, rstrip=True) for t in PHI3_TOKENS])
    tk.add_tokens([AddedToken("<tool>", normalized=False)])
    return tk


def write_folder(path: Path, backend: BackendTokenizer, config: dict, model_type: str | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if model_type is not None:
        (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path


def llama_config(**extra) -> dict:
    base = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    return {**base, **{k: v for k, v in extra.items() if v is not None}}


def assert_same_as_hf(ours: Tokenizer, hf, texts: list[str]) -> None:
    """Ids with and without special tokens, decoded text with and without them, equal transformers'."""
    for special in (True, False):
        expected = [hf.encode(t, add_special_tokens=special) for t in texts]
        assert [ours.encode(t, add_special_tokens=special) for t in texts] == expected, special
    ids = [hf.encode(t) for t in texts]
    for skip in (False, True):
        assert [ours.decode(i, skip_special_tokens=skip) for i in ids] == hf.batch_decode(ids, skip_special_tokens=skip)


@pytest.fixture(scope="module")
def backends():
    return {(layout, m): spm_backend(layout, m) for layout in ("normalizer", "metaspace") for m in ("bpe", "unigram")}


@pytest.mark.parametrize("layout", ["normalizer", "metaspace"])
@pytest.mark.parametrize("legacy", [None, True, False])
@pytest.mark.parametrize("prefix", [None, True, False])
def test_llama_tokenizer_folders_encode_and_decode_as_transformers(tmp_path, backends, layout, legacy, prefix):
    """transformers drops tokenizer.json's normalizer and pre-tokenizer for LlamaTokenizer: a Metaspace
    marks only the text's start (legacy false), every piece between added tokens (legacy true) or
    nothing (add_prefix_space false); with the old normalizer layout every piece got a "▁"."""
    config = llama_config(legacy=legacy, add_prefix_space=prefix)
    d = write_folder(tmp_path / "tok", backends[(layout, "bpe")], config)
    assert_same_as_hf(Tokenizer.from_dir(d), hf_tokenizer(d), TEXTS)


def test_the_normalizer_layout_no_longer_marks_every_piece(tmp_path, backends):
    """The numbers of the Llama-2 / Phi-3 layout: the piece after "</s>" and the start of " a b"."""
    d = write_folder(tmp_path / "tok", backends[("normalizer", "bpe")], llama_config())
    tok = Tokenizer.from_dir(d)
    assert tok.encode("x</s>y", add_special_tokens=False)[-2:] == [tok.eos_token_id, tok.token_to_id("y")]
    assert [tok.id_to_token(i) for i in tok.encode(" a b", add_special_tokens=False)] == ["▁a", "▁", "b"]
    assert tok.decode(tok.encode("a <tool>", add_special_tokens=False)) == "a <tool>"


@pytest.mark.parametrize("layout", ["normalizer", "metaspace"])
def test_phi3_and_mistral_chat_prompts_tokenize_as_transformers(tmp_path, backends, layout):
    """Phi-3 layout: added tokens only in tokenizer_config.json's added_tokens_decoder (rstrip), no text
    piece after <|user|> / <|assistant|> starts with an extra "▁"; Mistral's [INST] layout likewise."""
    backend = backends[(layout, "bpe")]
    flags = {"lstrip": False, "rstrip": True, "normalized": False, "special": True}
    added = {str(backend.token_to_id(t)): {"content": t, **flags} for t in PHI3_TOKENS}
    for t in ("<unk>", "<s>", "</s>"):
        added[str(backend.token_to_id(t))] = {"content": t, "normalized": False, "special": True}
    phi3 = llama_config(eos_token="<|endoftext|>", added_tokens_decoder=added, chat_template=PHI3_TEMPLATE)
    mistral = llama_config(legacy=True, chat_template=MISTRAL_TEMPLATE)
    for name, config in (("phi3", phi3), ("mistral", mistral)):
        d = write_folder(tmp_path / name, backend, config)
        ours, hf = Tokenizer.from_dir(d), hf_tokenizer(d)
        for messages in CONVERSATIONS:
            for gen in (True, False):
                text = ours.apply_chat_template(messages, add_generation_prompt=gen)
                assert text == hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
                want = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
                assert ours.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True) == want
        assert_same_as_hf(ours, hf, TEXTS)


def test_a_unigram_file_and_missing_token_names_follow_the_llama_class(tmp_path, backends):
    """LlamaTokenizer builds a BPE over the file's pieces whatever the file's model (a Unigram file's pieces
    get no merges), and names <s>, </s>, <unk> when tokenizer_config.json names none."""
    d = write_folder(tmp_path / "tok", backends[("metaspace", "unigram")], {"tokenizer_class": "LlamaTokenizerFast"})
    ours, hf = Tokenizer.from_dir(d), hf_tokenizer(d)
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == ("<s>", "</s>", "<unk>")
    assert ours.stop_ids == (hf.eos_token_id,)
    assert_same_as_hf(ours, hf, TEXTS)


MODEL_TYPES = [("phi3", False), ("mistral", False), ("llama", True), (None, True)]


@pytest.mark.parametrize(("model_type", "rebuilt"), MODEL_TYPES)
def test_config_json_model_type_picks_the_class_as_in_transformers(tmp_path, backends, model_type, rebuilt):
    """transformers loads a phi3 or mistral model folder's tokenizer.json as written whatever class the
    tokenizer config names, and rebuilds a llama one (and a folder without config.json)."""
    backend = backends[("normalizer", "bpe")]
    d = write_folder(tmp_path / "tok", backend, llama_config(), model_type)
    ours, hf = Tokenizer.from_dir(d), hf_tokenizer(d)
    assert_same_as_hf(ours, hf, TEXTS)
    as_written = backend.encode("x</s>y", add_special_tokens=False).ids
    assert (ours.encode("x</s>y", add_special_tokens=False) != as_written) == rebuilt


@pytest.mark.parametrize("tokenizer_class", ["PreTrainedTokenizerFast", "LlamaTokenizer"])
def test_files_transformers_applies_as_written_stay_as_written(tmp_path, backends, tokenizer_class):
    """PreTrainedTokenizerFast folders, and LlamaTokenizer folders whose tokenizer.json is byte-level
    (Llama-3 style), are applied as tokenizer.json says."""
    backend = backends[("normalizer", "bpe")]
    if tokenizer_class == "LlamaTokenizer":
        backend = byte_level_backend(pt.ByteLevel(add_prefix_space=False))
    d = write_folder(tmp_path / "tok", backend, llama_config(tokenizer_class=tokenizer_class, bos_token="<s>"))
    ours, hf = Tokenizer.from_dir(d), hf_tokenizer(d)
    assert [ours.encode(t) for t in TEXTS] == [backend.encode(t).ids for t in TEXTS]
    assert_same_as_hf(ours, hf, TEXTS)


LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_level_backend(pre_tokenizer) -> BackendTokenizer:
    """A small byte-level BPE (GPT-2 / SmolLM2 / Qwen style) with `pre_tokenizer`, <s> added first."""
    tk = BackendTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizer
    tk.decoder = dec.ByteLevel()
    specials = ["<|endoftext|>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, initial_alphabet=pt.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(CORPUS * 10, trainer)
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tk.token_to_id("<s>"))]
    )
    tk.add_tokens([AddedToken("<tool>", normalized=False)])
    return tk


SMOLLM2_PRE = pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)])
LLAMA3_PRE = pt.Sequence([pt.Split(Regex(LLAMA3_SPLIT), "isolated"), pt.ByteLevel(False, use_regex=False)])


@pytest.mark.parametrize("tokenizer_class", ["GPT2Tokenizer", "Qwen2Tokenizer"])
@pytest.mark.parametrize("prefix", [None, True])
@pytest.mark.parametrize(("pre", "model_type"), [(SMOLLM2_PRE, None), (LLAMA3_PRE, "llama"), (LLAMA3_PRE, "phi3")])
def test_byte_level_classes_encode_as_transformers(tmp_path, tokenizer_class, prefix, pre, model_type):
    """GPT2Tokenizer (SmolLM2, Phi-4) and Qwen2Tokenizer folders get their class's own split (SmolLM2's
    digit split and a Llama-3-style split are dropped; add_prefix_space applies), unless config.json's
    model_type (phi3) makes transformers apply the file as written."""
    backend = byte_level_backend(pre)
    config = {"tokenizer_class": tokenizer_class, "bos_token": "<s>", "eos_token": "</s>", "unk_token": None}
    if prefix is not None:
        config["add_prefix_space"] = prefix
    d = write_folder(tmp_path / "tok", backend, config, model_type)
    texts = [*TEXTS, "cafe\u0301 1234567", "<|im_start|>user\n 12 <tool>x<|im_end|>"]
    assert_same_as_hf(Tokenizer.from_dir(d), hf_tokenizer(d), texts)
