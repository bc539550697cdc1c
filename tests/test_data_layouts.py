"""Prompt datasets in the layouts real reasoning datasets ship: verl-style parquet with a nested answer,
hub snapshots whose dataset card (README.md) names the split files, splits named only "test", blank
prompts, data.max_prompt_tokens counting what it drops, chat-message prompts, the resumable order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minigrpo.config import Config, DataCfg
from minigrpo.data import DataError, Example, PromptLoader, build_dataset, encode_prompts, load_hub
from minigrpo.errors import UserError
from minigrpo.prompt_fit import prompts_that_fit

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def verl_row(i: int, truth: object) -> dict:
    """A row as verl's preprocessing scripts write it: the prompt as chat messages, the answer nested."""
    return {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "system", "content": "Reason step by step."}, {"role": "user", "content": f"{i} + 1?"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": truth},
        "extra_info": {"split": "train", "index": i},
    }


# ----------------------------------------------------------------------------- nested fields


def test_a_dotted_answer_field_reads_the_nested_answer_of_verl_parquet(tmp_path):
    """data.answer_field=reward_model.ground_truth used to fail: no field of that name."""
    path = write_parquet(tmp_path / "train.parquet", [verl_row(i, str(i + 1)) for i in range(3)])
    cfg = DataCfg(source="parquet", path=str(path), prompt_field="prompt", answer_field="reward_model.ground_truth")
    cfg.eval_split = None
    examples = build_dataset(cfg)
    assert [ex.answer for ex in examples] == ["1", "2", "3"]
    assert examples[2].prompt == verl_row(2, "3")["prompt"]
    assert examples[2].columns == {
        "data_source": "openai/gsm8k",
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "3"},
        "extra_info": {"split": "train", "index": 2},
    }


def test_a_dotted_field_that_is_a_field_of_its_own_is_read_as_one(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "x", "a.b": "flat", "a": {"b": "nested"}}])
    cfg = DataCfg(source="jsonl", path=str(path), prompt_field="q", answer_field="a.b", eval_split=None)
    assert build_dataset(cfg)[0].answer == "flat"


