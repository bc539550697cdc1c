"""Our GGUF export read by llama.cpp itself: tokens, logits and a greedy chat answer, per quant type.

    PYTHONPATH=<llama-cpp-python> python benchmarks/check_gguf_llamacpp.py [--model smollm2]
        [--random-arch llama|qwen2|qwen3] [--quants f16,q8_0,q4_k_m,q4_0] [--out-dir DIR]

Needs `llama_cpp` (llama-cpp-python, which builds llama.cpp from source: `pip install --target DIR
llama-cpp-python diskcache`); it is not a dependency of minigrpo, and this check is not part of the
tests. For each quant type the model is exported with `save_gguf` and opened by llama.cpp, then:
  tokens    llama.cpp's tokenization of a chat prompt rendered with our tokenizer's template equals
            ours (the tokenizer metadata round trip, as llama.cpp reads it)
  logits    llama.cpp's logits over that prompt vs our model's (fp32, the source weights): relative
            error ||a - b|| / ||b|| and the share of positions whose top-1 token agrees
  answer    llama.cpp's own greedy chat completion (its chat template taken from the file's
            `tokenizer.chat_template`) of a short question, and our greedy answer for comparison
--random-arch keeps the model's tokenizer but replaces the weights by a random model of that family
whose matrices are multiples of 256 wide (hidden 512, MLP 1536, 4 layers), so that q4_k_m really
writes Q4_K and Q6_K blocks (SmolLM2's 576-wide rows fall back to Q5_0 / Q8_0, as in llama.cpp).
Writes results/gguf_llamacpp[_<arch>]_<device>.json and prints a table.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import environment, print_table, write_result

from minigrpo.errors import ArgumentParser, UserError, run_cli
from minigrpo.export import save_gguf
from minigrpo.models.loading import build_random, load_pretrained
from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.sampling.params import SamplingParams

QUESTION = "What is 2 + 3? Answer with the number."


def our_answer(model, tokenizer, prompt_ids: list[int], max_tokens: int) -> str:
    params = SamplingParams(temperature=0.0, max_new_tokens=max_tokens, stop_ids=tuple(tokenizer.stop_ids))
    return KVCacheSampler(model, tokenizer).generate([prompt_ids], params).completion_texts[0]


def check(path: Path, model, tokenizer, prompt_ids: list[int], max_tokens: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, seed=0)
    text = tokenizer.decode(prompt_ids)
    theirs_ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    llm.reset()
    llm.eval(prompt_ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(prompt_ids)], dtype=np.float32))  # (T, V)
    with torch.no_grad():
        ours = model(torch.tensor([prompt_ids]))[0].float()  # (T, V)
    err = float((theirs - ours).norm() / ours.norm())
    top1 = float((theirs.argmax(-1) == ours.argmax(-1)).float().mean())
    reply = llm.create_chat_completion(
        messages=[{"role": "user", "content": QUESTION}], max_tokens=max_tokens, temperature=0.0
    )
    return {
        "tokens_equal": theirs_ids == prompt_ids,
        "logits_rel_err": err,
        "top1_agree": top1,
        "llama_cpp_answer": reply["choices"][0]["message"]["content"],
    }


def main() -> None:
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="a packaged model, folder, hub id or .gguf file")
    ap.add_argument("--random-arch", choices=["llama", "qwen2", "qwen3"], default=None)
    ap.add_argument("--quants", default="f16,q8_0,q4_k_m,q4_0")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        raise UserError(  # noqa: B904 (one line for the user, no chained traceback)
            "llama_cpp is not importable: pip install --target DIR llama-cpp-python diskcache, then PYTHONPATH=DIR"
        )
    model, tokenizer = load_pretrained(args.model, dtype=torch.float32, require_tokenizer=True)
    if args.random_arch:
        config = {
            **{k: v for k, v in model.args.hf_config.items() if k not in ("architectures", "head_dim")},
            "model_type": args.random_arch,
            "hidden_size": 512,
            "intermediate_size": 1536,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
        }
        model = build_random(config, dtype=torch.float32, seed=0)
    model.eval()
    messages = [{"role": "user", "content": QUESTION}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ours = our_answer(model, tokenizer, prompt_ids, args.max_tokens)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quants.split(","):
            t0 = time.perf_counter()
            path = save_gguf(model, tokenizer, Path(tmp) / f"model.{quant}.gguf", quant=quant)
            seconds = time.perf_counter() - t0
            row = {"quant": quant, "export_s": seconds, "mib": path.stat().st_size / 2**20}
            row.update(check(path, model, tokenizer, prompt_ids, args.max_tokens))
            rows.append(row)
            path.unlink()
    env = environment()
    env["llama_cpp_python"] = llama_cpp.__version__
    out = write_result(
        "gguf_llamacpp" + (f"_{args.random_arch}" if args.random_arch else ""),
        {"environment": env, "model": args.model, "question": QUESTION, "our_answer": ours, "rows": rows},
        args.out_dir,
    )
    print_table(rows, ["quant", "mib", "export_s", "tokens_equal", "logits_rel_err", "top1_agree", "llama_cpp_answer"])
    print(f"\nour answer (fp32 source, greedy): {ours!r}\nllama-cpp-python {llama_cpp.__version__} -> {out}")


if __name__ == "__main__":
    run_cli(lambda _: main())
