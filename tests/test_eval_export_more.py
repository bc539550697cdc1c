"""Evaluation and export on the inputs users give them beyond the usual ones: GGUF files whose suffix is
upper case (`model.Q8_0.GGUF`, as many uploads name them), read as the model loader reads them; an adapter
on a GGUF base checked before the base loads; paths written `--checkpoint=~/...`."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from gguf import GGUFReader
from helpers.tiny import write_copy_task
from test_export_more import fake_run
from test_gguf_export import IDS, TOL, bpe_tokenizer, family_model, rel_err

from minigrpo import eval as evaluation
from minigrpo import export
from minigrpo.config import LoRACfg
from minigrpo.lora import apply_lora, save_peft_adapter
from minigrpo.models.loading import load_pretrained

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_an_upper_case_gguf_suffix_is_a_gguf_file(tmp_path, monkeypatch, capsys):
    """`--checkpoint model.Q8_0.GGUF` was taken for a hub id by the export's checks (nothing checked before
    the weights loaded), written to `model.Q8_0.GGUF.f16.gguf` with general.name "model.Q8_0.GGUF"; eval
    read no header before loading and found no run config beside `step_N.q8_0.GGUF`."""
    monkeypatch.chdir(tmp_path)
    model = family_model("llama", seed=3)
    source = export.save_gguf(model, bpe_tokenizer(), tmp_path / "model.q8_0.gguf", "q8_0")
    upper = source.rename(tmp_path / "model.Q8_0.GGUF")
    assert export.model_name(upper) == "model" and export.model_name(tmp_path / "Qwen2.5.Q4_K_M.Gguf") == "Qwen2.5"

    out = export.main(["--checkpoint", str(upper), "--gguf", "F16"])  # the type as llama.cpp's files name it
    assert out.name == "model.Q8_0.f16.gguf" and out.resolve().parent == tmp_path.resolve()
    assert GGUFReader(str(out)).get_field("general.name").contents() == "model.Q8_0"
    back, _ = load_pretrained(out)
    quantized, _ = load_pretrained(upper)
    with torch.no_grad():
        assert rel_err(back(IDS), quantized(IDS)) < TOL["f16"]

    args, tokenizer = evaluation.model_before_load(str(upper), None)  # the header, before any weight loads
    assert args is not None and args.n_layers == model.args.n_layers and tokenizer is not None

    step = tmp_path / "run" / "checkpoints" / "step_000002"
    step.mkdir(parents=True)
    (step / "run_config.yaml").write_text("{}\n")
    exported = step.with_name("step_000002.q8_0.GGUF")
    exported.write_bytes(upper.read_bytes())
    assert evaluation.run_config_of(exported, None) == str(step / "run_config.yaml")


def adapter_for(model, folder, base: str):
    """A rank-2 PEFT adapter on q and v of `model`, saved in `folder` naming `base` as its base model."""
    apply_lora(model, LoRACfg(r=2, alpha=4, targets=["q", "v"]))
    return save_peft_adapter(model, folder, base_model_name_or_path=base)


def test_an_adapter_for_another_base_than_its_gguf_base_is_refused_before_the_base_loads(tmp_path, monkeypatch, capsys):
    """A GGUF base (a file, the packaged smollm2) was not checked against the adapter until its weights had
    loaded (a 2 GB dequantization before the one line); its header gives the shapes, as a folder's
    config.json does."""
    gguf_base = export.save_gguf(family_model("llama"), bpe_tokenizer(), tmp_path / "base.F16.GGUF", "f16")
    other = adapter_for(family_model("llama", hidden_size=128, intermediate_size=256), tmp_path / "a", str(gguf_base))
    write_copy_task(tmp_path / "rows.jsonl", n=4)
    monkeypatch.setattr("minigrpo.models.loading._fill", lambda *a, **k: pytest.fail("weights were loaded"))
    needs = r"model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape \[2, 128\], this model needs \[2, 256\]"
    data = ["--set", "data.source=jsonl", f"data.path={tmp_path / 'rows.jsonl'}", "run.device=cpu"]
    for main, argv in (
        (export.main, ["--checkpoint", str(other), "--out", str(tmp_path / "out.gguf")]),
        (evaluation.main, ["--checkpoint", str(other), "--split", "train", "--num", "2", *data]),
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert info.value.code == 2 and re.search(needs, err), err
    assert not (tmp_path / "out.gguf").exists()


def test_a_home_folder_path_after_an_equals_sign_is_read_as_the_home_folder(tmp_path, monkeypatch, capsys):
    """`--checkpoint=~/run` keeps its `~` (the shell expands it only at the start of a word): eval took the
    run folder for a model folder ("no config.json in ~/run"), and `--output=~/r.json` / `--out=~/m.gguf`
    were refused ("the folder ~ does not exist")."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    run = fake_run(tmp_path, {1: family_model("llama", seed=4)}, bpe_tokenizer())
    step = run / "checkpoints" / "step_000001"
    write_copy_task(tmp_path / "rows.jsonl", n=4)
    data = ["--set", "data.source=jsonl", f"data.path={tmp_path / 'rows.jsonl'}", "eval.max_new_tokens=2"]
    home_run = f"~/{run.relative_to(tmp_path)}"
    results = evaluation.main([f"--checkpoint={home_run}", "--output=~/r.json", "--split", "train", *data])
    assert results["checkpoint"] == str(step) and f"evaluating {step}" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["num_examples"] == 4

    out = export.main([f"--checkpoint={home_run}", "--out=~/m.gguf", "--gguf", "f16"])
    assert out == tmp_path / "m.gguf" and out.is_file()
