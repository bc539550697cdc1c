"""Export a model to GGUF for llama.cpp / Ollama, without llama.cpp: `save_gguf` and its command line.

    save_gguf(model, tokenizer, "out/model.q8_0.gguf")                   # q8_0 (the default)
    save_gguf(model, tokenizer, "out/model.q4_k_m.gguf", quant="q4_k_m")

    python -m minigrpo.export --checkpoint runs/demo/checkpoints/step_000050 --gguf q4_k_m
    python -m minigrpo.export --checkpoint DIR --gguf f16 --out model.f16.gguf

Export types: q8_0, f16, bf16, q4_0, q5_0 (quantized by the `gguf` package) and q4_k_m (Q4_K with
Q6_K where llama.cpp's q4_k_m keeps more bits, quantized by minigrpo/models/kquants.py). What goes
into the file (names, q/k order, metadata, vocabulary, storage type per tensor) is described in
minigrpo/models/gguf_write.py; the reader (minigrpo/models/gguf.py) loads the result back.

A LoRA model exports merged: every adapted weight is W + scaling * B @ A computed in fp32 from the
dense (dequantized if NF4) base weight, then quantized once; nothing is ever merged into quantized
weights. A LoRA checkpoint folder (adapter_config.json) is applied to the base model its adapter
config names. Tensors are computed, quantized and written one at a time (memory: the model plus one
tensor), into a temporary file renamed into place when complete.

A run folder (run_dir, or run_dir/checkpoints) given as --checkpoint stands for its newest intact
checkpoint, else its final model (merged/, model/), picked again when a run still training deletes it
meanwhile (checkpoint.keep_last); the folder exported is printed. Ctrl-C is one `interrupted` line
(exit status 130) and leaves no partial file.

The command line checks every argument before any weight loads: a folder that is no checkpoint, an
unknown export type, an output that cannot be written, a model or tokenizer GGUF cannot describe are
each one `error:` line and exit status 2.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigrpo.atomic import atomic_path, missing_folder_error, write_probe_error
from minigrpo.errors import ArgumentParser, UserError, path_arg, read_vanishing, run_cli
from minigrpo.models.gguf_write import (
    QUANT_TYPES,
    GGUFExportError,
    add_model_metadata,
    add_vocab_metadata,
    check_exportable,
    encode_tensor,
    gguf_tensor_name,
    permute_qk,
    qk_heads,
    rope_tensors,
    tensor_type,
    tokenizer_vocab,
)

QUANT_CHOICES = tuple(QUANT_TYPES)


def _check_quant(quant: str) -> None:
    if quant not in QUANT_TYPES:
        raise GGUFExportError(f"unknown GGUF export type {quant!r}; choose one of {', '.join(QUANT_CHOICES)}")


@torch.no_grad()
def save_gguf(
    model: torch.nn.Module, tokenizer: Any, path: str | os.PathLike, quant: str = "q8_0", *, name: str | None = None
) -> Path:
    """Write `model` (LoRA adapters merged) and `tokenizer` as one GGUF file of export type `quant`.

    `name` is general.name (default: the file name without its suffixes). Returns the path written.
    A model or tokenizer the format cannot describe, or a `path` no file can be written at (a folder, a
    missing or unwritable folder), raises GGUFExportError (a UserError) before anything is quantized
    or written; an existing file is replaced whole, once the new one is complete.
    """
    import gguf

    from minigrpo.lora_export import plain_tensors

    _check_quant(quant)
    args = model.args
    arch = check_exportable(args)
    vocab = tokenizer_vocab(tokenizer, args.vocab_size)
    path = Path(path)
    problem = output_problem(path)  # before any tensor is quantized, not an OSError naming a temporary file
    if problem is not None:
        raise GGUFExportError(f"cannot write the GGUF file: {problem}")
    has_output = not args.tie_word_embeddings
    # (GGUF name, shape, make the fp32 tensor): rope scaling tensors first, then the model's own
    entries: list[tuple[str, tuple[int, ...], Any]] = [
        (k, tuple(v.shape), lambda v=v: v) for k, v in rope_tensors(args).items()
    ]
    for hf_name, shape, make in plain_tensors(model):
        if hf_name == "lm_head.weight" and not has_output:
            continue
        entries.append((gguf_tensor_name(hf_name, arch), shape, make))
    types = {
        name: tensor_type(name, shape, quant, n_layers=args.n_layers, has_output=has_output)
        for name, shape, _ in entries
    }

    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_type("model")
        writer.add_name(name or model_name(path))
        add_model_metadata(writer, args, arch)
        writer.add_file_type(int(QUANT_TYPES[quant][0]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_vocab_metadata(writer, vocab)
        for name_, shape, _ in entries:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, types[name_])
            writer.add_tensor_info(name_, shape, np.dtype(np.float32), math.prod(byte_shape), raw_dtype=types[name_])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name_, _, make in entries:
            w = make()
            w = (w.detach().to("cpu", torch.float32).numpy() if isinstance(w, torch.Tensor) else w).astype(np.float32)
            heads = qk_heads(name_, arch, args)
            if heads is not None:
                w = permute_qk(w, heads)
            writer.write_tensor_data(encode_tensor(w, types[name_], name_))
            del w
        writer.close()
    return path


# ----------------------------------------------------------------------------------------------
# the command line


def parse_args(argv: Sequence[str] | None):
    parser = ArgumentParser(prog="minigrpo.export", description="Export a checkpoint to GGUF (llama.cpp, Ollama)")
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint folder (full or LoRA), run folder (its newest intact checkpoint), .gguf file or hub id",
    )
    parser.add_argument(
        "--gguf", default="q8_0", type=str.lower, choices=QUANT_CHOICES, help="export type, any case (default: q8_0)"
    )
    parser.add_argument("--out", default=None, help="output file (default: <checkpoint>.<type>.gguf next to it)")
    args = parser.parse_args(argv)
    args.checkpoint, args.out = path_arg(args.checkpoint, "--checkpoint"), path_arg(args.out, "--out")
    return args


def model_name(path: Path) -> str:
    """general.name from the file name: `Qwen2.5-0.5B-grpo.q4_k_m.gguf` -> `Qwen2.5-0.5B-grpo` (the
    `.gguf` suffix and an export type's go; the dots of a model's own name stay)."""
    stem = without_gguf_suffix(path.name)
    for quant in QUANT_CHOICES:
        if stem.lower().endswith(f".{quant}"):  # `.Q4_K_M` as llama.cpp's own files name it
            stem = stem[: -len(quant) - 1]
    return stem or path.name


def without_gguf_suffix(name: str) -> str:
    """`name` without its `.gguf` suffix, in any case (`model.Q8_0.GGUF` -> `model.Q8_0`), as the model
    loader recognises a GGUF file (minigrpo/models/loading.py)."""
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def default_output(checkpoint: str, quant: str) -> Path:
    """`runs/x/checkpoints/step_000050` -> `runs/x/checkpoints/step_000050.q8_0.gguf` (a file next to
    the folder, so that pruning old checkpoints never deletes an export); a file, such as a .gguf, gives
    one next to it (`m.Q8_0.gguf` -> `m.Q8_0.f16.gguf`); a hub id or a packaged model's name: in the cwd."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():  # a step saved twice and killed between its renames is found as .tmp-[old-]step_N
        resolved = path.resolve()
        name = re.sub(r"^\.tmp-(old-)?(?=step_\d+$)", "", resolved.name)  # named as it will be again
        return resolved.with_name(f"{name}.{quant}.gguf")
    stem = without_gguf_suffix(path.name) or "model"
    return path.resolve().with_name(f"{stem}.{quant}.gguf") if path.is_file() else Path(f"{stem}.{quant}.gguf")


