"""Every Triton kernel in kernels/ compiles for an H100 (sm_90), ahead of time, on a machine without a GPU.

Why: the CPU tests run the kernels in Triton's interpreter, which accepts code the compiler rejects
(dtype mixes, fp64 math functions, tensor-valued loop bounds, ...), takes branches the GPU never
takes (flash_decode's DOT_F32 is always on there) and never checks that a kernel fits the GPU's
shared memory. Here each kernel goes through the whole pipeline (TTIR -> TTGIR -> LLVM IR -> PTX ->
cubin, with the ptxas that ships with Triton) for GPUTarget("cuda", 90, 32), with the arguments of a
realistic launch: the dtypes its launcher passes (bf16 activations, fp32 workspaces) and the
constexprs the launcher computes for Qwen2.5-1.5B shapes (D=1536, H=12, Hkv=2, Dh=128, V=151936,
F=8960); a second case only where a constexpr branch the first one skips matters. A kernel passes if
a cubin comes out and its static shared memory fits an sm_90 block (else the launch would fail).

How: the arguments go through Triton's own launch-time specialisation (JITFunction's binder: ints
equal to 1 become constants, multiples of 16 and pointers get divisibility hints), then
triton.compile(ASTSource(...), target=...). Triton picks compiled or interpreted library functions
(tl.sum, ...) once, when first imported, and conftest.py imports it with TRITON_INTERPRET=1, under
which compiling fails; so the compiles run in one subprocess (this file run as a script) with
TRITON_INTERPRET=0 and a fresh cache directory, and each test reads its case's result. Skips where
Triton is missing or cannot compile a trivial kernel for CUDA here (no NVIDIA backend, no ptxas).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

try:
    import triton.language as tl
except ImportError:  # the tests skip (importorskip below)
    tl = None

REPO = Path(__file__).resolve().parents[1]
SM90_SHARED_BYTES = 232448  # the most shared memory one block may use on sm_90 (227 KiB)
H100_SMS = 132  # streaming multiprocessors: persistent grids size their programs by it

bf16, f32, f64, i32, i64 = torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64

# ----------------------------------------------------------------------------------------------
# Launch arguments, as each launcher computes them (pointers: the dtype of the tensor passed)
# ----------------------------------------------------------------------------------------------

D, H, HKV, DH, V, F = 1536, 12, 2, 128, 151936, 8960  # Qwen2.5-1.5B
N_TOK = 16384  # tokens of a training micro-batch (B * T)
B_DEC, KV_LEN, S_MAX = 64, 1024, 2048  # a decode step: rows, live cache slots, cache capacity


def _rmsnorm_cases(k):
    M = N_TOK
    bm, bd, nw = k._fwd_config(D)
    fwd = dict(x_ptr=bf16, r_ptr=bf16, w_ptr=bf16, y_ptr=bf16, h_ptr=bf16, rstd_ptr=f32, M=M, D=D,
               stride_x_row=D, stride_r_row=D, stride_y_row=D, stride_h_row=D, eps=1e-6,
               HAS_RESIDUAL=True, BLOCK_M=bm, BLOCK_D=bd)  # fmt: skip
    bm, bd, bw, per_sm = k._bwd_config(D)
    rows_per_program = max(bm, k.next_power_of_2(k.cdiv(M, per_sm * H100_SMS)))
    P = k.cdiv(M, rows_per_program)
    bwd = dict(dy_ptr=bf16, x_ptr=bf16, w_ptr=bf16, rstd_ptr=f32, dh_ptr=bf16, dx_ptr=bf16, dw_part_ptr=f32,
               M=M, D=D, stride_dy_row=D, stride_x_row=D, stride_dh_row=D, stride_dx_row=D,
               HAS_DH=True, ROWS_PER_PROGRAM=rows_per_program, BLOCK_M=bm, BLOCK_D=bd)  # fmt: skip
    block_p = k.next_power_of_2(P)
    dw = dict(part_ptr=f32, dw_ptr=bf16, P=P, D=D, BLOCK_P=block_p, BLOCK_D=max(1, min(64, 16384 // block_p)))
    return {
        ("_rms_norm_fwd_kernel", "residual"): (fwd, nw),
        ("_rms_norm_bwd_kernel", "dh"): (bwd, bw),
        ("_rms_norm_dw_kernel", "main"): (dw, 8),
        # 16-bit full fine-tuning keeps the gains in fp32 (Transformer.norms_in_fp32): bf16 rows, fp32 w
        ("_rms_norm_fwd_kernel", "fp32_gain"): (dict(fwd, w_ptr=f32), nw),
        ("_rms_norm_bwd_kernel", "fp32_gain"): (dict(bwd, w_ptr=f32), bw),
        ("_rms_norm_dw_kernel", "fp32_gain"): (dict(dw, dw_ptr=f32), 8),
    }


def _rope_args(k, B, T, H, HKV, DH, R2, conj):
    """q, k contiguous (separate projections, or gradients); cos, sin (1, T, R2) expanded over B."""
    bt, bhq, bhk, nw = k._config(H, HKV, R2)
    rest = DH - 2 * R2
    q_t, k_t = H * DH, HKV * DH
    args = dict(q_ptr=bf16, k_ptr=bf16, cos_ptr=f32, sin_ptr=f32, qo_ptr=bf16, ko_ptr=bf16,
                BT=B * T, T=T, H=H, HKV=HKV, R2=R2, DH=DH,
                stride_q_b=T * q_t, stride_q_t=q_t, stride_q_h=DH,
                stride_k_b=T * k_t, stride_k_t=k_t, stride_k_h=DH,
                stride_qo_b=T * H * DH, stride_qo_t=H * DH, stride_qo_h=DH,
                stride_ko_b=T * HKV * DH, stride_ko_t=HKV * DH, stride_ko_h=DH,
                stride_cos_b=0, stride_cos_t=R2, stride_sin_b=0, stride_sin_t=R2,
                CONJ=conj, BLOCK_T=bt, BLOCK_HQ=bhq, BLOCK_HK=bhk, BLOCK_R2=k.next_power_of_2(R2),
                BLOCK_REST=k.next_power_of_2(rest) if rest > 0 else 0)  # fmt: skip
    return args, nw


def _rope_cases(k):
    return {
        ("_rotary_kernel", "qwen_fwd"): _rope_args(k, 8, 1024, H, HKV, DH, DH // 2, False),
        # Phi-4-mini: partial rotary (R = 96 of Dh = 128: BLOCK_REST > 0), 24/8 heads; the backward
        ("_rotary_kernel", "partial_bwd"): _rope_args(k, 8, 1024, 24, 8, 128, 48, True),
    }


def _logprobs_cases(k):
    _, cols = k.plan_chunks(N_TOK, V, torch.device("cuda"))  # tiles of 4096 rows x cols
    tile = dict(n_cols=cols, v0=cols, stride_z_row=cols, inv_t=1 / 0.7)  # the second vocab chunk, T = 0.7
    stats = dict(z_ptr=bf16, tgt_ptr=i64, m_ptr=f32, s_ptr=f32, e_ptr=f32, zt_ptr=f32, **tile, HAS_ENTROPY=True,
                 NUM_BLOCKS=k.cdiv(cols, k._STATS_BLOCK_V), BLOCK_V=k._STATS_BLOCK_V)  # fmt: skip
    grad = dict(z_ptr=bf16, tgt_ptr=i64, m_ptr=f32, log_s_ptr=f32, ent_ptr=f32, g_ptr=f32, ge_ptr=f32, **tile,
                HAS_ENT_GRAD=True, BLOCK_V=k._GRAD_BLOCK_V)  # fmt: skip
    # the fused policy head (policy_head.py) runs both over whole rows of the vocabulary, and its
    # loss has no entropy term (HAS_ENT_GRAD off)
    row = dict(n_cols=V, v0=0, stride_z_row=V, inv_t=1 / 0.7)
    return {
        ("_logprobs_stats_kernel", "entropy"): (stats, k._STATS_WARPS),
        ("_logprobs_grad_kernel", "entropy"): (grad, k._GRAD_WARPS),
        ("_logprobs_stats_kernel", "policy_head_row"): (
            dict(stats, **row, NUM_BLOCKS=k.cdiv(V, k._STATS_BLOCK_V)),
            k._STATS_WARPS,
        ),
        ("_logprobs_grad_kernel", "policy_head_row"): (dict(grad, **row, HAS_ENT_GRAD=False), k._GRAD_WARPS),
    }


def _decode_args(k, B, H, HKV, DH, kv_len, window, dtype, prefix_len=0):
    """The split kernel's arguments for one layer of a (L, B, Hkv, S_MAX, Dh) cache, long key mask;
    prefix_len > 0: the first slots come from a shared (P, Hkv, prefix_len, Dh) prefix, P = B / 8."""
    G = H // HKV
    split = k.split_size(B, HKV, kv_len)
    splits = k.cdiv(kv_len, split)
    p_s = prefix_len or S_MAX  # without a prefix the launcher passes the caches themselves
    args = dict(q_ptr=dtype, k_ptr=dtype, v_ptr=dtype, pk_ptr=dtype, pv_ptr=dtype,
                group_ptr=i64, mask_ptr=i64, slot_ptr=i64, window_start_ptr=i32 if window else i64, out_ptr=dtype,
                acc_ptr=f32, m_ptr=f32, l_ptr=f32,
                kv_len=kv_len, prefix_len=prefix_len, scale=DH**-0.5, H=H, first_slot=0,
                SPLIT=split, SPLITS=splits, first_split=0,
                stride_q_b=H * DH, stride_q_h=DH, stride_q_d=1,
                stride_k_b=HKV * S_MAX * DH, stride_k_h=S_MAX * DH, stride_k_s=DH, stride_k_d=1,
                stride_v_b=HKV * S_MAX * DH, stride_v_h=S_MAX * DH, stride_v_s=DH, stride_v_d=1,
                stride_pk_b=HKV * p_s * DH, stride_pk_h=p_s * DH, stride_pk_s=DH, stride_pk_d=1,
                stride_pv_b=HKV * p_s * DH, stride_pv_h=p_s * DH, stride_pv_s=DH, stride_pv_d=1,
                stride_m_b=S_MAX, stride_m_s=1,
                stride_o_b=H * DH, stride_o_h=DH, stride_o_d=1,
                G=G, DH=DH, HAS_PREFIX=prefix_len > 0, HAS_WINDOW=window is not None, DIRECT=splits == 1,
                MERGED=0, DOT_F32=dtype == torch.float32,  # as on a GPU (the CPU interpreter always sets it)
                G_PAD=max(16, k.next_power_of_2(G)), DH_PAD=max(16, k.next_power_of_2(DH)),
                BLOCK_S=k._BLOCK_S, LOOP_STAGES=k._LOOP_STAGES)  # fmt: skip
    return args, 4


def _flash_decode_cases(k):
    split, _ = _decode_args(k, B_DEC, H, HKV, DH, KV_LEN, None, bf16)
    assert not split["DIRECT"] and not split["DOT_F32"], "the Qwen case should split and use bf16 dots"
    odd, _ = _decode_args(k, 256, 28, 4, 96, 1536, 1024, bf16)  # G = 7, Dh = 96 (DH_PAD 128), a window
    assert odd["DIRECT"], "256 rows x 4 kv heads fill the GPU: one split, written directly"
    combine = dict(acc_ptr=f32, m_ptr=f32, l_ptr=f32, out_ptr=bf16, H=H, SPLITS=split["SPLITS"],
                   stride_o_b=H * DH, stride_o_h=DH, stride_o_d=1,
                   DH=DH, SPLITS_PAD=k.next_power_of_2(split["SPLITS"]),
                   DH_PAD=max(16, k.next_power_of_2(DH)))  # fmt: skip
    return {
        ("_decode_split_kernel", "qwen_bf16_split"): (split, 4),
        ("_decode_split_kernel", "g7_dh96_window_direct"): (odd, 4),
        ("_decode_split_kernel", "fp32_ieee_dots"): _decode_args(k, B_DEC, H, HKV, DH, KV_LEN, None, f32),
        # the sampler's layout: 8 rows per prompt share its 256 slots (a prompt length, not a multiple of 16)
        ("_decode_split_kernel", "shared_prefix"): (
            _decode_args(k, B_DEC, H, HKV, DH, KV_LEN, None, bf16, 250)[0],
            k._PREFIX_WARPS,
        ),
        ("_decode_combine_kernel", "qwen"): (combine, 4),
        # a cascade at 512 rows: the own slots in one split, which merges the prefix's 4 records
        ("_decode_split_kernel", "cascade_own_direct_merge"): (
            dict(
                _decode_args(k, 512, H, HKV, DH, 512, None, bf16)[0],
                first_slot=256,
                prefix_len=256,
                SPLITS=4,
                first_split=4,
                MERGED=4,
            ),
            4,
        ),
    }


def _prefix_attention_cases(k):
    """The prefix part of a cascade: 8 rows per prompt (8 x 6 heads padded to 8: a 64-row tile);
    and a window with G = 7 (Qwen2.5-7B: 28 heads over 4 kv heads)."""

    def args(G, HKV, DH, window):
        rows = k.rows_per_program(8, G)
        g_pad = k.next_power_of_2(G)
        Tp = 256
        return dict(q_ptr=bf16, pk_ptr=bf16, pv_ptr=bf16, order_ptr=i64, start_ptr=i64, count_ptr=i64,
                    mask_ptr=i64, slot_ptr=i64, window_start_ptr=i32 if window else i64,
                    acc_ptr=f32, m_ptr=f32, l_ptr=f32,
                    prefix_len=Tp, scale=DH**-0.5, H=G * HKV, SPLIT=64, SPLITS=9, CHUNKS=1,
                    stride_q_b=G * HKV * DH, stride_q_h=DH, stride_q_d=1,
                    stride_pk_b=HKV * Tp * DH, stride_pk_h=Tp * DH, stride_pk_s=DH, stride_pk_d=1,
                    stride_pv_b=HKV * Tp * DH, stride_pv_h=Tp * DH, stride_pv_s=DH, stride_pv_d=1,
                    stride_m_b=S_MAX, stride_m_s=1,
                    G=G, DH=DH, HAS_WINDOW=window is not None, DOT_F32=False, ROWS=rows, G_PAD=g_pad,
                    DH_PAD=max(16, k.next_power_of_2(DH)), BLOCK_S=64,
                    LOOP_STAGES=2), (8 if rows * g_pad >= 64 else 4)  # fmt: skip

    return {
        ("_prefix_split_kernel", "qwen_8_rows"): args(H // HKV, HKV, DH, None),
        ("_prefix_split_kernel", "g7_window"): args(7, 4, 128, 512),
    }


def _sampling_cases(k):
    chunk = min(k._CHUNK["cuda"], max(k.RACE_BLOCK, k.next_power_of_2(V)))
    C = k.cdiv(V, chunk)
    out = {}
    for greedy in (True, False):
        common = dict(logits_ptr=bf16, keys_ptr=i64, pos_ptr=i64, m_ptr=f32, s_ptr=f32, score_ptr=f64, idx_ptr=i32,
                      V=V, C=C, stride_row=V, inv_t=1.0 if greedy else 1 / 0.7, GREEDY=greedy)  # fmt: skip
        name = "greedy" if greedy else "sample"
        chunk_args = dict(common, NB=chunk // k.RACE_BLOCK, BLOCK=k.RACE_BLOCK)
        out[("_race_chunk_kernel", name)] = (chunk_args, 8 if chunk >= 4096 else 4)
        combine = dict(common, tokens_ptr=i64, logp_ptr=f32, BLOCK_C=k.next_power_of_2(C), BLOCK=k.RACE_BLOCK)
        out[("_race_combine_kernel", name)] = (combine, 2)
    return out


def _kv_write_args(k, B, H, HKV, DH, R2, qkv_width):
    rest = DH - 2 * R2
    q_b = qkv_width or H * DH
    k_b = qkv_width or HKV * DH
    args = dict(q_ptr=bf16, k_ptr=bf16, v_ptr=bf16, cos_ptr=f32, sin_ptr=f32, qo_ptr=bf16, kc_ptr=bf16, vc_ptr=bf16,
                slot_ptr=i64, first=256, H=H, HKV=HKV, R2=R2, DH=DH,
                stride_q_b=q_b, stride_q_h=DH, stride_k_b=k_b, stride_k_h=DH, stride_v_b=k_b, stride_v_h=DH,
                stride_qo_b=H * DH, stride_qo_h=DH,
                stride_kc_b=HKV * S_MAX * DH, stride_kc_h=S_MAX * DH, stride_kc_s=DH, stride_kc_d=1,
                stride_vc_b=HKV * S_MAX * DH, stride_vc_h=S_MAX * DH, stride_vc_s=DH, stride_vc_d=1,
                stride_cos_b=R2, stride_sin_b=R2,
                BLOCK_HQ=k.next_power_of_2(H), BLOCK_HK=k.next_power_of_2(HKV), BLOCK_R2=k.next_power_of_2(R2),
                BLOCK_REST=k.next_power_of_2(rest) if rest > 0 else 0, BLOCK_D=k.next_power_of_2(DH))  # fmt: skip
    return args, 4


def _kv_write_cases(k):
    return {
        ("_rotary_into_cache_kernel", "qwen"): _kv_write_args(k, B_DEC, H, HKV, DH, DH // 2, None),
        # Phi-4-mini: fused qkv (row width 40 heads x 128), partial rotary: BLOCK_REST > 0
        ("_rotary_into_cache_kernel", "partial_fused_qkv"): _kv_write_args(k, B_DEC, 24, 8, 128, 48, 40 * 128),
    }


def _swiglu_cases(k):
    bm, bf, nw = k._config(N_TOK, F)
    rows = dict(M=N_TOK, F=F, BLOCK_M=bm, BLOCK_F=bf)
    fwd = dict(g_ptr=bf16, u_ptr=bf16, y_ptr=bf16, stride_g_row=F, stride_u_row=F, stride_y_row=F, **rows)
    bwd = dict(dy_ptr=bf16, g_ptr=bf16, u_ptr=bf16, dg_ptr=bf16, du_ptr=bf16, **rows,
               stride_dy_row=F, stride_g_row=F, stride_u_row=F, stride_dg_row=F, stride_du_row=F)  # fmt: skip
    return {("_swiglu_fwd_kernel", "main"): (fwd, nw), ("_swiglu_bwd_kernel", "main"): (bwd, nw)}


def _token_loss_cases(k):
    ptrs = dict(logp_ptr=f32, adv_ptr=f32, weight_ptr=f32, old_ptr=f32, isw_ptr=f32, ref_ptr=f32, loss_ptr=f32,
                grad_ptr=f32, n=1024, lo=0.8, hi=1.28, delta=1.6, beta=0.04, C=20.0, BLOCK=k._BLOCK)  # fmt: skip
    every = dict(HAS_OLD=True, HAS_DELTA=True, HAS_ISW=True, HAS_REF=True)
    plain = dict(HAS_OLD=False, HAS_DELTA=False, HAS_ISW=False, HAS_REF=False)
    return {
        ("_clipped_token_loss_kernel", "every_term"): (dict(ptrs, **every), 4),
        ("_clipped_token_loss_kernel", "on_policy"): (dict(ptrs, **plain), 4),
    }


CASE_BUILDERS = {
    "rmsnorm": _rmsnorm_cases,
    "rope": _rope_cases,
    "logprobs": _logprobs_cases,
    "flash_decode": _flash_decode_cases,
    "prefix_attention": _prefix_attention_cases,
    "sampling": _sampling_cases,
    "kv_write": _kv_write_cases,
    "swiglu": _swiglu_cases,
    "token_loss": _token_loss_cases,
}


def kernel_module(name: str):
    return importlib.import_module(f"minigrpo.kernels.{name}")


def all_cases() -> dict[str, tuple[str, str, dict, int]]:
    """case id "module.kernel[variant]" -> (module, kernel, launch arguments by name, num_warps)."""
    cases = {}
    for mod, build in CASE_BUILDERS.items():
        for (kernel, variant), (args, num_warps) in build(kernel_module(mod)).items():
            cases[f"{mod}.{kernel}[{variant}]"] = (mod, kernel, args, num_warps)
    return cases


def discover_kernels() -> set[tuple[str, str]]:
    """(module, name) of every @jit kernel (a kernels._triton._Kernel) defined in kernels/."""
    from minigrpo import kernels
    from minigrpo.kernels._triton import _Kernel

    found = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        mod = kernel_module(info.name)
        for obj in vars(mod).values():
            if isinstance(obj, _Kernel) and obj.fn.__module__ == mod.__name__:
                found.add((info.name, obj.__name__))
    return found


# ----------------------------------------------------------------------------------------------
# The worker: this file run as a script, with TRITON_INTERPRET=0 (see the module docstring)
# ----------------------------------------------------------------------------------------------


def _compile(fn, args: dict, num_warps: int):
    """Compile python kernel `fn` for sm_90 as JITFunction.run would for a launch with `args`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, MockTensor, create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    jf = JITFunction(fn)
    backend = make_backend(target)
    binder = create_function_from_signature(jf.signature, jf.params, backend)
    kwargs = {name: MockTensor.wrap_dtype(v) for name, v in args.items()} | {"num_warps": num_warps}
    bound, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = jf._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(jf, signature, constexprs, attrs), target=target, options=options.__dict__)


