"""When generation stops, checked against transformers: the stop ids a model folder gives (the
tokenizer's eos, generation_config.json's or else config.json's eos_token_id), and what loading a
folder says about generation_config.json's sampling defaults, which minigrpo does not apply."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from helpers.tok_fixtures import smollm2_tokenizer_dir

from minigrpo.tokenizer import GenerationConfigWarning, Tokenizer

transformers = pytest.importorskip("transformers")

CONFIG_EOS = [2, 7]  # config.json's eos ids: <|im_end|> (the tokenizer's eos) and one more


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    return smollm2_tokenizer_dir(tmp_path_factory)


def model_folder(tmp_path, smol_dir, generation_config: dict | None):
    """A tiny llama on the SmolLM2 tokenizer whose config.json has eos_token_id CONFIG_EOS; its
    generation_config.json is `generation_config` (None: no such file)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = Tokenizer.from_dir(smol_dir)
    config = AutoConfig.for_model(
        model_type="llama",
        vocab_size=tok.vocab_size,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        bos_token_id=1,
        eos_token_id=CONFIG_EOS,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    for name in os.listdir(smol_dir):
        shutil.copy(smol_dir / name, tmp_path / name)
    os.remove(tmp_path / "generation_config.json")
    if generation_config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    return tmp_path


def hf_stop_ids(folder) -> set[int]:
    """The ids transformers' generate stops on for this folder, plus the tokenizer's eos (ours stops on it too)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eos = AutoModelForCausalLM.from_pretrained(folder).generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return {*eos, AutoTokenizer.from_pretrained(str(folder)).eos_token_id}


@pytest.mark.parametrize(
    "generation_config,want",
    [(None, {2, 7}), ({"bos_token_id": 1}, {2, 7}), ({"eos_token_id": 9}, {2, 9}), ({"eos_token_id": [2, 0]}, {0, 2})],
    ids=["no-file", "file-without-eos", "file-eos-int", "file-eos-list"],
)
def test_stop_ids_are_the_ids_transformers_generate_stops_on(generation_config, want, smol_dir, tmp_path):
    """Without generation_config.json (or without its eos_token_id) transformers' generate stops on
    config.json's eos ids; with one, on the file's. Ours add the tokenizer's eos (<|im_end|>, id 2)."""
    folder = model_folder(tmp_path, smol_dir, generation_config)
    if generation_config is None or "eos_token_id" in generation_config:  # transformers 5 keeps None otherwise
        assert hf_stop_ids(folder) == want
    assert set(Tokenizer.from_dir(folder).stop_ids) == want


def test_a_bad_config_json_eos_is_refused_naming_the_file_and_key(smol_dir, tmp_path):
    folder = model_folder(tmp_path, smol_dir, None)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": "</s>"}))
    with pytest.raises(ValueError, match=r"config\.json: eos_token_id must be a token id"):
        Tokenizer.from_dir(folder)


def test_sampling_defaults_of_generation_config_warn_that_they_are_not_applied(smol_dir, tmp_path):
    """Qwen2.5-Instruct's defaults: transformers' generate samples with them, minigrpo does not."""
    qwen = {"eos_token_id": [2], "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    folder = model_folder(tmp_path, smol_dir, {**qwen, "repetition_penalty": 1.05})
    with pytest.warns(GenerationConfigWarning, match=r"generation_config\.json sets do_sample=True, temperature=0\.7"):
        Tokenizer.from_dir(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2], "bos_token_id": 1}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", GenerationConfigWarning)
        Tokenizer.from_dir(folder)  # token ids only: nothing to say


def hf_stop_string_end(hf_tok, prompt: list[int], tokens: list[int], stops: list[str]) -> int | None:
    """Tokens transformers' generate keeps: it checks StopStringCriteria after each new token."""
    from transformers.generation.stopping_criteria import StopStringCriteria

    criterion = StopStringCriteria(hf_tok, stops)
    for n in range(1, len(tokens) + 1):
        if criterion(torch.tensor([prompt + tokens[:n]]), None).item():
            return n
    return None


@pytest.mark.parametrize(
    "text,stops",
    [
        ("The answer is 42.\n\nDone", ["\n"]),  # whitespace, twice: the first one
        ("stopper here", ["stop"]),  # inside a longer token, at its start
        ("the things", ["ing"]),  # inside a longer token, in its middle
        ("a b a b", ["a b"]),  # spans two tokens, occurs twice
        ("x.\n\nend", [".\n"]),  # the last token runs past the stop string
        ("x  y", ["  ", "zz"]),  # several stop strings, whitespace only
    ],
)
def test_stop_strings_keep_the_tokens_transformers_keeps(text, stops, smol_dir):
    from transformers import AutoTokenizer

    from minigrpo.sampling.rollout import stop_string_cut

    tok, hf_tok = Tokenizer.from_dir(smol_dir), AutoTokenizer.from_pretrained(str(smol_dir))
    tokens, prompt = tok.encode(text, add_special_tokens=False), tok.encode("Q:", add_special_tokens=False)
    assert stop_string_cut(tok, tokens, stops) == hf_stop_string_end(hf_tok, prompt, tokens, stops) is not None


def test_a_stop_string_begun_in_the_prompt_does_not_stop_the_completion(smol_dir):
    """By design: the completion's text alone is searched (transformers' criterion also reads the prompt)."""
    from transformers import AutoTokenizer

    from minigrpo.sampling.rollout import stop_string_cut

    tok, hf_tok = Tokenizer.from_dir(smol_dir), AutoTokenizer.from_pretrained(str(smol_dir))
    tokens, prompt = tok.encode("op now", add_special_tokens=False), tok.encode("st", add_special_tokens=False)
    assert hf_stop_string_end(hf_tok, prompt, tokens, ["stop"]) == 1
    assert stop_string_cut(tok, tokens, ["stop"]) is None


def test_a_stop_on_the_last_allowed_token_is_a_stop_not_a_truncation():
    """Sampled rows (counter noise: the same draws with and without stops). Row 0 draws a stop id as its
    6th and last token, row 1 completes a stop string there, row 2 is cut."""
    from helpers.tiny import tiny_model
    from test_sampler import PROMPTS, CharTokenizer

    from minigrpo.sampling.kv_sampler import KVCacheSampler
    from minigrpo.sampling.params import SamplingParams

    sampler, tok = KVCacheSampler(tiny_model(seed=4), CharTokenizer()), CharTokenizer()
    free = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=6, ignore_stop=True), key=(3, 0, 0))
    rows = free.completion_ids.tolist()
    stop_id, stop_text = rows[0][5], tok.decode(rows[1][4:6])
    shared_id = stop_id in rows[0][:5] or stop_id in rows[1] + rows[2]
    if shared_id or any(stop_text in tok.decode(r) for r in (rows[0], rows[2])):
        pytest.fail("the rows share tokens: pick another key")
    assert stop_text not in tok.decode(rows[1][:5])
    params = SamplingParams(max_new_tokens=6, stop_ids=(stop_id,), stop_strings=(stop_text,))
    out = sampler.generate(PROMPTS, params, key=(3, 0, 0))  # the same noise: the same draws
    assert out.completion_ids.tolist() == rows and out.completion_mask.all()
    assert out.truncated.tolist() == [False, False, True]
    assert torch.equal(out.sampler_logp, free.sampler_logp)
