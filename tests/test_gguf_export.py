"""GGUF export (minigrpo.export.save_gguf, `python -m minigrpo.export`): tiny random models of every family
written in every export type and read back by our loader and transformers' GGUF loader; Q4_K/Q6_K blocks
against the `gguf` package's dequantizer; the SmolLM2 tokenizer and chat template re-exported exactly.

Logit tolerances (relative: ||ours - source|| / ||source||, measured on these tiny models, seed fixed;
largest over the five families, then the bound):
    f16 0.0007 -> 0.002, bf16 0.006 -> 0.012, q8_0 0.018 -> 0.035, q5_0 0.14 -> 0.22,
    q4_k_m 0.23 -> 0.33, q4_0 0.27 -> 0.38.
The models are random (no structure for quantization to keep), so 4-bit errors are large; the negative
control (a llama export without llama.cpp's q/k permutation) errs by 0.58, above every bound.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from helpers.cli import one_error_line, run_module
from helpers.tiny import tiny_model, tiny_run_checkpoint

from minigrpo import export
from minigrpo.lora import add_adapters
from minigrpo.lora_export import save_peft_adapter
from minigrpo.models import kquants
from minigrpo.models.gguf import GGUFCheckpoint, packaged_gguf
from minigrpo.models.gguf_write import GGUFExportError, tensor_type
from minigrpo.models.loading import load_pretrained, save_pretrained

TOL = {"f16": 0.002, "bf16": 0.012, "q8_0": 0.035, "q5_0": 0.22, "q4_k_m": 0.33, "q4_0": 0.38}
NO_PERMUTE_ERROR = 0.45  # the negative control must err more than this (and TOL stays below it)
FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"head_dim": 64, "tie_word_embeddings": True},
    "phi3": {},
}
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def bpe_tokenizer():
    """A byte-level BPE tokenizer (256 byte tokens, a few merges, 3 specials): vocab 264."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers as pt

    from minigrpo.tokenizer import Tokenizer

    tokens = [*sorted(pt.ByteLevel.alphabet()), "12", "123", "Ġc", "af", "Ġcaf"]
    merges = [("1", "2"), ("12", "3"), ("Ġ", "c"), ("a", "f"), ("Ġc", "af")]
    tk = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tk.pre_tokenizer = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>", "<|im_start|>")])
    tk.add_special_tokens([AddedToken("<|im_end|>", special=True, normalized=False)])
    return Tokenizer(
        tk, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=TEMPLATE
    )


def family_model(family: str, seed: int = 0, **overrides):
    """A 2-layer model (hidden 256: whole k-quant blocks) whose q/k weights are scaled up, so that
    attention depends on them and a q/k row-order error shows in the logits."""
    cfg = dict(hidden_size=256, intermediate_size=512, vocab_size=264, initializer_range=0.02)
    model = tiny_model(seed, model_type=family, **{**cfg, **FAMILIES[family], **overrides})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(4.0)
            if "qkv_proj" in name:  # phi3: q and k rows of the fused weight
                p[: -model.args.n_kv_heads * model.args.head_dim].mul_(4.0)
    return model