def _register_use(ptx: str) -> tuple[int, int]:
    """(registers a thread, bytes spilled to local memory) that ptxas -v reports for the PTX."""
    import re
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(src), "-o", str(Path(tmp) / "kernel.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return (int(registers.group(1)) if registers else 0), max(spills, default=0)


def _probe_source(x_ptr, n):  # a trivial kernel: can this environment compile for CUDA at all?
    i = tl.arange(0, 16)
    tl.store(x_ptr + i, i.to(tl.float32), mask=i < n)


def _worker(out_path: str, ids: list[str]) -> None:
    results: dict[str, dict] = {}
    try:
        _compile(_probe_source, {"x_ptr": f32, "n": 7}, 1)
    except Exception as e:  # no NVIDIA backend, no ptxas, an incompatible Triton...
        results["__environment__"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        Path(out_path).write_text(json.dumps(results))
        return
    cases = all_cases()
    for case_id in ids:
        mod, kernel, args, num_warps = cases[case_id]
        t0 = time.perf_counter()
        try:
            compiled = _compile(getattr(kernel_module(mod), kernel).fn, args, num_warps)
            registers, spilled = _register_use(compiled.asm["ptx"])
            results[case_id] = {
                "registers": registers,
                "spilled_bytes": spilled,
                "ok": True,
                "stages": sorted(compiled.asm),
                "cubin_bytes": len(compiled.asm.get("cubin", b"")),
                "shared": compiled.metadata.shared,
                # 16-byte global loads a thread: into registers, or into shared memory (pipelined loops)
                "vector_loads": sum(compiled.asm["ptx"].count(op) for op in ("ld.global.v4.", "cp.async.cg.shared")),
                "num_warps": num_warps,
                "seconds": round(time.perf_counter() - t0, 2),
            }
        except Exception:
            results[case_id] = {"ok": False, "error": traceback.format_exc()[-6000:]}
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2:])
    sys.exit(0)

