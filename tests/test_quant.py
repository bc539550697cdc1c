"""NF4 base weights (quant.py): the 4-bit matmul against the dense dequantized weight, loading that
quantizes tensor by tensor, the state dict, and the clear error where no 4-bit path exists.

bitsandbytes (>= 0.46) runs 4-bit on CPU too, so the CPU tests exercise the real kernels; without
bitsandbytes they check the error and skip the rest. GPU-marked tests add the CUDA kernels, the
peak memory of loading, and 8-bit AdamW on adapters over an NF4 base.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from helpers.tiny import tiny_checkpoint, tiny_model
from torch import nn

from minigrpo import quant
from minigrpo.models.loading import load_pretrained
from minigrpo.quant import NF4Linear, QuantizationUnavailableError, nf4_weight_bytes, quantize_model_linears

try:
    quant.require_nf4("cpu")
    CPU_NF4 = True
except QuantizationUnavailableError:
    CPU_NF4 = False
needs_cpu_nf4 = pytest.mark.skipif(not CPU_NF4, reason="this bitsandbytes has no CPU 4-bit path")
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes")  # a GPU machine may lack it


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


@needs_cpu_nf4
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_forward_backward_match_dequantized_reference(dtype):
    w = torch.randn(96, 192) * 0.05
    bias = torch.randn(96) * 0.1
    layer = NF4Linear(w.to(dtype), nn.Parameter(bias.to(dtype), requires_grad=False))
    dense = layer.dequantized_weight()  # (out, in) in the compute dtype
    assert dense.shape == (96, 192) and dense.dtype == dtype and not layer.weight.requires_grad
    assert _rel(dense, w) < 0.1  # NF4's own error on Gaussian weights: 0.092
    x = torch.randn(3, 5, 192, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 5, 96) and y.dtype == dtype
    x_ref = x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(x_ref, dense, layer.bias)
    gy = torch.randn_like(y)
    y.backward(gy)
    ref.backward(gy)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert _rel(y, ref) < tol and _rel(x.grad, x_ref.grad) < tol
    assert layer.weight.grad is None


@needs_cpu_nf4
def test_nf4_storage_and_state_dict_round_trip():
    w = torch.randn(256, 512)
    layer = NF4Linear(w, nn.Parameter(torch.randn(256)))
    assert layer.nbytes() == nf4_weight_bytes(256 * 512)
    assert layer.nbytes() < 256 * 512 * 2 / 3.75  # 3.8x less than bf16
    state = layer.state_dict()
    assert state["weight"].dtype == torch.uint8 and "weight.absmax" in state
    again = NF4Linear(torch.zeros(256, 512), nn.Parameter(torch.zeros(256)))
    again.load_state_dict(state)
    assert torch.equal(again.dequantized_weight(), layer.dequantized_weight())
    dense = NF4Linear(torch.zeros(256, 512), nn.Parameter(torch.zeros(256)))
    dense.load_state_dict({"weight": w, "bias": layer.bias.detach()})  # a dense weight is quantized
    assert torch.equal(dense.dequantized_weight(), layer.dequantized_weight())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        again.load_state_dict({**state, "extra": torch.zeros(1)})


def _nf4_reference(w: torch.Tensor, blocksize: int, scales: torch.Tensor | None = None) -> torch.Tensor:
    """NF4 by its definition: each weight -> the nearest of the 16 levels times its block's absmax
    (over the flattened weight; `scales` replaces the absmax of the dequantization, e.g. 8-bit ones)."""
    from bitsandbytes.functional import get_4bit_type

    levels = get_4bit_type("nf4", device="cpu").float()  # (16,)
    flat = w.float().reshape(-1)
    pad = -flat.numel() % blocksize
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, blocksize)  # (blocks, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    nearest = (blocks / absmax).unsqueeze(-1).sub(levels).abs().argmin(-1)  # (blocks, blocksize)
    scale = absmax if scales is None else scales.float().view(-1, 1)
    return (levels[nearest] * scale).reshape(-1)[: flat.numel()].view(w.shape)


@needs_cpu_nf4
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize(
    ("shape", "blocksize"),
    [((6, 128), 64), ((5, 96), 64), ((8, 160), 64), ((3, 64), 128), ((32, 128), 256), ((7, 33), 64), ((4, 256), 128)],
)
def test_nf4_equals_its_definition_for_any_shape_and_blocksize(shape, blocksize, double_quant):
    """bitsandbytes 0.50's CPU kernel reads the wrong scales where an even in_features is no multiple
    of the blocksize ((5, 96) at 64: max |error| 2.0, relative 0.23 instead of 0.09): the layer must
    still compute with the NF4 weight itself, forward and backward."""
    from bitsandbytes.functional import dequantize_blockwise

    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    bias = torch.randn(shape[0])
    layer = NF4Linear(w, nn.Parameter(bias, requires_grad=False), double_quant=double_quant, blocksize=blocksize)
    qs = layer.quant_state
    scales = dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if double_quant else None
    ref = _nf4_reference(w, blocksize, scales)
    dense = layer.dequantized_weight()
    assert dense.shape == shape and (dense - ref).abs().max() < 1e-6
    assert _rel(dense, w) < 0.12  # NF4's own error on Gaussian weights (~0.09)
    assert layer.nbytes() == nf4_weight_bytes(w.numel(), double_quant=double_quant, blocksize=blocksize)
    for rows in (1, 4):  # one row takes bitsandbytes' matrix-vector path
        x = torch.randn(rows, shape[1], requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        y, want = layer(x), torch.nn.functional.linear(x_ref, ref, bias)
        gy = torch.randn_like(y)
        y.backward(gy)
        want.backward(gy)
        assert _rel(y, want) < 1e-5 and _rel(x.grad, x_ref.grad) < 1e-5
    again = NF4Linear(torch.zeros(shape), nn.Parameter(torch.zeros(shape[0])), blocksize=blocksize)
    again.load_state_dict(layer.state_dict())  # the blocksize travels with the quant state
    assert torch.equal(again.dequantized_weight(), dense)
    with pytest.raises(ValueError, match="blocksize=48 is not supported"):
        NF4Linear(w, blocksize=48)


@needs_cpu_nf4
def test_state_dict_keeps_the_modules_double_quant_setting():
    """A dense weight loaded into a module without double quantization is quantized without it (the
    bytes nf4_weight_bytes promises); packed codes bring their own state, and the flag follows it."""
    w = torch.randn(64, 128)
    single = NF4Linear(w, double_quant=False)
    dense = NF4Linear(torch.zeros(64, 128), double_quant=False)
    dense.load_state_dict({"weight": w})
    assert dense.nbytes() == single.nbytes() == nf4_weight_bytes(w.numel(), double_quant=False)
    assert torch.equal(dense.dequantized_weight(), single.dequantized_weight())
    packed = NF4Linear(torch.zeros(64, 128))  # double quantization by default
    packed.load_state_dict(single.state_dict())
    assert not packed.double_quant and torch.equal(packed.dequantized_weight(), single.dequantized_weight())


@needs_cpu_nf4
@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_load_pretrained_quantizes_block_linears_as_it_reads(tmp_path, family, monkeypatch):
    tiny_checkpoint(tmp_path, seed=3, model_type=family)
    dense, _ = load_pretrained(tmp_path, load_tokenizer=False)
    calls = []
    real = quant.quantize_linear_weight

    def spy(model, module_name, weight, method):
        done = real(model, module_name, weight, method)
        if done:  # every quantized weight arrives alone, and no other layer is dense yet
            calls.append(module_name)
            assert not any(
                isinstance(m, nn.Linear) and m.weight.device.type != "meta" for m in model.model.layers.modules()
            )
        return done

    monkeypatch.setattr(quant, "quantize_linear_weight", spy)
    model, _ = load_pretrained(tmp_path, load_tokenizer=False, quantize="nf4")
    linears = quant.quantized_linears(model)
    n_per_block = {"llama": 7, "qwen2": 7, "phi3": 4}[family]
    assert len(linears) == len(calls) == n_per_block * model.args.n_layers
    assert all(name.startswith("model.layers.") for name in linears)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    for name, layer in linears.items():  # same names; weights are NF4 copies of the checkpoint's
        ref = dense.get_submodule(name)
        assert _rel(layer.dequantized_weight(), ref.weight) < 0.15
        if ref.bias is not None:
            assert torch.equal(layer.bias, ref.bias)
    # the quantized model computes exactly what the dense model computes with dequantized weights
    with torch.no_grad():
        for name, layer in linears.items():
            dense.get_submodule(name).weight.copy_(layer.dequantized_weight())
        ids = torch.randint(3, 128, (2, 9))
        assert (model(ids) - dense(ids)).abs().max() < 1e-4


@needs_cpu_nf4
def test_quantize_model_then_train_an_adapter_through_it():
    model = tiny_model(seed=4)
    assert quantize_model_linears(model) == 14
    model.requires_grad_(False)
    adapter = nn.Parameter(torch.zeros(64))  # a stand-in for LoRA: trains through frozen NF4 layers
    layer0 = model.model.layers[0]
    hook = layer0.register_forward_hook(lambda m, a, out: out + adapter)
    ids = torch.randint(3, 128, (2, 7))
    model(ids).float().logsumexp(-1).mean().backward()
    hook.remove()
    assert adapter.grad is not None and adapter.grad.abs().sum() > 0


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    quant._probe.cache_clear()
    try:
        with pytest.raises(QuantizationUnavailableError, match=r"lora.quantize_base.*bitsandbytes"):
            quant.require_nf4("cpu")
    finally:
        quant._probe.cache_clear()


def test_no_cpu_4bit_path_names_the_setting(monkeypatch, tmp_path):
    monkeypatch.setattr(quant, "_probe", lambda device_type: "no 4-bit kernel registered for cpu")
    with pytest.raises(QuantizationUnavailableError, match=r"lora.quantize_base: nf4 needs CUDA"):
        quant.require_nf4("cpu")
    tiny_checkpoint(tmp_path)
    with pytest.raises(QuantizationUnavailableError, match="needs CUDA"):  # before any tensor is read
        load_pretrained(tmp_path, load_tokenizer=False, quantize="nf4")
    with pytest.raises(ValueError, match="not supported"):
        quant.require_nf4("cpu", "int3")


# ------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu
@needs_bnb
def test_nf4_cuda_forward_backward_vs_bf16_reference():
    w = (torch.randn(1024, 2048, device="cuda") * 0.02).bfloat16()
    layer = NF4Linear(w)
    dense = layer.dequantized_weight()
    for tokens in (1, 16, 4096):  # gemv, small and large matmuls
        x = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = layer(x)
        xr = x.detach().clone().requires_grad_(True)
        ref = xr @ dense.t()
        gy = torch.randn_like(y)
        y.backward(gy)
        ref.backward(gy)
        assert _rel(y, ref) < 1e-2 and _rel(x.grad, xr.grad) < 1e-2, tokens


@pytest.mark.gpu
@needs_bnb
def test_load_quantized_keeps_gpu_peak_well_below_16bit_size(tmp_path):
    big = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, vocab_size=1024)
    tiny_checkpoint(tmp_path, seed=5, **big)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model, _ = load_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda", load_tokenizer=False, quantize="nf4")
    peak = torch.cuda.max_memory_allocated() - base
    dense_bytes = model.args.num_params() * 2
    linears = quant.quantized_linears(model)
    linear_dense = sum(m.in_features * m.out_features for m in linears.values()) * 2
    nf4_bytes = sum(m.nbytes() for m in linears.values())
    largest = 4096 * 1024 * 2  # one MLP matrix in bf16
    print(f"16-bit model {dense_bytes / 2**20:.0f} MiB, peak while loading NF4 {peak / 2**20:.0f} MiB")
    assert peak < 0.45 * dense_bytes
    assert peak < (dense_bytes - linear_dense) + nf4_bytes + 4 * largest  # one dense matrix at a time
    ids = torch.randint(3, 1024, (2, 33), device="cuda")
    assert model(ids).isfinite().all()


@pytest.mark.gpu
@needs_bnb
def test_adamw8bit_steps_adapters_over_nf4_base():
    from minigrpo.config import TrainCfg
    from minigrpo.optim import build_optimizer

    model = tiny_model(seed=6, dtype=torch.bfloat16, hidden_size=256, intermediate_size=1024).cuda()
    quantize_model_linears(model)
    model.requires_grad_(False)
    adapters = nn.ParameterList(nn.Parameter(torch.zeros(256, 64, device="cuda")) for _ in model.model.layers)
    with torch.no_grad():
        for a in adapters:
            a.normal_(0, 0.02)
    hooks = [
        blk.register_forward_hook(lambda m, args, out, a=a: out + (out.float() @ a @ a.t()).to(out.dtype))
        for blk, a in zip(model.model.layers, adapters)
    ]
    opt = build_optimizer(adapters.parameters(), TrainCfg(lr=1e-2, optimizer="adamw8bit"))
    before = [a.detach().clone() for a in adapters]
    ids = torch.randint(3, 128, (4, 64), device="cuda")
    model(ids).float().logsumexp(-1).mean().backward()
    opt.step()
    for h in hooks:
        h.remove()
    assert all((a - b).abs().max() > 0 for a, b in zip(adapters, before))


@pytest.mark.gpu
@needs_bnb
def test_sampler_graphs_equal_eager_on_nf4_model():
    from minigrpo.sampling.kv_sampler import KVCacheSampler
    from minigrpo.sampling.params import SamplingParams

    class Tok:
        pad_token_id = 0
        stop_ids = ()

        def decode(self, ids, skip_special_tokens=False):
            return ""

    model = tiny_model(seed=7, dtype=torch.bfloat16).cuda()
    quantize_model_linears(model)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=24, ignore_stop=True)
    prompts = [[1, 5, 9, 13], [1, 40, 41]]
    graphs = KVCacheSampler(model, Tok(), cuda_graphs=True, kv_bucket=8).generate(prompts, params)
    eager = KVCacheSampler(model, Tok(), cuda_graphs=False, kv_bucket=8).generate(prompts, params)
    assert torch.equal(graphs.completion_ids, eager.completion_ids)


def test_the_nf4_probe_leaves_the_global_rng_alone():
    """The probe runs once per process, after a run has seeded the generators: drawing from the
    global one there gave the first QLoRA run of a process other adapter weights than the next."""
    from minigrpo import quant

    quant._probe.cache_clear()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    quant._probe("cpu")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("entry", ["train", "sft"])
def test_nf4_that_cannot_run_is_refused_before_anything_is_read(monkeypatch, tmp_path, entry):
    """Training and SFT check the 4-bit path among the config checks: before the run folder, the data and
    the model folder (here missing, which would be another error) are looked at."""
    from minigrpo import build, sft
    from minigrpo.config import Config

    monkeypatch.setattr(quant, "_probe", lambda device_type: "no 4-bit kernel registered for cpu")
    cfg = Config.from_dict(
        {
            "run": {"device": "cpu", "output_dir": str(tmp_path / "runs")},
            "model": {"name_or_path": str(tmp_path / "missing")},
            "lora": {"enabled": True, "quantize_base": "nf4"},
        }
    )
    check = build.check_before_loading if entry == "train" else sft.check_before_loading
    with pytest.raises(QuantizationUnavailableError, match=r"lora.quantize_base: nf4 needs CUDA"):
        check(cfg)


def test_quantizing_an_adapted_model_is_refused_before_any_layer_changes():
    """The bases of LoRA layers are no modules of the model: quantizing after apply_lora left them dense
    (here 4 of 14 block linears) while the others went to 4 bits, and said nothing."""
    from minigrpo.config import LoRACfg
    from minigrpo.lora import apply_lora, lora_layers

    model = tiny_model(seed=5)
    apply_lora(model, LoRACfg(r=2, targets=["q", "v"]))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj has one\): quantize the base, then apply"):
        quantize_model_linears(model)
    assert not quant.quantized_linears(model) and len(lora_layers(model)) == 4


def test_bitsandbytes_that_fails_to_import_is_named_in_one_line(monkeypatch):
    """Without bitsandbytes the reason is bitsandbytes, on any device (not "nf4 needs CUDA", which
    would send a CPU user to a GPU that would not help), and a many-line import error stays one line."""
    import builtins

    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("libbitsandbytes_cpu.so: cannot open shared object file\nsee the installation guide")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    monkeypatch.setattr(builtins, "__import__", failing_import)
    for device in ("cpu", "cuda"):
        quant._probe.cache_clear()
        try:
            with pytest.raises(QuantizationUnavailableError) as info:
                quant.require_nf4(device)
        finally:
            quant._probe.cache_clear()
        message = str(info.value)
        assert message == (
            "lora.quantize_base: nf4 needs bitsandbytes (pip install 'minigrpo[qlora]'); it could not be "
            "imported: libbitsandbytes_cpu.so: cannot open shared object file"
        ), device


@needs_cpu_nf4
def test_the_compute_dtype_follows_the_models_dtype_moves():
    """model.to(torch.bfloat16) left every 4-bit layer computing in fp32 (its dtype lives in the quant
    state, no parameter): a dense fp32 weight dequantized on each call, twice the bytes of bf16. It
    follows .to(dtype) / .half() / .float() now, LoRA on top included, and the codes stay as they were."""
    from minigrpo.config import LoRACfg
    from minigrpo.lora import apply_lora

    model = tiny_model(seed=4)
    quantize_model_linears(model)
    apply_lora(model, LoRACfg(r=4, alpha=8, targets=["q", "down"]))
    layers = quant.quantized_linears(model)
    assert len(layers) == 14
    fp32 = {name: layer.dequantized_weight() for name, layer in layers.items()}
    codes = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    ids = torch.randint(3, 128, (2, 7))
    for move, dtype in ((lambda m: m.to(torch.bfloat16), torch.bfloat16), (nn.Module.half, torch.float16)):
        move(model)
        for name, layer in layers.items():
            assert layer.compute_dtype == dtype, name
            w = layer.dequantized_weight()
            assert w.dtype == dtype and torch.equal(w, fp32[name].to(dtype)), name
            assert torch.equal(layer.weight, codes[name]), name
    model.to(torch.bfloat16)
    with torch.no_grad():
        assert model(ids).dtype == torch.bfloat16
    model.float()
    assert all(torch.equal(layer.dequantized_weight(), fp32[name]) for name, layer in layers.items())
    model.to(torch.float64)  # no 4-bit kernel takes fp64: the compute dtype stays
    assert all(layer.compute_dtype == torch.float32 for layer in layers.values())