IDS = torch.randint(0, 264, (2, 16), generator=torch.Generator().manual_seed(1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_every_type(tmp_path, tok, family):
    model = family_model(family)
    with torch.no_grad():
        ref = model(IDS)
    errors = {}
    for quant in TOL:
        path = export.save_gguf(model, tok, tmp_path / f"{family}.{quant}.gguf", quant)
        back, back_tok = load_pretrained(path)
        with torch.no_grad():
            errors[quant] = rel_err(back(IDS), ref)
        assert back.args.model_type == ("llama" if family == "mistral" else family)
        assert back_tok.chat_template == TEMPLATE and back_tok.vocab_size == 264
    assert all(errors[q] <= TOL[q] for q in TOL), errors
    assert errors["f16"] > 0 and errors["q4_k_m"] < errors["q4_0"], errors  # really rounded; Q4_K beats Q4_0


def test_without_the_qk_permutation_llama_fails(tmp_path, tok, monkeypatch):
    """Negative control: a llama file written in HF's q/k row order is read wrongly by llama.cpp's
    convention (and ours): the logits miss every tolerance, f16 included."""
    model = family_model("llama")
    with torch.no_grad():
        ref = model(IDS)
    monkeypatch.setattr(export, "permute_qk", lambda w, n_heads: w)
    for quant in ("f16", "q4_0"):
        back, _ = load_pretrained(export.save_gguf(model, tok, tmp_path / f"np.{quant}.gguf", quant))
        with torch.no_grad():
            err = rel_err(back(IDS), ref)
        assert err > NO_PERMUTE_ERROR > max(TOL.values()), err


def test_file_layout_q4_k_m(tmp_path, tok):
    """q4_k_m storage types (tied head: token_embd is the output), metadata, permuted q rows."""
    model = family_model("qwen2")
    ckpt = GGUFCheckpoint(export.save_gguf(model, tok, tmp_path / "m.gguf", "q4_k_m"))
    types = ckpt.tensor_types()
    assert types["model.embed_tokens.weight"] == "Q6_K" and "lm_head.weight" not in types
    for layer, kind in ((0, "Q4_K"), (1, "Q6_K")):  # use_more_bits(1, 2): the last eighth
        assert types[f"model.layers.{layer}.self_attn.v_proj.weight"] == kind
        assert types[f"model.layers.{layer}.mlp.down_proj.weight"] == kind
        assert types[f"model.layers.{layer}.self_attn.q_proj.weight"] == "Q4_K"
        assert types[f"model.layers.{layer}.self_attn.q_proj.bias"] == "F32"
    assert ckpt.get("general.file_type") == 15 and ckpt.get("general.quantization_version") == 2
    assert ckpt.get("qwen2.context_length") == 256 and ckpt.get("qwen2.rope.dimension_count") == 64
    assert ckpt.get("tokenizer.ggml.pre") == "gpt-2" and ckpt.get("tokenizer.ggml.model") == "gpt2"

    llama = family_model("llama")
    ckpt = GGUFCheckpoint(export.save_gguf(llama, tok, tmp_path / "l.gguf", "f16"))
    raw = {t.name: np.asarray(t.data, np.float32) for t in ckpt._reader.tensors}
    q = llama.model.layers[0].self_attn.q_proj.weight.detach().numpy()  # (4 heads * 64, 256)
    assert np.array_equal(raw["blk.0.attn_q.weight"][1], q[32].astype(np.float16))  # head 0: row 1 <- HF row 32
    v = llama.model.layers[0].self_attn.v_proj.weight.detach().numpy()
    assert np.array_equal(raw["blk.0.attn_v.weight"][1], v[1].astype(np.float16))  # v: not permuted


def test_storage_type_rules():
    more = [i for i in range(32) if kquants.use_more_bits(i, 32)]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]  # llama.cpp's for 32 layers
    q = kquants.q4_k_m_type
    assert q("output.weight", (100, 4096), n_layers=32, has_output=True).name == "Q6_K"
    assert q("token_embd.weight", (100, 4096), n_layers=32, has_output=True).name == "Q4_K"
    assert q("blk.6.attn_v.weight", (8, 4096), n_layers=32, has_output=True).name == "Q6_K"
    assert q("blk.7.ffn_down.weight", (8, 4096), n_layers=32, has_output=True).name == "Q4_K"
    assert q("blk.7.attn_qkv.weight", (8, 4096), n_layers=32, has_output=True).name == "Q6_K"
    assert q("blk.7.ffn_up.weight", (8, 96), n_layers=32, has_output=True).name == "Q5_0"  # 96 % 256
    assert q("output.weight", (8, 96), n_layers=32, has_output=True).name == "Q8_0"
    assert q("blk.0.ffn_up.weight", (8, 40), n_layers=32, has_output=True).name == "F16"  # 40 % 32
    assert tensor_type("output.weight", (8, 256), "q4_0", n_layers=2, has_output=True).name == "Q6_K"
    assert tensor_type("blk.0.ffn_up.weight", (8, 256), "q4_0", n_layers=2, has_output=True).name == "Q4_0"
    assert tensor_type("blk.0.attn_norm.weight", (256,), "q8_0", n_layers=2, has_output=True).name == "F32"


# ---- k-quant blocks ----------------------------------------------------------------------------------


def test_kquant_blocks_against_gguf_dequantizer():
    """Our bytes, read by gguf's dequantizer, equal our own dequantization exactly; and the error is
    what the format allows: Q4_K below 0.85x gguf's Q4_0 and below Q4_1 (5 bits) on the same rows
    (measured 0.071 vs 0.087 / 0.078), Q6_K below 0.5x Q5_0 (0.017 vs 0.043)."""
    from gguf import GGMLQuantizationType as QT
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 512)).astype(np.float32) * np.exp(rng.standard_normal((64, 1))).astype(np.float32)
    x[3], x[4], x[5] = np.abs(x[3]), 0.0, -np.abs(x[5])  # one-signed rows and a zero row
    x[6, :256] = 1e-3  # a constant sub-block

    def rel(y):
        return float(np.sqrt(((y - x) ** 2).mean() / (x**2).mean()))

    q4k, q6k = kquants.quantize_q4_k(x), kquants.quantize_q6_k(x)
    assert q4k.shape == (64, 2 * 144) and q6k.shape == (64, 2 * 210) and q4k.dtype == np.uint8
    for data, qtype, ours in ((q4k, QT.Q4_K, kquants.dequantize_q4_k), (q6k, QT.Q6_K, kquants.dequantize_q6_k)):
        theirs = dequantize(data, qtype)
        assert np.array_equal(theirs, ours(data)), qtype
        assert np.all(theirs[4] == 0)
    e4k, e6k = rel(dequantize(q4k, QT.Q4_K)), rel(dequantize(q6k, QT.Q6_K))
    e40, e41, e50 = (rel(dequantize(quantize(x, t), t)) for t in (QT.Q4_0, QT.Q4_1, QT.Q5_0))
    assert e4k < 0.85 * e40 and e4k < e41 and e4k < 0.08, (e4k, e40, e41)
    assert e6k < 0.5 * e50 and e6k < 0.02, (e6k, e50)
    with pytest.raises(ValueError, match="multiple of 256"):
        kquants.quantize_q4_k(x[:, :100])


