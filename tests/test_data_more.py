"""Data files as real tools write them: .json files holding one document, a split stored in two formats,
message prompts with values JSON has no type for, and the loader's order across epochs, resumes and ranks."""

from __future__ import annotations

import datetime
import json

import pytest

from minigrpo.config import DataCfg
from minigrpo.data import DataError, Example, PromptLoader, build_dataset, load_jsonl
from minigrpo.distributed import shard_range

COLUMNS = {"question": ["1+1?", "2+3?", "4*2?"], "answer": ["2", "5", "8"], "level": [1, 2, 3]}
ROWS = [Example("1+1?", "2", {"level": 1}), Example("2+3?", "5", {"level": 2}), Example("4*2?", "8", {"level": 3})]


@pytest.mark.parametrize("indent", [None, 2], ids=["one_line", "pretty_printed"])
def test_a_json_mapping_of_columns_is_read_as_rows(tmp_path, indent):
    """pandas' and Hugging Face datasets' column layout ({"question": [...], "answer": [...]}), as one
    line or pretty-printed, with a byte-order mark and CRLF line ends: one row per list position."""
    path = tmp_path / "train.json"
    text = json.dumps(COLUMNS, indent=indent)
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    assert load_jsonl(path) == ROWS
    assert build_dataset(DataCfg(source="jsonl", path=str(tmp_path))) == ROWS


def test_a_pretty_printed_json_object_is_one_row_and_errors_name_its_line(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"question": [{"role": "user", "content": "hi"}], "answer": 3}, indent=2))
    assert load_jsonl(path) == [Example([{"role": "user", "content": "hi"}], "3")]
    path.write_text('{\n  "question": "a?",\n  "answer": "1"\n  "level": 2\n}\n')  # a comma missing on line 3
    with pytest.raises(DataError, match=r"one\.json:4: not valid JSON: Expecting ',' delimiter"):
        load_jsonl(path)


def test_a_json_document_with_data_under_a_key_names_the_field_to_set(tmp_path):
    """{"data": [rows]} reads as rows with one field "data": the error says so, and the dotted field
    names read inside it."""
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"data": [{"question": "a?", "answer": "1"}]}, indent=2))
    missing = r"train\.json: row 1: no field 'question' \(the row has: data; see data.prompt_field\)"
    with pytest.raises(DataError, match=missing):
        load_jsonl(path)
    nested = {"data": {"question": "a?", "answer": "1"}}
    assert load_jsonl(path, "data.question", "data.answer") == [Example("a?", "1", nested)]


def test_json_columns_of_different_lengths_are_refused(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"question": ["a", "b"], "answer": ["1"]}, indent=1))
    uneven = r"train\.json: a mapping of columns whose lists differ in length \('question': 2, 'answer': 1\)"
    with pytest.raises(DataError, match=uneven):
        load_jsonl(path)


def test_json_lines_in_a_json_file_still_stream_and_name_the_bad_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"question": "a?", "answer": "1"}\r\n\r\n{"question": "b?", "answer": 2}')
    assert load_jsonl(path) == [Example("a?", "1"), Example("b?", "2")]
    path.write_text('{"question": "a?", "answer": "1"}\n{"question": "b?" "answer": 2}\n')
    with pytest.raises(DataError, match=r"train\.json:2: not valid JSON"):
        load_jsonl(path)


@pytest.mark.parametrize("source", ["hub", "gsm8k"])
def test_a_split_stored_as_json_and_parquet_is_not_read_twice(tmp_path, source):
    """A folder (a hub snapshot) with train.jsonl beside train.parquet holds the rows twice: reading
    both would serve each prompt twice per epoch."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = {"question": ["a?"], "answer": ["#### 1"]}
    (tmp_path / "train.jsonl").write_text(json.dumps({k: v[0] for k, v in rows.items()}) + "\n")
    pq.write_table(pa.table(rows), tmp_path / "train.parquet")
    twice = r"split 'train' in .* has both JSON and parquet files \(train\.jsonl, train\.parquet\)"
    with pytest.raises(DataError, match=twice):
        build_dataset(DataCfg(source=source, path=str(tmp_path)))
    only_json = build_dataset(DataCfg(source="jsonl", path=str(tmp_path)))  # the fix the error names
    assert [ex.prompt for ex in only_json] == ["a?"]


def test_a_loader_over_prompts_with_timestamps_saves_and_restores_its_cursor(tmp_path):
    """A parquet message struct may carry a timestamp: the cursor's fingerprint must still be made
    (it is taken at every checkpoint), and a resume continues the order."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    when = datetime.datetime(2024, 5, 1, 12, 0)
    chats = [[{"role": "user", "content": f"q{i}", "sent": when}] for i in range(5)]
    pq.write_table(pa.table({"question": chats, "answer": [str(i) for i in range(5)]}), tmp_path / "train.parquet")
    examples = build_dataset(DataCfg(source="parquet", path=str(tmp_path)))
    assert examples[0].prompt[0]["sent"] == when
    loader = PromptLoader(examples, seed=1)
    loader.next_batch(3)
    state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint stores it
    resumed = PromptLoader(examples, seed=1)
    resumed.load_state_dict(state)
    assert resumed.next_batch(4) == loader.next_batch(4)
    changed = [Example([{**ex.prompt[0], "sent": when.replace(year=2023)}], ex.answer) for ex in examples]
    with pytest.raises(DataError, match="saved fingerprint="):
        PromptLoader(changed, seed=1).load_state_dict(state)


