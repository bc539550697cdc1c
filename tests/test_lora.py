"""LoRA adapters: exactness at init and when disabled, gradients, merge, and the exports.

PEFT and transformers are test-only oracles: the PEFT-format adapter must load with
`PeftModel.from_pretrained` on the transformers model of the same checkpoint, and the merged
checkpoint must load in transformers and in our own loader, each with the adapted model's logits.
Families: Llama (separate projections), Qwen2 (q/k/v bias, tied head), Phi-3 (fused qkv_proj and
gate_up_proj, one adapter per fused matrix).
"""

from __future__ import annotations

import copy
import json
import os
import weakref

import pytest
import torch
import torch.nn.functional as F
from helpers.tiny import tiny_checkpoint, tiny_model
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from minigrpo.config import LoRACfg, TrainCfg
from minigrpo.errors import UserError
from minigrpo.lora import (
    LoRALinear,
    adapters_disabled,
    adapters_frozen,
    apply_lora,
    load_lora_state_dict,
    load_peft_adapter,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    save_merged,
    save_peft_adapter,
    unmerge_lora,
)
from minigrpo.models.loading import load_pretrained
from minigrpo.models.packed import joined_inference_weights
from minigrpo.models.safetensors_io import iter_tensors, read_header
from minigrpo.optim import MasterWeights, build_optimizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES = {
    "llama": {},
    "qwen2-tied": dict(model_type="qwen2", tie_word_embeddings=True),  # q/k/v bias, tied LM head
    "phi3": dict(model_type="phi3", original_max_position_embeddings=256, pad_token_id=0),  # fused qkv, gate_up
}
ADAPTED_PER_LAYER = {"llama": 7, "qwen2-tied": 7, "phi3": 4}  # q k v o gate up down | qkv o gate_up down
ATOL = 1e-5  # fp32 parity bound; observed differences are ~1e-7


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (3, 11), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """B away from zero, so the adapters change the logits visibly."""
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        layer.lora_B.weight.copy_(0.1 * torch.randn(layer.lora_B.weight.shape, generator=g))


def _adapted_bf16(seed: int, r: int) -> tuple[nn.Module, list[LoRALinear]]:
    """A bf16 tiny model in eval mode with fp32 adapters of rank r that change its outputs, and its layers."""
    model = tiny_model(seed, dtype=torch.bfloat16)
    apply_lora(model, LoRACfg(r=r, alpha=2 * r))
    _randomize_adapters(model)
    return model.eval(), list(lora_layers(model).values())


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------------------------
# the adapted model


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_init_equals_base_and_disabled_adapters_give_the_base(family):
    model = tiny_model(1, **FAMILIES[family])
    ids = _ids()
    base = model(ids)
    names = apply_lora(model, LoRACfg(r=4, alpha=8))
    assert len(names) == 2 * ADAPTED_PER_LAYER[family]
    assert torch.equal(model(ids), base)  # B = 0: bitwise the base model
    _randomize_adapters(model)
    adapted = model(ids)
    assert _max_diff(adapted, base) > 1e-2
    with adapters_disabled(model):
        assert torch.equal(model(ids), base)
    assert torch.equal(model(ids), adapted)  # switched back on at exit