# ----------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------

pytest.importorskip("triton")
CASE_IDS = sorted(all_cases())


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory) -> dict[str, dict]:
    """Results of the cases this session runs, compiled in one subprocess without the interpreter."""
    ids = sorted(
        {
            item.callspec.params["case"]
            for item in request.session.items
            if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params
        }
    )  # this file's selected cases only
    tmp = tmp_path_factory.mktemp("triton_compile")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp / "cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = tmp / "results.json"
    proc = subprocess.run([sys.executable, __file__, str(out), *ids], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"the compile worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}", pytrace=False)
    results = json.loads(out.read_text())
    if "__environment__" in results:
        pytest.skip(f"Triton cannot compile for CUDA sm_90 here: {results['__environment__']['error']}")
    return results


def test_every_kernel_has_a_compile_case():
    covered = {(mod, kernel) for mod, kernel, _, _ in all_cases().values()}
    missing = discover_kernels() - covered
    assert not missing, f"kernels without a compile case here (add one to CASE_BUILDERS): {sorted(missing)}"
    assert covered <= discover_kernels(), f"cases for kernels that no longer exist: {covered - discover_kernels()}"


@pytest.mark.parametrize("case", CASE_IDS)
def test_kernel_compiles_for_sm90(case, compiled):
    res = compiled[case]
    if not res["ok"]:
        pytest.fail(f"{case} does not compile for sm_90:\n{res['error']}", pytrace=False)
    assert "cubin" in res["stages"] and res["cubin_bytes"] > 0, f"no cubin: stages {res['stages']}"
    assert res["shared"] <= SM90_SHARED_BYTES, f"{res['shared']} bytes of shared memory > {SM90_SHARED_BYTES}"
    # a memory-bound kernel that spills pays local-memory traffic for it: none of ours does
    assert 0 < res["registers"] <= 255 and res["spilled_bytes"] == 0, (res["registers"], res["spilled_bytes"])