@pytest.mark.parametrize(
    ("reward_model", "problem"),
    [
        ({"style": "rule"}, "no field 'reward_model.ground_truth' ('reward_model' has: style; see data.answer_field)"),
        ({"style": "rule", "ground_truth": None}, "field 'reward_model.ground_truth' is null"),
        ("42", "field 'reward_model' is a str, not an object with a field 'ground_truth'"),
        (None, "field 'reward_model' is null, not an object with a field 'ground_truth'"),
        ({"ground_truth": [1, 2]}, "field 'reward_model.ground_truth' is a list; the reference answer must be text"),
    ],
    ids=["missing", "null", "text", "null-parent", "list"],
)
def test_a_nested_answer_that_is_missing_names_the_row_and_the_key(tmp_path, reward_model, problem):
    rows = [verl_row(0, "1"), {**verl_row(1, "2"), "reward_model": reward_model}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataCfg(source="jsonl", path=str(path), prompt_field="prompt", answer_field="reward_model.ground_truth")
    cfg.eval_split = None
    with pytest.raises(DataError) as e:
        build_dataset(cfg)
    assert str(e.value).startswith(f"{path}:2: {problem}"), str(e.value)


def test_a_missing_top_level_field_still_lists_the_rows_fields(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [verl_row(0, "1")])
    cfg = DataCfg(source="jsonl", path=str(path), prompt_field="prompt", answer_field="reward.ground_truth")
    with pytest.raises(DataError) as e:
        build_dataset(cfg)
    fields = "data_source, prompt, ability, reward_model, extra_info"
    assert str(e.value) == f"{path}:1: no field 'reward.ground_truth' (the row has: {fields}; see data.answer_field)"


# ----------------------------------------------------------------------------- dataset cards


def write_card(root: Path, configs: str) -> None:
    (root / "README.md").write_text(f"---\nlicense: mit\n{configs}---\n# A dataset\n\nrows\n", encoding="utf-8")


def test_a_card_names_the_split_file_of_a_dataset_with_one_json_file(tmp_path):
    """DeepScaleR's layout: one deepscaler.json at the top, the train split named only by README.md.
    It used to be "no files for split 'train'"."""
    root = tmp_path / "snapshot"
    root.mkdir()
    rows = [{"problem": f"p{i}", "answer": str(i), "solution": f"s{i}"} for i in range(3)]
    (root / "deepscaler.json").write_text(json.dumps(rows))
    write_card(root, "configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: deepscaler.json\n")
    cfg = DataCfg(source="hub", path=str(root), prompt_field="problem", eval_split=None)
    assert [(ex.prompt, ex.answer, ex.columns) for ex in build_dataset(cfg)][2] == ("p2", "2", {"solution": "s2"})
    with pytest.raises(DataError) as e:
        build_dataset(cfg, "test")
    assert str(e.value) == f"{root / 'README.md'}: config 'default' has the splits train, not 'test' (see data.split)"


def test_a_card_with_several_configs_picks_data_subset_or_its_default(tmp_path):
    root = tmp_path / "snapshot"
    for config in ("easy", "hard"):
        for split in ("train", "test"):
            write_parquet(
                root / "files" / f"{config}_{split}.parquet", [{"question": f"{config}-{split}", "answer": 1}]
            )
    configs = "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: files/{c}_train*\n"
        f"  - split: test\n    path: [files/{c}_test.parquet]\n"
        for c in ("easy", "hard")
    )
    write_card(root, f"configs:\n{configs}")
    cfg = DataCfg(source="hub", path=str(root), subset="hard")
    assert [ex.prompt for ex in build_dataset(cfg)] == ["hard-train"]
    assert [ex.prompt for ex in build_dataset(cfg, "test")] == ["hard-test"]
    with pytest.raises(DataError, match=r"README\.md declares the configs easy, hard and no default: set data\.subset"):
        build_dataset(DataCfg(source="hub", path=str(root)))
    write_card(root, "configs:\n" + configs.replace("config_name: hard\n", "config_name: hard\n  default: true\n"))
    assert [ex.prompt for ex in build_dataset(DataCfg(source="hub", path=str(root)))] == ["hard-train"]


def test_a_card_whose_files_are_a_bare_pattern_is_the_train_split(tmp_path):
    root = tmp_path / "snapshot"
    write_jsonl(root / "data" / "part-0.jsonl", [{"question": "a", "answer": "1"}])
    write_jsonl(root / "data" / "part-1.jsonl", [{"question": "b", "answer": "2"}])
    write_card(root, "configs:\n- config_name: default\n  data_files: data/*.jsonl\n")
    assert [ex.prompt for ex in load_hub(str(root))] == ["a", "b"]


def test_a_card_config_with_only_a_data_dir_finds_the_split_files_there(tmp_path):
    root = tmp_path / "snapshot"
    for config in ("algebra", "geometry"):
        write_jsonl(root / config / "train.jsonl", [{"problem": f"{config} p", "solution": r"\\boxed{1}"}])
    write_card(root, "configs:\n- config_name: algebra\n  data_dir: algebra\n  default: true\n- config_name: geometry\n"
               "  data_dir: geometry\n")  # fmt: skip
    cfg = DataCfg(source="hub", path=str(root), prompt_field="problem", answer_field="solution")
    assert [ex.prompt for ex in build_dataset(cfg)] == ["algebra p"]
    cfg.subset = "geometry"
    assert [ex.prompt for ex in build_dataset(cfg)] == ["geometry p"]


def test_a_card_naming_files_of_another_format_says_so(tmp_path):
    root = tmp_path / "snapshot"
    root.mkdir()
    (root / "train.csv").write_text("question,answer\nq,1\n")
    write_card(root, "configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: train.csv\n")
    with pytest.raises(
        DataError, match=r"split 'train' of config 'default' is train\.csv, which matches only train\.csv"
    ):
        build_dataset(DataCfg(source="hub", path=str(root)))