def check_not_input(out: Path, checkpoint: str) -> None:
    """--out naming the file the export reads would replace it while it is read: a UserError."""
    source = Path(checkpoint).expanduser()
    if source.is_file() and out.exists() and out.samefile(source):
        raise UserError(f"--out {out} is the --checkpoint file itself; name another file")


def output_problem(out: Path) -> str | None:
    """Why no GGUF file can be written at `out` (a folder, a missing or unwritable folder), naming it;
    None when a file can be created there (an existing file is replaced whole)."""
    if out.is_dir():
        return f"{out} is a folder; name a file, e.g. {out / 'model.gguf'}"
    folder = out.resolve().parent
    if not folder.is_dir():
        return f"{out}: {missing_folder_error(folder)}"
    problem = write_probe_error(folder)
    return None if problem is None else f"{out}: cannot write in {folder} ({problem})"


def check_output(out: str | Path) -> None:
    """A UserError unless `out` names a file that can be created in an existing, writable folder; an
    `--out exports/` (a trailing separator: meant as a folder) is one too, not a file named `exports`."""
    text = str(out)
    if text.endswith(("/", os.sep)) and not Path(text).is_dir():
        raise UserError(f"--out {text} names a folder; name a file, e.g. {Path(text) / 'model.gguf'}")
    problem = output_problem(Path(out))
    if problem is not None:
        raise UserError(f"--out {problem}")