# ---- transformers' GGUF loader -------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "quant"), [("llama", "q8_0"), ("llama", "q4_k_m"), ("qwen2", "f16")])
def test_transformers_reads_our_files(tmp_path, tok, family, quant, monkeypatch):
    """transformers dequantizes our file (q/k un-permuted by its own code) to the logits ours gives."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM

    path = export.save_gguf(family_model(family), tok, tmp_path / f"{family}.gguf", quant)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    ours, _ = load_pretrained(path)
    with torch.no_grad():
        err = rel_err(hf(IDS).logits, ours(IDS))
    assert err < 1e-5, err


# ---- where the file goes ---------------------------------------------------------------------------------


def test_an_output_no_file_can_be_written_at_is_refused_before_quantizing(tmp_path, tok, monkeypatch):
    """save_gguf to a missing folder, a folder, or a folder it cannot write in: one GGUFExportError naming
    the path, before any tensor is quantized (once: an OSError naming a hidden temporary file, or, for a
    folder, an IsADirectoryError after the whole file was quantized and written)."""
    model = family_model("llama")
    monkeypatch.setattr(export, "encode_tensor", lambda *args: pytest.fail("a tensor was quantized"))
    missing, folder = tmp_path / "missing" / "m.gguf", tmp_path / "out"
    folder.mkdir()
    cases = [
        (missing, f"{missing}: the folder {missing.parent} does not exist"),
        (folder, f"{folder} is a folder; name a file, e.g. {folder / 'model.gguf'}"),
    ]
    for path, problem in cases:
        with pytest.raises(GGUFExportError) as info:
            export.save_gguf(model, tok, path, "q4_k_m")
        assert str(info.value) == f"cannot write the GGUF file: {problem}"
    monkeypatch.setattr(export, "write_probe_error", lambda folder: "Read-only file system")
    with pytest.raises(GGUFExportError) as info:
        export.save_gguf(model, tok, tmp_path / "r.gguf", "q8_0")
    assert (
        str(info.value)
        == f"cannot write the GGUF file: {tmp_path / 'r.gguf'}: cannot write in {tmp_path} (Read-only file system)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not list(folder.iterdir())


def test_an_existing_file_is_replaced_whole(tmp_path, tok, monkeypatch):
    """An existing (even read-only) file is replaced by the complete new file; an export that fails half
    way leaves the old file as it was and no temporary file behind."""
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")
    path.chmod(0o444)
    model = family_model("qwen2")
    export.save_gguf(model, tok, path, "f16")
    back, _ = load_pretrained(path)
    with torch.no_grad():
        assert rel_err(back(IDS), model(IDS)) < TOL["f16"]
    good = path.read_bytes()

    def broken(w, qtype, name):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "encode_tensor", broken)
    with pytest.raises(OSError, match="No space left on device"):
        export.save_gguf(model, tok, path, "q8_0")
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


# ---- tokenizer and chat template ------------------------------------------------------------------------


def test_smollm2_tokenizer_round_trips_exactly(tmp_path):
    """Re-exporting the packaged SmolLM2 tokenizer writes the same tokens, types, merges, special ids,
    pre-tokenizer and chat template as the original file."""
    original = GGUFCheckpoint(packaged_gguf("smollm2"))
    model = tiny_model(
        vocab_size=49152, hidden_size=32, intermediate_size=32, num_hidden_layers=1, tie_word_embeddings=True
    )
    copy = GGUFCheckpoint(export.save_gguf(model, original.tokenizer(), tmp_path / "smol.gguf", "f16"))
    keys = ["tokens", "token_type", "merges", "model", "pre", "add_bos_token"]
    keys += [f"{k}_token_id" for k in ("bos", "eos", "unknown", "padding")]
    for key in [f"tokenizer.ggml.{k}" for k in keys] + ["tokenizer.chat_template"]:
        assert copy.get(key) == original.get(key), key
    a, b = original.tokenizer(), copy.tokenizer()
    text = "cost $12,345.50 <|im_end|> café\n\n  x"
    assert b.encode(text) == a.encode(text) and b.stop_ids == a.stop_ids
    chat = [{"role": "user", "content": "What is 2+3?"}]
    assert b.apply_chat_template(chat, add_generation_prompt=True) == a.apply_chat_template(
        chat, add_generation_prompt=True
    )


def test_unsupported_tokenizers_and_models(tmp_path, tok):
    from helpers.tiny import tiny_tokenizer

    model = family_model("llama")
    with pytest.raises(GGUFExportError, match="only byte-level BPE"):
        export.save_gguf(model, tiny_tokenizer(), tmp_path / "x.gguf")
    with pytest.raises(GGUFExportError, match="unknown GGUF export type 'q3_k'"):
        export.save_gguf(model, tok, tmp_path / "x.gguf", "q3_k")
    with pytest.raises(GGUFExportError, match="mlp_bias"):
        export.save_gguf(family_model("llama", mlp_bias=True), tok, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_a_sentencepiece_gguf_model_is_refused_before_writing(tmp_path, capsys):
    """A model loaded from a SentencePiece ("llama" vocabulary) GGUF cannot be exported: one-line
    GGUFExportError, from save_gguf and from the command line, and no file is written."""
    from test_gguf import spm_model_tensors, write_spm_gguf

    source = write_spm_gguf(tmp_path / "spm.gguf", "llama", spm_model_tensors("llama"))
    model, spm_tok = load_pretrained(source)
    out = tmp_path / "out.gguf"
    with pytest.raises(GGUFExportError, match=r"^SentencePiece vocabularies .* cannot be exported to GGUF") as info:
        export.save_gguf(model, spm_tok, out, "f16")
    assert "\n" not in str(info.value)
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--checkpoint", str(source), "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "SentencePiece vocabularies" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["spm.gguf"]


# ---- rope scaling -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "scaling"),
    [
        (
            "llama",
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
        ("llama", {"rope_type": "linear", "factor": 2.0}),
        ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
        ("phi3", {"type": "longrope", "long_factor": [float(i) for i in range(1, 33)], "short_factor": [1.0] * 32}),
    ],
)
def test_rope_scaling_round_trips(tmp_path, tok, family, scaling):
    extra = {"original_max_position_embeddings": 64} if family == "phi3" else {}
    model = family_model(family, rope_scaling=scaling, rope_theta=500000.0, **extra)
    ckpt = GGUFCheckpoint(export.save_gguf(model, tok, tmp_path / "r.gguf", "f16"))
    assert ckpt.config["rope_scaling"] == scaling
    back, _ = load_pretrained(ckpt.path)
    ids = torch.randint(0, 264, (1, 80), generator=torch.Generator().manual_seed(2))  # past 64: long factors
    with torch.no_grad():
        assert rel_err(back(ids), model(ids)) < TOL["f16"]


@pytest.mark.parametrize(("low", "high", "original"), [(1.0, 4.0, 64), (2.0, 8.0, 128)])
def test_llama3_rope_scaling_of_any_ramp_round_trips(tmp_path, tok, low, high, original):
    """Llama-3 scaling with another ramp than the published 1 / 4 / 8192: the file holds transformers'
    frequencies as llama.cpp's divisors, and our reader loads it back (once: "rope_freqs does not match
    Llama-3 rope scaling", a file save_gguf wrote that load_pretrained refused). Only the ratios of
    low, high and original matter, so the ramp comes back with low 1."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": low, "high_freq_factor": high}
    scaling["original_max_position_embeddings"] = original
    model = family_model("llama", rope_scaling=scaling, rope_theta=500000.0)
    ckpt = GGUFCheckpoint(export.save_gguf(model, tok, tmp_path / "l3.gguf", "f16"))
    hf_config = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_parameters={**scaling, "rope_theta": 5e5})
    hf_inv_freq = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")[0].double()  # (32,)
    default = 500000.0 ** -(torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    stored = next(t.data for t in ckpt._reader.tensors if t.name == "rope_freqs.weight")
    assert np.allclose(stored, (default / hf_inv_freq).numpy(), rtol=1e-5, atol=0)
    ramp = {"low_freq_factor": 1.0, "high_freq_factor": high / low, "original_max_position_embeddings": original / low}
    assert ckpt.config["rope_scaling"] == {**scaling, **ramp}
    back, _ = load_pretrained(ckpt.path)
    ids = torch.randint(0, 264, (1, 200), generator=torch.Generator().manual_seed(2))  # past `original`
    with torch.no_grad():
        assert rel_err(back(ids), model(ids)) < TOL["f16"]


def test_yarn_betas_round_trip_and_unwritable_yarn_is_refused(tmp_path, tok):
    """Non-default yarn beta_fast/beta_slow go into llama.cpp's `.rope.scaling.yarn_beta_*` keys and
    come back (once dropped silently: logits off by 0.6); an attention factor GGUF has no key for is an
    error before anything is written, not a file of another model."""
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    model = family_model("qwen2", rope_scaling={**scaling, "beta_fast": 8.0, "beta_slow": 2.0}, rope_theta=5e5)
    ckpt = GGUFCheckpoint(export.save_gguf(model, tok, tmp_path / "y.gguf", "f16"))
    assert ckpt.get("qwen2.rope.scaling.yarn_beta_fast") == 8.0
    assert ckpt.config["rope_scaling"] == {**scaling, "beta_fast": 8.0, "beta_slow": 2.0}
    back, _ = load_pretrained(ckpt.path)
    ids = torch.randint(0, 264, (1, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(back(ids), model(ids)) < TOL["f16"]
    default = GGUFCheckpoint(export.save_gguf(family_model("qwen2", rope_scaling=scaling), tok, tmp_path / "d.gguf"))
    assert default.get("qwen2.rope.scaling.yarn_beta_fast") is None and default.config["rope_scaling"] == scaling
    odd = family_model("qwen2", rope_scaling={**scaling, "attention_factor": 0.5})
    with pytest.raises(GGUFExportError, match=r"attention_factor=0\.5 cannot be written to GGUF"):
        export.save_gguf(odd, tok, tmp_path / "a.gguf", "f16")
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize(("family", "overrides"), [("phi3", {}), ("qwen3", {"head_dim": 128})])
def test_transformers_reads_phi3_and_qwen3(tmp_path, tok, family, overrides, monkeypatch):
    """Fused phi3 qkv/gate_up and qwen3 q/k norms: transformers' loader gives our logits (qwen3 with
    head_dim 128, transformers' default: its loader ignores `.attention.key_length`)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM

    path = export.save_gguf(family_model(family, **overrides), tok, tmp_path / f"{family}.gguf", "q8_0")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    ours, _ = load_pretrained(path)
    with torch.no_grad():
        err = (hf(IDS).logits - ours(IDS)).abs().max().item()
    assert err < 1e-5, err


# ---- LoRA and the command line ------------------------------------------------------------------------------


def lora_model(seed: int = 0):
    model = family_model("llama")
    add_adapters(
        model,
        ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"],
        r=4,
        alpha=8.0,
        dropout=0.0,
        rslora=False,
        dtype=torch.float32,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    return model.eval()


def test_lora_exports_merged(tmp_path, tok):
    model = lora_model()
    with torch.no_grad():
        adapted, base = model(IDS), family_model("llama")(IDS)
    assert rel_err(adapted, base) > 0.05  # the adapters matter
    back, _ = load_pretrained(export.save_gguf(model, tok, tmp_path / "lora.gguf", "f16"))
    with torch.no_grad():
        assert rel_err(back(IDS), adapted) < TOL["f16"]
    assert "lora_A" not in str(list(GGUFCheckpoint(tmp_path / "lora.gguf").tensor_names()))


def test_cli_exports_full_and_lora_checkpoints(tmp_path, tok):
    base = save_pretrained(family_model("llama"), tok, tmp_path / "base")
    adapter = tmp_path / "step_000002"
    model = lora_model()
    save_peft_adapter(model, adapter, base_model_name_or_path=str(base))
    tok.save(adapter)
    proc = run_module("minigrpo.export", "--checkpoint", str(adapter), "--gguf", "q8_0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "step_000002.q8_0.gguf"  # next to the checkpoint folder
    assert f"wrote {out}" in proc.stdout and "LoRA adapter merged" in proc.stdout
    back, _ = load_pretrained(out)
    with torch.no_grad():
        assert rel_err(back(IDS), model(IDS)) < TOL["q8_0"]

    export.main(["--checkpoint", str(base), "--gguf", "bf16", "--out", str(tmp_path / "b.gguf")])
    assert GGUFCheckpoint(tmp_path / "b.gguf").tensor_types()["model.layers.0.mlp.up_proj.weight"] == "BF16"


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    good = save_pretrained(family_model("llama"), bpe_tokenizer(), tmp_path / "good")
    word_level = tiny_run_checkpoint(tmp_path / "word_level")
    # every check runs before any weights load: loading weights fails this test
    monkeypatch.setattr("minigrpo.models.loading._fill", lambda *a, **k: pytest.fail("weights were loaded"))
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    (lora_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    # adapters on a good base that are no plain LoRA adapter, or lack their weights: found before the base loads
    dora_dir, no_weights = tmp_path / "dora", tmp_path / "no_weights"
    for folder, extra in ((dora_dir, {"use_dora": True}), (no_weights, {})):
        folder.mkdir()
        adapter = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": str(good), **extra}
        (folder / "adapter_config.json").write_text(json.dumps(adapter))
    cases = [
        (["--checkpoint", str(tmp_path / "nope")], "no such file or directory"),
        (["--checkpoint", str(good), "--gguf", "q3_k"], "argument --gguf: invalid choice: 'q3_k'"),
        (["--checkpoint", str(good), "--out", str(tmp_path / "missing" / "m.gguf")], "does not exist"),
        (["--checkpoint", str(good), "--out", str(tmp_path)], "is a folder"),
        (["--checkpoint", str(word_level)], "only byte-level BPE tokenizers"),
        (["--checkpoint", str(lora_dir)], "names no base model"),
        (["--checkpoint", str(dora_dir)], "use_dora=True is not supported"),
        (["--checkpoint", str(no_weights)], "adapter_model.safetensors is missing"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as info:
            export.main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
        assert re.search(re.escape(expected), err), (expected, err)
    assert not list(tmp_path.glob("*.gguf"))

    proc = run_module("minigrpo.export", "--checkpoint", str(word_level), cwd=tmp_path)  # the real entry point
    assert "only byte-level BPE" in one_error_line(proc)


def test_a_yarn_config_without_factor_is_refused_before_any_export(tmp_path, tok):
    """transformers 5.25 refuses a yarn config without `factor` (KeyError: a required key); so does the
    model, in one line, before anything could be exported (an export once failed on it with a KeyError)."""
    from minigrpo.models.args import ModelConfigError

    with pytest.raises(ModelConfigError, match=r"rope scaling type 'yarn' needs \['factor'\]") as info:
        family_model("qwen2", rope_scaling={"rope_type": "yarn", "original_max_position_embeddings": 16})
    assert "\n" not in str(info.value)


def test_dynamic_rope_scaling_is_refused_before_writing(tmp_path, tok):
    """llama.cpp has no dynamic NTK scaling (none, linear, yarn, longrope): written without it, the file
    would run default RoPE past max_position_embeddings. One-line error, no file."""
    model = family_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    out = tmp_path / "d.gguf"
    with pytest.raises(GGUFExportError, match=r"^dynamic \(NTK\) rope scaling cannot be written to GGUF") as info:
        export.save_gguf(model, tok, out, "f16")
    assert "\n" not in str(info.value) and not out.exists()


def test_a_longrope_attention_scale_gguf_cannot_hold_is_refused(tmp_path, tok):
    """llama.cpp (and the reader) take LongRoPE's attention scale from the context lengths alone; a
    config `factor` or `attention_factor` giving another scale was dropped silently (logits off by 0.07-0.24
    relative). The scale the lengths give exports as before."""
    longrope = {"type": "longrope", "long_factor": [2.0] * 32, "short_factor": [1.0] * 32}
    for key, value in (("factor", 2.0), ("attention_factor", 1.5)):
        model = family_model("phi3", original_max_position_embeddings=64, rope_scaling={**longrope, key: value})
        out = tmp_path / f"{key}.gguf"
        with pytest.raises(GGUFExportError, match=rf"^longrope scaling with {key}={value} \(attention scale") as info:
            export.save_gguf(model, tok, out, "f16")
        assert "\n" not in str(info.value) and not out.exists()
    same = family_model("phi3", original_max_position_embeddings=64, rope_scaling={**longrope, "factor": 4.0})
    back, _ = load_pretrained(export.save_gguf(same, tok, tmp_path / "same.gguf", "f16"))
    with torch.no_grad():
        assert rel_err(back(IDS), same(IDS)) < TOL["f16"]