def test_a_card_without_configs_leaves_the_files_found_by_name(tmp_path):
    root = tmp_path / "snapshot"
    write_parquet(root / "data" / "train-00000-of-00001.parquet", [{"question": "q", "answer": 7}])
    write_card(root, "task_categories:\n- question-answering\n")
    assert [(ex.prompt, ex.answer) for ex in build_dataset(DataCfg(source="hub", path=str(root)))] == [("q", "7")]


def test_the_hub_download_fetches_the_card(tmp_path, monkeypatch):
    """The card names the split files, so it is fetched with them."""
    import huggingface_hub

    root = tmp_path / "snapshot"
    root.mkdir()
    (root / "all.jsonl").write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    write_card(root, "configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: all.jsonl\n")
    calls = []

    def snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert [ex.prompt for ex in load_hub("org/deep")] == ["q"]
    assert "README.md" in calls[0]["allow_patterns"] and "*.jsonl" in calls[0]["allow_patterns"]


def test_a_split_not_found_names_the_files_the_folder_holds(tmp_path):
    """MATH-500 ships test.jsonl only: the error names it, so data.split=test is the obvious fix."""
    root = tmp_path / "math500"
    write_jsonl(root / "test.jsonl", [{"problem": "p", "answer": "3", "solution": r"\boxed{3}"}])
    with pytest.raises(DataError) as e:
        build_dataset(DataCfg(source="hub", path=str(root), prompt_field="problem"))
    assert str(e.value) == (
        f"no .jsonl/.json/.parquet files for split 'train' in {root} (it holds test.jsonl; "
        "data.split and data.eval_split name the splits)"
    )
    cfg = DataCfg(source="hub", path=str(root), prompt_field="problem", split="test", eval_split=None)
    assert [(ex.prompt, ex.answer) for ex in build_dataset(cfg)] == [("p", "3")]


# ----------------------------------------------------------------------------- prompts against the model


class Chars:
    """A tokenizer of one token per character, with a chat template that writes a header per turn."""

    chat_template = "roles"

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False, **kwargs):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def encode(self, text, add_special_tokens=True):
        return list(text)


@pytest.mark.parametrize(
    "prompt", ["", "  \n", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " "}]]
)
def test_a_blank_prompt_is_refused_also_under_a_chat_template(prompt):
    """Under a chat template a blank prompt renders as headers (tokens, not nothing), so it used to be
    trained on as a question."""
    examples = [Example("1 + 1?", "2"), Example(prompt, "3")]
    cfg = Config()
    cfg.data.path = "d.jsonl"
    with pytest.raises(UserError, match=r"^the prompt .* is empty \(data.path='d.jsonl'\): every row needs a prompt$"):
        prompts_that_fit(cfg, examples, Chars())


def test_max_prompt_tokens_counts_the_prompts_it_drops():
    examples = [Example("x" * n, "1") for n in (3, 30, 5, 40)]
    cfg = Config()
    cfg.data.max_prompt_tokens = 30  # "<user>" + prompt + "\n<assistant>": 18 + n tokens
    with pytest.warns(
        UserWarning, match=r"^data.max_prompt_tokens=30 drops 2 of 4 prompts \(the longest has 58 tokens\)"
    ):
        kept, longest = prompts_that_fit(cfg, examples, Chars())
    assert [ex.prompt for ex in kept] == ["xxx", "xxxxx"] and longest == 23
    cfg.data.max_prompt_tokens = 20
    with pytest.raises(
        UserError, match=r"^every prompt is longer than data.max_prompt_tokens=20 \(the shortest has 21\)"
    ):
        prompts_that_fit(cfg, examples, Chars())