def _adapter_base(checkpoint: Path) -> tuple[str, str | None]:
    """(base model, revision) a LoRA checkpoint's adapter_config.json names (a packaged model its weights
    file records: minigrpo.lora_export.adapter_base)."""
    config_file = checkpoint / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config_file}: not a readable adapter config ({e})") from e
    from minigrpo.lora_export import adapter_base

    base, revision = adapter_base(checkpoint, config) if isinstance(config, dict) else (None, None)
    if not isinstance(base, str) or not base:
        raise UserError(f"{config_file} names no base model (base_model_name_or_path): cannot merge the adapter")
    return base, revision


def _check_source(source: str, tokenizer_dir: Path | None, revision: str | None) -> None:
    """Check (reading no weights) that the model at `source` and its tokenizer can be exported."""
    from minigrpo.models.args import ModelArgs
    from minigrpo.models.gguf import GGUFCheckpoint
    from minigrpo.models.loading import PACKAGED_MODELS, _resolve, check_model_source
    from minigrpo.models.tokenizer_files import load_tokenizer_folder

    check_model_source(source, revision=revision, require_tokenizer=tokenizer_dir is None)
    path = Path(source).expanduser()
    gguf_file = source in PACKAGED_MODELS or path.suffix.lower() == ".gguf"
    if gguf_file:
        ckpt = GGUFCheckpoint(_resolve(source, revision))
        config = ckpt.config
    elif path.is_dir():
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    else:  # a hub id: checked by save_gguf once fetched
        return
    args = ModelArgs.from_hf_config(config)
    check_exportable(args)
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer_folder(tokenizer_dir)
    else:
        tokenizer = ckpt.tokenizer() if gguf_file else load_tokenizer_folder(path)
    tokenizer_vocab(tokenizer, args.vocab_size)


def _pick(given: Path) -> Path | None:
    """A run folder's newest intact checkpoint (else its final model), printed; None for any other folder."""
    from minigrpo.run_folder import run_folder_pick

    picked = run_folder_pick(given, "export")
    if picked is not None:
        print(f"{given} is a run folder: exporting {picked}")
    return picked


def _load_for_export(args, ckpt: Path, given: Path) -> tuple[torch.nn.Module, Any, Path, bool]:
    """Check every argument against the folder `ckpt` (`given`, or a run folder's pick), then load its
    model (a LoRA adapter applied): (model, tokenizer, output file, whether an adapter was merged)."""
    from minigrpo import lora
    from minigrpo.models.loading import load_pretrained
    from minigrpo.models.tokenizer_files import load_tokenizer_folder

    if ckpt != given:
        args.checkpoint = str(ckpt)
    out = Path(args.out) if args.out else default_output(args.checkpoint, args.gguf)
    check_output(args.out or out)
    check_not_input(out, args.checkpoint)
    adapter = (ckpt / "adapter_config.json").is_file()
    own_tokenizer = ckpt if adapter and (ckpt / "tokenizer.json").is_file() else None
    source, revision = _adapter_base(ckpt) if adapter else (args.checkpoint, None)
    if adapter:  # its config and weights file, before the base's weights load
        from minigrpo.lora_export import check_peft_adapter

        check_peft_adapter(ckpt)
    _check_source(source, own_tokenizer, revision)
    if adapter:  # its layers and shapes against the base's config.json
        from minigrpo.lora_export import check_adapter_fits

        check_adapter_fits(ckpt, source)

    config_file = Path(source).expanduser() / "config.json"
    dtype = torch.float32
    if config_file.is_file():  # keep the stored precision (a bf16 checkpoint loads as bf16)
        config = json.loads(config_file.read_text(encoding="utf-8"))
        stored = config.get("dtype") or config.get("torch_dtype")  # transformers >= 4.56 writes "dtype"
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(stored, torch.float32)
    model, tokenizer = load_pretrained(source, dtype=dtype, revision=revision, require_tokenizer=own_tokenizer is None)
    if adapter:
        lora.load_peft_adapter(model, ckpt)  # merged in fp32 by save_gguf, tensor by tensor
        if own_tokenizer is not None:
            tokenizer = load_tokenizer_folder(own_tokenizer)
    return model, tokenizer, out, adapter


def main(argv: Sequence[str] | None = None) -> Path:
    """The command line: a bad argument, checkpoint, model or output path is one `error:` line."""
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> Path:
    args = parse_args(argv)
    given = Path(args.checkpoint).expanduser()
    model, tokenizer, out, adapter = read_vanishing(given, _pick, lambda ckpt: _load_for_export(args, ckpt, given))
    save_gguf(model.eval(), tokenizer, out, args.gguf)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({args.gguf}, {size:.1f} MiB){' with the LoRA adapter merged' if adapter else ''}")
    return out


if __name__ == "__main__":
    main()