@pytest.mark.parametrize("variant", ["plain", "rslora-dropout"])
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_only_adapters_get_gradients(family, variant):
    extra = dict(rslora=True, dropout=0.3) if variant == "rslora-dropout" else {}
    model = tiny_model(2, **FAMILIES[family])
    names = apply_lora(model, LoRACfg(r=4, alpha=8, **extra))
    layer = lora_layers(model)[names[0]]
    assert layer.scaling == (8 / 2 if extra else 8 / 4)  # alpha / sqrt(r) with rsLoRA, else alpha / r
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}.weight" for n in names for x in "AB"}
    assert len(lora_parameters(model)) == 2 * len(names)

    _randomize_adapters(model)
    model.train()
    model(_ids()).pow(2).mean().backward()
    for n, p in model.named_parameters():
        if ".lora_" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n

    # the optimizer steps the adapters only, and the base stays put
    base_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = build_optimizer(model.parameters(), TrainCfg(lr=1e-2))
    assert sum(len(g["params"]) for g in opt.param_groups) == 2 * len(names)
    opt.step()
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if not p.requires_grad)

    # dropout acts in train mode only; eval equals the same adapters without dropout
    ids = _ids(1)
    with torch.no_grad():
        t1, t2 = model(ids), model(ids)
        assert torch.equal(t1, t2) != bool(extra)
        model.eval()
        e1 = model(ids)
        plain = tiny_model(2, **FAMILIES[family])
        apply_lora(plain, LoRACfg(r=4, alpha=8, rslora=bool(extra)))
        load_lora_state_dict(plain, lora_state_dict(model))
        assert torch.equal(e1, plain(ids))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_merge_then_unmerge(family):
    model = tiny_model(3, **FAMILIES[family])
    apply_lora(model, LoRACfg(r=4, alpha=8))
    _randomize_adapters(model, seed=1)
    ids = _ids()
    adapted = model(ids)
    before = {n: t.clone() for n, t in model.state_dict().items()}

    assert merge_lora(model) == list(lora_layers(model))
    moved = max(_max_diff(t, before[n]) for n, t in model.state_dict().items())
    assert moved > 1e-3  # the deltas are inside the base weights now
    assert _max_diff(model(ids), adapted) < ATOL
    with pytest.raises(RuntimeError, match="already merged"):
        merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge_lora"), adapters_disabled(model):
        pass
    model.train()
    with torch.enable_grad(), pytest.raises(RuntimeError, match="no gradient"):
        model(ids)
    model.eval()

    unmerge_lora(model)
    for n, t in model.state_dict().items():
        assert _max_diff(t, before[n]) <= 1e-6, n
    assert _max_diff(model(ids), adapted) < ATOL


@torch.no_grad()
def test_bf16_base_with_fp32_adapters():
    model = tiny_model(13, dtype=torch.bfloat16)
    apply_lora(model, LoRACfg(r=4, alpha=8))
    _randomize_adapters(model)
    layer = lora_layers(model)["model.layers.0.mlp.up_proj"]
    assert layer.weight.dtype == torch.bfloat16
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    model.train()
    with torch.enable_grad():
        out = model(_ids())
        assert out.dtype == torch.bfloat16
        out.float().pow(2).mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in lora_parameters(model))
    assert not isinstance(build_optimizer(model.parameters(), TrainCfg()), MasterWeights)  # fp32: stepped directly
    w = layer.weight.clone()
    merge_lora(model)
    assert torch.equal(layer.weight, (w.float() + layer.delta_weight()).to(torch.bfloat16))  # one rounding