def test_chat_message_prompts_render_as_transformers_renders_them(tmp_path, tmp_path_factory):
    """A prompt column of messages (a system message, several turns) renders through the chat
    template as transformers' apply_chat_template does; data.system_prompt replaces the row's own."""
    from helpers.tok_fixtures import smollm2_tokenizer_dir
    from transformers import AutoTokenizer

    from minigrpo.tokenizer import Tokenizer

    folder = smollm2_tokenizer_dir(tmp_path_factory)
    chat = [
        {"role": "system", "content": "Think first."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And times 4?"},
    ]
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": chat, "answer": 20}])
    cfg = DataCfg(source="jsonl", path=str(path), prompt_field="messages", eval_split=None)
    examples = build_dataset(cfg)
    hf = AutoTokenizer.from_pretrained(folder)
    ours = Tokenizer.from_dir(folder)
    ids, texts = encode_prompts(examples, ours)
    assert texts == [hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)]
    assert ids == [hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)]
    _, texts = encode_prompts(examples, ours, system_prompt="Answer in a box.")
    replaced = [{"role": "system", "content": "Answer in a box."}, *chat[1:]]
    assert texts == [hf.apply_chat_template(replaced, add_generation_prompt=True, tokenize=False)]


# ----------------------------------------------------------------------------- real layouts end to end


def test_math_aime_and_gsm8k_layouts(tmp_path):
    """competition_math (problem/solution, level/type), AIME (an int answer column) and GSM8K's hub
    folders (main/socratic) read as the configs name them."""
    from minigrpo.answers import reference_answer

    math = write_jsonl(
        tmp_path / "math" / "train.jsonl",
        [{"problem": "1/2+1/2?", "level": "Level 1", "type": "Algebra", "solution": r"So it is $\boxed{1}$."}],
    )
    cfg = DataCfg(source="jsonl", path=str(math.parent), prompt_field="problem", answer_field="solution")
    (ex,) = build_dataset(cfg)
    assert ex.columns == {"level": "Level 1", "type": "Algebra"} and reference_answer(ex.answer) == "1"
    aime = write_parquet(
        tmp_path / "aime" / "data" / "train-00000-of-00001.parquet",
        [{"id": 60, "problem": "p", "answer": 204, "url": "u"}, {"id": 61, "problem": "q", "answer": 25, "url": "v"}],
    )
    cfg = DataCfg(source="hub", path=str(aime.parents[1]), prompt_field="problem", answer_field="answer")
    assert [(ex.answer, ex.columns["id"]) for ex in build_dataset(cfg)] == [("204", 60), ("25", 61)]
    for config in ("main", "socratic"):
        for split in ("train", "test"):
            rows = [{"question": f"{config}-{split}", "answer": "x\n#### 1,234"}]
            write_parquet(tmp_path / "gsm8k" / config / f"{split}-00000-of-00001.parquet", rows)
    cfg = DataCfg(source="gsm8k", path=str(tmp_path / "gsm8k"), subset="socratic")
    (ex,) = build_dataset(cfg, "test")
    assert (ex.prompt, ex.answer, ex.columns) == ("socratic-test", "1234", {"solution": "x\n#### 1,234"})


def test_the_order_is_reshuffled_per_epoch_and_resumes_exactly_from_a_real_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}", "answer": i} for i in range(7)])
    examples = build_dataset(DataCfg(source="jsonl", path=str(path), eval_split=None))
    loader = PromptLoader(examples, seed=3)
    epochs = [[ex.prompt for ex in loader.next_batch(7)] for _ in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs) and len({tuple(e) for e in epochs}) == 3
    first = PromptLoader(examples, seed=3)
    first.next_batch(5)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = PromptLoader(build_dataset(DataCfg(source="jsonl", path=str(path), eval_split=None)), seed=3)
    resumed.load_state_dict(state)
    assert [ex.prompt for ex in resumed.next_batch(9)] == [ex.prompt for ex in first.next_batch(9)]