PLAIN_DECODE = "flash_decode._decode_split_kernel[qwen_bf16_split]"


@pytest.mark.parametrize("case", ["flash_decode._decode_split_kernel[shared_prefix]"])
def test_shared_prefix_decode_loads_like_the_plain_kernel(case, compiled):
    # reading a slot from the prefix or the row's own cache is one load from selected addresses:
    # the same 16-byte vector loads a program (threads x loads a thread) and shared memory as the
    # plain kernel (two masked loads per tile doubled the loads, and the shared memory once pipelined)
    if PLAIN_DECODE not in compiled:
        pytest.skip(f"{PLAIN_DECODE} is not selected in this session")
    shared, plain = compiled[case], compiled[PLAIN_DECODE]
    assert shared["ok"] and plain["ok"]
    loads = [r["vector_loads"] * r["num_warps"] for r in (shared, plain)]
    assert loads[0] == loads[1] > 0, loads
    # and as many warps resident on an SM (the select costs registers: flash_decode._PREFIX_WARPS)
    resident = [_resident_warps(r) for r in (shared, plain)]
    assert resident[0] >= resident[1], resident
    assert shared["shared"] <= plain["shared"], (shared["shared"], plain["shared"])


def _resident_warps(res: dict) -> int:
    """Warps of one kernel an sm_90 SM holds at once: programs limited by registers (64K a SM),
    shared memory and 64 warps."""
    warps = res["num_warps"]
    programs = min(65536 // (res["registers"] * 32 * warps), SM90_SHARED_BYTES // max(res["shared"], 1), 64 // warps)
    return programs * warps