def test_adapters_compute_in_the_activation_dtype_and_keep_no_copy_of_x():
    """fp32 adapters on a bf16 base: the two small matmuls run in bf16 (as mixed precision does), no
    tensor as large as x is kept besides x itself, the gradients reach the fp32 adapters, and all of it
    stays within bf16 rounding of the same math in fp32."""
    torch.manual_seed(0)
    base = nn.Linear(64, 96, bias=False).to(torch.bfloat16).requires_grad_(False)
    layer = LoRALinear(base, r=4, alpha=8)  # fp32 adapters on a bf16 base
    with torch.no_grad():
        layer.lora_B.weight.normal_(0.0, 0.1)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(2, 5, 96, dtype=torch.bfloat16)

    kept = []

    def pack(t):
        if t.numel() == x.numel() and t.data_ptr() != x.data_ptr():
            kept.append((t.dtype, t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.backward(g)
    assert y.dtype == torch.bfloat16 and not kept, kept
    assert layer.lora_A.weight.grad.dtype == layer.lora_B.weight.grad.dtype == torch.float32

    A = layer.lora_A.weight.detach().clone().requires_grad_(True)
    B = layer.lora_B.weight.detach().clone().requires_grad_(True)
    x32 = x.detach().float().requires_grad_(True)
    y32 = F.linear(x32, base.weight.float()) + F.linear(F.linear(x32, A) * layer.scaling, B)  # all in fp32
    y32.backward(g.float())
    assert (y.float() - y32).abs().max() <= 2e-2 * y32.abs().max()
    for got, want in (
        (x.grad.float(), x32.grad),
        (layer.lora_A.weight.grad, A.grad),
        (layer.lora_B.weight.grad, B.grad),
    ):
        assert (got - want).abs().max() <= 2e-2 * want.abs().max()
    assert layer.lora_A.weight.grad.abs().max() > 0 and layer.lora_B.weight.grad.abs().max() > 0


class CastCounter(TorchDispatchMode):
    """Counts fp32 -> 16-bit copies of adapter-shaped tensors (A (r, in) or B (out, r))."""

    def __init__(self, r: int) -> None:
        super().__init__()
        self.r, self.casts = r, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = args[0] if args else None
        if func is torch.ops.aten._to_copy.default and src.dtype == torch.float32 and out.dtype == torch.bfloat16:
            self.casts += self.r in src.shape and src.dim() == 2
        return out


def test_frozen_adapters_are_cast_once_while_sampling():
    """fp32 adapters on a bf16 base: inside adapters_frozen() a forward without autograd reuses one cast
    of A and B per layer (the first forward makes them), with the same outputs bit for bit; forwards
    under autograd still cast and reach A and B; a later block sees adapters changed in between."""
    model, layers = _adapted_bf16(21, r=4)
    with torch.no_grad():
        plain = model(_ids())
    with adapters_frozen(model):
        counts = []
        for _ in range(3):
            with torch.no_grad(), CastCounter(r=4) as counter:
                out = model(_ids())
            counts.append(counter.casts)
            assert torch.equal(out, plain)
        assert counts == [2 * len(layers), 0, 0], counts
        with adapters_frozen(model):  # nested: the outer block's casts survive the inner one
            pass
        assert all(layer.frozen for layer in layers)
        with torch.enable_grad():
            model(_ids()).float().pow(2).mean().backward()
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in lora_parameters(model))
    assert all(layer.frozen is None for layer in layers)
    _randomize_adapters(model, seed=1)  # the optimizer stepped between two rollouts
    with adapters_frozen(model), torch.no_grad():
        changed = model(_ids())
    with torch.no_grad():
        assert torch.equal(changed, model(_ids())) and not torch.equal(changed, plain)


def test_merged_adapters_run_one_gemm_per_projection_while_sampling():
    """adapters_frozen(merge=True), bf16: each adapted projection runs W + s B A (fp32 sum, one
    rounding) as one GEMM without autograd, as close to the fp32 model as the unmerged bf16 forward;
    autograd and disabled adapters run as outside; nothing is left behind."""
    model, layers = _adapted_bf16(23, r=3)
    with torch.no_grad():
        plain, ref = model(_ids()), copy.deepcopy(model).float()(_ids())  # ref: the same weights in fp32
        with adapters_disabled(model):
            base = model(_ids())
    with adapters_frozen(model, merge=True):
        for layer in layers:
            want = (layer.base.weight.float() + layer.delta_weight()).to(torch.bfloat16)
            assert layer.frozen_weight.dtype == torch.bfloat16 and torch.equal(layer.frozen_weight, want)
        seen = []
        with torch.no_grad(), ShapeRecorder(seen):
            merged = model(_ids())
        assert not any(3 in shape for shape in seen), "an adapter matmul ran"
        e_merged, e_plain = _max_diff(merged, ref), _max_diff(plain, ref)
        assert e_merged <= 2 * e_plain + 1e-3, (e_merged, e_plain)
        with torch.no_grad(), adapters_disabled(model):
            assert torch.equal(model(_ids()), base)
        with torch.enable_grad():
            model(_ids()).float().pow(2).mean().backward()
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in lora_parameters(model))
    assert all(layer.frozen is None and layer.frozen_weight is None for layer in layers)


def test_fp32_bases_sample_unmerged_bit_for_bit():
    """fp32 (the references): no merged copy, the same outputs as the layer's own forward, bit for bit."""
    model = tiny_model(23)
    apply_lora(model, LoRACfg(r=3, alpha=6))
    _randomize_adapters(model)
    with torch.no_grad():
        plain = model(_ids())
        with adapters_frozen(model, merge=True):
            assert all(layer.frozen_weight is None for layer in lora_layers(model).values())
            assert torch.equal(model(_ids()), plain)