@pytest.mark.parametrize(("n", "batch", "ranks"), [(7, 3, 2), (5, 8, 3), (10, 4, 4)])
def test_ranks_share_every_epoch_disjointly_and_a_resume_continues_it(n, batch, ranks):
    """Every rank walks the same seeded order and takes its contiguous share of each batch: together
    they serve each example once per epoch (a batch crossing an epoch end included), and a loader
    restored mid-run serves what the uninterrupted one serves."""
    examples = [Example(f"q{i}", str(i)) for i in range(n)]
    steps = 2 * n  # whole epochs: steps * batch is a multiple of n
    loaders = [PromptLoader(examples, seed=7) for _ in range(ranks)]
    served: list[str] = []
    for step in range(steps):
        shares = []
        for rank, loader in enumerate(loaders):
            global_batch = loader.next_batch(batch)
            lo, hi = shard_range(len(global_batch), rank, ranks)
            shares.append([ex.prompt for ex in global_batch[lo:hi]])
        served += [p for share in shares for p in share]
        if step == steps // 2:  # rank 0 restarts from its cursor
            state = loaders[0].state_dict()
            loaders[0] = PromptLoader(examples, seed=7)
            loaders[0].load_state_dict(state)
    epochs = [served[e * n : (e + 1) * n] for e in range(steps * batch // n)]
    assert all(sorted(epoch) == sorted(ex.prompt for ex in examples) for epoch in epochs)
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    again = PromptLoader(examples, seed=7)
    assert [ex.prompt for _ in range(steps) for ex in again.next_batch(batch)] == served


def test_fewer_prompts_than_a_step_samples_warn_before_the_weights_load(tmp_path, monkeypatch):
    """5 prompts and grpo.prompts_per_step=8: every step draws some prompt twice; said once, naming the key
    and the count that samples each once. 8 prompts draw each once: no warning."""
    import warnings

    from helpers.runs import run_config
    from helpers.tiny import write_copy_task

    from minigrpo import build
    from minigrpo.config import Config

    cfg = run_config(tmp_path)
    write_copy_task(tmp_path / "train.jsonl", n=5)
    with pytest.warns(UserWarning) as caught:
        build.check_before_loading(Config.from_dict(cfg))
    small = [str(w.message) for w in caught if "prompts_per_step" in str(w.message)]
    assert small == [
        "the training data holds 5 prompt(s), fewer than grpo.prompts_per_step=8: each step samples some prompts "
        "more than once (as separate groups); lower grpo.prompts_per_step to 5 or below to sample each once"
    ]
    write_copy_task(tmp_path / "train.jsonl", n=8)
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        build.check_before_loading(Config.from_dict(cfg))
    assert not [w for w in quiet if "prompts_per_step" in str(w.message)]


def test_chat_settings_for_a_model_without_a_chat_template_warn_before_the_weights_load(tmp_path):
    """The tiny model has no chat template: its prompts are plain text. Settings only a template reads, and
    chat-message prompts, are named in one warning; plain prompts with no such setting warn nothing."""
    import warnings

    from helpers.runs import run_config

    from minigrpo import build
    from minigrpo.config import Config

    def plain_text_warnings(cfg: dict) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build.check_before_loading(Config.from_dict(cfg))
        return [str(w.message) for w in caught if "no chat template" in str(w.message)]

    assert plain_text_warnings(run_config(tmp_path)) == []
    chat = run_config(tmp_path, data={"system_prompt": "Be brief.", "chat_template_kwargs": {"enable_thinking": False}})
    (message,) = plain_text_warnings(chat)
    assert message == (
        f"the model {tmp_path / 'model'} has no chat template, so its prompts are plain text: "
        "data.chat_template_kwargs={'enable_thinking': False} is not read; data.system_prompt is plain text before "
        "each prompt"
    )
    rows = [{"messages": [{"role": "user", "content": f"repeat {d}"}], "answer": str(d)} for d in range(8)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    messages = run_config(tmp_path, data={"path": str(tmp_path / "chat.jsonl"), "prompt_field": "messages"})
    assert plain_text_warnings(messages)[0].endswith("chat-message prompts are their contents joined by blank lines, "
                                                     "with no role or reply header")  # fmt: skip


def test_gsm8k_source_reads_the_fields_the_config_names(tmp_path):
    """data.source=gsm8k with data.prompt_field / answer_field: a copy of GSM8K under other field names
    (the error used to point at data.prompt_field, which was set and ignored)."""
    rows = [{"problem": "Tom has 3 apples and buys 4. How many?", "solution": "3 + 4 = 7\n#### 7", "level": 1}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataCfg(source="gsm8k", path=str(tmp_path / "train.jsonl"), prompt_field="problem", answer_field="solution")
    (ex,) = build_dataset(cfg)
    assert (ex.prompt, ex.answer) == (rows[0]["problem"], "7")
    assert ex.columns == {"level": 1, "solution": "3 + 4 = 7\n#### 7"}
    with pytest.raises(DataError, match=r"no field 'question' \(the row has: problem, solution, level"):
        build_dataset(DataCfg(source="gsm8k", path=str(tmp_path / "train.jsonl")))