@pytest.mark.parametrize("family", ["llama", "qwen2-tied"])
def test_merged_sets_run_as_few_gemms_as_the_packed_base_model(family):
    """bf16, every projection adapted: inside adapters_frozen(merge=True) q/k/v and gate/up copies lie
    back to back (biases too), so a forward runs exactly the matmuls of the packed model without LoRA."""
    base = tiny_model(24, dtype=torch.bfloat16, **FAMILIES[family])
    plain = copy.deepcopy(base)
    plain.pack_projections()
    apply_lora(base, LoRACfg(r=3, alpha=6))
    _randomize_adapters(base)

    def matmuls(model) -> int:
        with torch.no_grad(), ShapeRecorder([]) as recorder:
            model(_ids())
        return recorder.calls

    with adapters_frozen(base, merge=True), torch.no_grad():
        biased = 0
        for group in base.projection_sets():
            assert joined_inference_weights(group) is not None
            assert all((layer.frozen_bias is None) == (layer.base.bias is None) for layer in group)
            biased += group[0].base.bias is not None
        assert biased == (base.args.n_layers if family == "qwen2-tied" else 0)  # Qwen2's q/k/v biases
        assert matmuls(base) == matmuls(plain)
        with torch.enable_grad():  # training forwards are not joined: each layer runs its adapters
            assert joined_inference_weights(base.projection_sets()[0]) is None


def test_only_plain_16bit_linear_bases_are_merged_for_sampling():
    class OwnLinear(nn.Linear):  # stands for a base with its own forward (an NF4 linear, say)
        pass

    layer = LoRALinear(OwnLinear(8, 6, dtype=torch.bfloat16), r=2, alpha=4)
    plain = LoRALinear(nn.Linear(8, 6, dtype=torch.bfloat16), r=2, alpha=4)
    with adapters_frozen(nn.ModuleList([layer, plain]), merge=True):
        assert layer.frozen_weight is None and layer.frozen == {} and plain.frozen_weight is not None


class ShapeRecorder(TorchDispatchMode):
    """Records the shapes of the tensors every matmul-like op reads."""

    def __init__(self, seen: list) -> None:
        super().__init__()
        self.seen, self.calls = seen, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.seen += [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_merge_and_unload_runs_the_matmuls_of_the_plain_model(family, dtype):
    """Evaluating a LoRA checkpoint: fp32 bases are never merged for sampling (3 matmuls per adapted
    projection instead of 1, so a LoRA checkpoint evaluated slower than its merged export); after
    merge_and_unload the model is the plain model again: its matmuls, its state-dict names, and the
    logits of the adapted model (fp32: within ATOL; bf16: bit for bit those sampled with merge=True)."""
    from minigrpo.lora import merge_and_unload

    model = tiny_model(25, dtype=dtype, **FAMILIES[family])
    plain = copy.deepcopy(model)
    plain.pack_projections()  # what a merged export loads as (16-bit sets joined)
    names = apply_lora(model, LoRACfg(r=3, alpha=6))
    _randomize_adapters(model, seed=5)
    adapted = model(_ids())
    with adapters_frozen(model, merge=True):
        sampled = model(_ids())

    def matmuls(net) -> int:
        with ShapeRecorder([]) as recorder:
            net(_ids())
        return recorder.calls

    before = matmuls(model)
    assert merge_and_unload(model) == names
    assert not lora_layers(model) and set(model.state_dict()) == set(plain.state_dict())
    model.pack_projections()
    assert matmuls(model) == matmuls(plain)
    assert dtype == torch.bfloat16 or before == matmuls(plain) + 2 * len(names)  # fp32: A and B each
    out = model(_ids())
    if dtype == torch.float32:
        assert _max_diff(out, adapted) < ATOL, _max_diff(out, adapted)
    else:
        assert torch.equal(out, sampled)


def test_merge_and_unload_keeps_adapters_on_quantized_bases():
    """A base stored quantized cannot take the update: its adapter stays and still runs; the rest unload."""
    from minigrpo.lora import merge_and_unload

    model = tiny_model(26)
    for block in model.model.layers:
        block.mlp.down_proj = Int8Linear(block.mlp.down_proj)
    apply_lora(model, LoRACfg(r=3, alpha=6))
    _randomize_adapters(model, seed=6)
    with torch.no_grad():
        adapted = model(_ids())
    unloaded = merge_and_unload(model)
    assert sorted(lora_layers(model)) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert len(unloaded) == 2 * 6 and not any("down_proj" in n for n in unloaded)
    with torch.no_grad():
        assert _max_diff(model(_ids()), adapted) < ATOL
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_and_unload(tiny_model(26))


@pytest.mark.parametrize("merge", [True, False])
def test_the_kv_sampler_samples_with_frozen_adapters(merge, monkeypatch):
    """Every adapted forward of a rollout runs inside adapters_frozen() (merged by default), and none
    is left frozen after."""
    from minigrpo.sampling.kv_sampler import KVCacheSampler
    from minigrpo.sampling.params import SamplingParams

    class Tok:
        pad_token_id = 0
        stop_ids = ()

        def decode(self, ids, skip_special_tokens=False):
            return " ".join(map(str, ids))

    model = tiny_model(22, dtype=torch.bfloat16)
    apply_lora(model, LoRACfg(r=4, alpha=8))
    _randomize_adapters(model)
    seen = []
    real = LoRALinear.forward
    monkeypatch.setattr(
        LoRALinear,
        "forward",
        lambda self, x: seen.append((self.frozen, self.frozen_weight is not None)) or real(self, x),
    )
    sampler = KVCacheSampler(model, Tok(), merge_lora=merge)
    out = sampler.generate([[1, 5, 9], [1, 7]], SamplingParams(n=2, max_new_tokens=5))
    assert out.num_sequences == 4 and seen
    assert all(frozen is not None and is_merged == merge for frozen, is_merged in seen)
    assert all(layer.frozen is None and layer.frozen_weight is None for layer in lora_layers(model).values())


def test_base_names_are_unchanged():
    model = tiny_model(4)
    plain = {n: t.clone() for n, t in model.state_dict().items()}
    names = apply_lora(model, LoRACfg(r=4))
    state = model.state_dict()
    adapter_keys = {f"{n}.lora_{x}.weight" for n in names for x in "AB"}
    assert set(state) == set(plain) | adapter_keys
    assert all(torch.equal(state[n], t) for n, t in plain.items())
    assert set(lora_state_dict(model)) == adapter_keys
    # a base checkpoint loads by name into the adapted model: only the adapters are missing
    fresh = tiny_model(5)
    apply_lora(fresh, LoRACfg(r=4))
    result = fresh.load_state_dict(plain, strict=False)
    assert set(result.missing_keys) == adapter_keys and not result.unexpected_keys
    assert all(torch.equal(fresh.state_dict()[n], t) for n, t in plain.items())


# ----------------------------------------------------------------------------------------------
# PEFT-format adapters


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_peft_adapter_loads_in_peft_with_equal_logits(family, tmp_path):
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    ckpt = tiny_checkpoint(tmp_path / "base", seed=6, **FAMILIES[family])
    ours, _ = load_pretrained(ckpt)
    ours.eval()
    rslora = family == "phi3"
    apply_lora(ours, LoRACfg(r=4, alpha=8, rslora=rslora, targets=["q", "v", "o", "up", "down"]))
    _randomize_adapters(ours, seed=2)
    out = save_peft_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(ckpt))

    config = json.loads((out / "adapter_config.json").read_text())
    fused = family == "phi3"
    expected = (
        ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
        if fused
        else ["down_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    )
    assert config["target_modules"] == expected
    assert (config["peft_type"], config["task_type"], config["bias"], config["r"], config["lora_alpha"]) == (
        "LORA",
        "CAUSAL_LM",
        "none",
        4,
        8,
    )
    assert config["use_rslora"] is rslora and config["fan_in_fan_out"] is False
    keys = set(read_header(out / "adapter_model.safetensors"))
    q = "qkv_proj" if fused else "q_proj"
    assert f"base_model.model.model.layers.0.self_attn.{q}.lora_A.weight" in keys
    assert len(keys) == 2 * len(lora_layers(ours))

    hf = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager").float().eval()
    with torch.no_grad():
        base_logits = hf(_ids()).logits
        wrapped = peft.PeftModel.from_pretrained(hf, out).eval()
        theirs = wrapped(_ids()).logits
        mine = ours(_ids())
    assert _max_diff(mine, base_logits) > 1e-2  # the adapters matter
    assert _max_diff(mine, theirs) < ATOL, f"{family}: max |diff| {_max_diff(mine, theirs):.2e}"


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_adapter_trained_with_peft_loads_into_ours(family, tmp_path):
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    ckpt = tiny_checkpoint(tmp_path / "base", seed=9, **FAMILIES[family])
    hf = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager").float()
    targets = ["qkv_proj", "down_proj"] if family == "phi3" else ["q_proj", "v_proj", "down_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=targets, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf, config).eval()
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        want = theirs(_ids()).logits
    theirs.save_pretrained(tmp_path / "adapter")

    ours, _ = load_pretrained(ckpt)
    names = load_peft_adapter(ours, tmp_path / "adapter")
    assert {n.rpartition(".")[2] for n in names} == set(targets) and len(names) == 2 * len(targets)
    assert next(iter(lora_layers(ours).values())).scaling == 16 / 2  # rsLoRA: alpha / sqrt(r)
    with torch.no_grad():
        assert _max_diff(ours.eval()(_ids()), want) < ATOL


def test_load_peft_adapter_round_trip(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "base", seed=7)
    src, _ = load_pretrained(ckpt)
    apply_lora(src, LoRACfg(r=4, alpha=16, dropout=0.1, targets=["q", "k", "gate"]))
    _randomize_adapters(src, seed=3)
    src.eval()
    adapter = save_peft_adapter(src, tmp_path / "adapter", base_model_name_or_path="tiny")
    ids = _ids()
    with torch.no_grad():
        want = src(ids)

    fresh, _ = load_pretrained(ckpt)  # no adapters yet: they are added as the file says
    assert load_peft_adapter(fresh, adapter) == list(lora_layers(src))
    layer = next(iter(lora_layers(fresh).values()))
    assert (layer.r, layer.scaling, layer.lora_dropout.p) == (4, 4.0, 0.1)
    assert all(p.requires_grad for p in lora_parameters(fresh))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids), want)

    same, _ = load_pretrained(ckpt)  # adapters already there (a resume): the layout must match
    apply_lora(same, LoRACfg(r=4, alpha=16, targets=["q", "k", "gate"]))
    load_peft_adapter(same, adapter)
    with torch.no_grad():
        assert torch.equal(same.eval()(ids), want)

    other, _ = load_pretrained(ckpt)
    apply_lora(other, LoRACfg(r=8, alpha=16, targets=["q", "k", "gate"]))
    with pytest.raises(ValueError, match="r=4"):
        load_peft_adapter(other, adapter)


# ----------------------------------------------------------------------------------------------
# merged checkpoints


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_merged_loads_in_transformers_and_ours(family, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    ckpt = tiny_checkpoint(tmp_path / "base", seed=8, **FAMILIES[family])
    ours, _ = load_pretrained(ckpt)
    ours.eval()
    apply_lora(ours, LoRACfg(r=4, alpha=8))
    _randomize_adapters(ours, seed=4)
    ids = _ids()
    with torch.no_grad():
        adapted = ours(ids)
    before = {n: t.clone() for n, t in ours.state_dict().items()}
    out = save_merged(ours, None, tmp_path / "merged", dtype=torch.float32)

    assert all(torch.equal(t, before[n]) for n, t in ours.state_dict().items())  # the model is untouched
    assert sorted(read_header(out / "model.safetensors")) == sorted(read_header(ckpt / "model.safetensors"))
    assert json.loads((out / "config.json").read_text()) == json.loads((ckpt / "config.json").read_text())
    again, _ = load_pretrained(out)
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    with torch.no_grad():
        assert _max_diff(again.eval()(ids), adapted) < ATOL
        assert _max_diff(hf(ids).logits, adapted) < ATOL


def test_save_merged_bf16_sharded_is_the_fp32_merge_cast_once(tmp_path):
    model = tiny_model(9)
    apply_lora(model, LoRACfg(r=4, alpha=8))
    _randomize_adapters(model, seed=5)
    out = save_merged(model, None, tmp_path / "merged", max_shard_bytes=20_000)  # bf16 by default
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    written = json.loads((out / "config.json").read_text())
    assert written["torch_dtype"] == written["dtype"] == "bfloat16"  # the names of transformers before / since 4.56
    layers = lora_layers(model)
    plain = {n: t for n, t in model.state_dict().items() if ".lora_" not in n}
    seen = set()
    for fname in files:
        for name, t in iter_tensors(out / fname):
            module = name.removesuffix(".weight")
            want = layers[module].merged_weight() if module in layers else plain[name]
            assert t.dtype == torch.bfloat16 and torch.equal(t, want.to(torch.bfloat16)), name
            seen.add(name)
    assert seen == set(plain)
    reloaded, _ = load_pretrained(out, dtype=torch.bfloat16)
    assert set(reloaded.state_dict()) == set(plain)


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the mode and still alive, after every op.

    Storages are held weakly, so a tensor freed after use stops counting; outputs that alias an
    input (views, in-place ops) are not new memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # storage -> bytes
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if torch.is_tensor(t)}
        for t in pytree.tree_leaves(out):
            if torch.is_tensor(t):
                s = t.untyped_storage()
                if s.nbytes() and s.data_ptr() not in inputs and s not in self.live:
                    self.live[s] = s.nbytes()
        self.peak = max(self.peak, sum(self.live.values()))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_save_merged_holds_one_merged_tensor_at_a_time(dtype, tmp_path):
    model = tiny_model(10)
    apply_lora(model, LoRACfg(r=4, alpha=8))
    _randomize_adapters(model)
    model_bytes = sum(t.nbytes for t in model.state_dict().values())
    largest = max(t.numel() for t in model.state_dict().values()) * 4  # one fp32 tensor
    with LiveTensorBytes() as naive:  # the tracker sees a second copy of the adapted weights
        merged = [layer.merged_weight() for layer in lora_layers(model).values()]
    assert naive.peak >= sum(t.nbytes for t in merged) > model_bytes / 2
    del merged
    with LiveTensorBytes() as tracked:
        save_merged(model, None, tmp_path / "merged", dtype=dtype)
    # fp32: the merged tensor alone; bf16: the fp32 merge plus its bf16 cast
    assert 0 < tracked.peak <= 1.5 * largest < model_bytes / 4, (tracked.peak, largest, model_bytes)


class Int8Linear(nn.Module):
    """A stand-in for a 4-bit linear: int8 rows and fp32 scales, with the interface save_merged uses."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127  # (out, 1)
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)


@pytest.mark.parametrize("family", ["qwen2-tied", "phi3"])
def test_quantized_base_exports_dequantized_and_refuses_merge(family, tmp_path):
    model = tiny_model(11, **FAMILIES[family])
    for block in model.model.layers:  # quantize an adapted matrix (o) and one left without adapters (down)
        block.self_attn.o_proj = Int8Linear(block.self_attn.o_proj)
        block.mlp.down_proj = Int8Linear(block.mlp.down_proj)
    apply_lora(model, LoRACfg(r=4, alpha=8, targets=["q", "k", "v", "o", "gate", "up"]))
    _randomize_adapters(model, seed=6)
    keys = set(model.state_dict())
    assert {"model.layers.0.self_attn.o_proj.qweight", "model.layers.0.self_attn.o_proj.lora_A.weight"} <= keys
    with pytest.raises(TypeError, match="save_merged"):
        merge_lora(model)
    assert not any(layer.merged for layer in lora_layers(model).values())  # nothing half-merged

    ids = _ids()
    with torch.no_grad():
        adapted = model.eval()(ids)
    out = save_merged(model, None, tmp_path / "merged", dtype=torch.float32)
    again, _ = load_pretrained(out)  # plain names: no qweight or scale
    with torch.no_grad():
        assert _max_diff(again.eval()(ids), adapted) < ATOL


def test_lora_on_nf4_bases(tmp_path):
    """minigrpo.quant's NF4Linear under the adapters: its own state-dict entries, no merge, a dequantized export."""
    pytest.importorskip("bitsandbytes")
    from minigrpo.quant import QuantizationUnavailableError, quantize_model_linears

    model = tiny_model(14)
    try:
        quantize_model_linears(model)
    except QuantizationUnavailableError as e:
        pytest.skip(str(e))
    ids = _ids()
    with torch.no_grad():
        base = model(ids)
    apply_lora(model, LoRACfg(r=4, alpha=8))
    _randomize_adapters(model, seed=7)
    keys = set(model.state_dict())
    assert {"model.layers.0.mlp.up_proj.weight.absmax", "model.layers.0.mlp.up_proj.lora_B.weight"} <= keys
    model.train()
    model(ids).pow(2).mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(lora_state_dict(model))
    model.eval()
    with torch.no_grad():
        adapted = model(ids)
        with adapters_disabled(model):
            assert torch.equal(model(ids), base)
    with pytest.raises(TypeError, match="save_merged"):
        merge_lora(model)

    # the whole state (4-bit codes, quant state, adapters) reloads through the base's own loader
    again = tiny_model(15)
    quantize_model_linears(again)
    apply_lora(again, LoRACfg(r=4, alpha=8))
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval()(ids), adapted)

    out = save_merged(model, None, tmp_path / "merged", dtype=torch.float32)
    dense, _ = load_pretrained(out)
    with torch.no_grad():
        assert _max_diff(dense.eval()(ids), adapted) < ATOL


# ----------------------------------------------------------------------------------------------
# misuse


def test_bad_inputs_fail_clearly(tmp_path):
    model = tiny_model(12)
    with pytest.raises(UserError, match=r"unknown LoRA target 'qkv': valid targets are q, k, v, o, gate, up, down"):
        apply_lora(model, LoRACfg(targets=["q", "qkv"]))
    assert not lora_layers(model)
    with pytest.raises(ValueError, match="no LoRA adapters"), adapters_disabled(model):
        pass
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(model)
    apply_lora(model, LoRACfg(r=2))
    with pytest.raises(ValueError, match="already applied"):
        apply_lora(model, LoRACfg(r=2))
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge_lora(model)
    state = lora_state_dict(model)
    with pytest.raises(KeyError, match="missing"):
        load_lora_state_dict(model, {k: v for k, v in state.items() if "layers.1" not in k})

    adapter = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=None)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        load_peft_adapter(tiny_model(12), adapter)


def _adapter_of_a_wider_model(model: nn.Module, tmp_path) -> None:
    wider = tiny_model(12, hidden_size=128)
    apply_lora(wider, LoRACfg(r=4))
    load_peft_adapter(model, save_peft_adapter(wider, tmp_path / "wider", base_model_name_or_path=None))


@pytest.mark.parametrize(
    ("misuse", "message"),
    [
        (lambda model, tmp_path: apply_lora(model, LoRACfg(r=0)), r"LoRA rank r=0 must be an integer >= 1"),
        (lambda model, tmp_path: apply_lora(model, LoRACfg(dropout=1.0)), r"dropout=1.0 must be in \[0, 1\)"),
        (lambda model, tmp_path: apply_lora(model, LoRACfg(targets=[])), "no LoRA targets: name at least one of q"),
        (
            lambda model, tmp_path: save_peft_adapter(model, tmp_path / "a", base_model_name_or_path=None),
            "nothing to save in .*/a: the model has no LoRA adapters",
        ),
        (_adapter_of_a_wider_model, r"q_proj.lora_A.weight has shape \[4, 128\], this model needs \[4, 64\]"),
    ],
    ids=["rank-0", "dropout-1", "no-targets", "save-without-adapters", "adapter-of-another-base"],
)
def test_misuse_is_one_user_error_line_and_leaves_the_model_as_it_was(misuse, message, tmp_path):
    model = tiny_model(12)
    with pytest.raises(UserError, match=message) as info:
        misuse(model, tmp_path)
    assert "\n" not in str(info.value)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())
