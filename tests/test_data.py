"""Prompt datasets: GSM8K / JSONL / parquet / hub sources, the synthetic task, rendering, the resumable loader."""

from __future__ import annotations

import itertools
import json
import re
import sys
import tracemalloc
from pathlib import Path

import pytest
from helpers.tiny import tiny_tokenizer

from minigrpo.config import DataCfg, SyntheticCfg
from minigrpo.data import (
    DataError,
    Example,
    PromptLoader,
    batch_columns,
    build_dataset,
    build_messages,
    filter_long_prompts,
    load_gsm8k,
    load_hub,
    load_jsonl,
    load_parquet,
    parse_gsm8k_answer,
    render_prompt,
    split_files,
    synthetic_arithmetic,
)
from minigrpo.errors import UserError

GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize(
    ("solution", "answer"),
    [
        ("She sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
        ("The total is 1,000 + 234.\n#### 1,234", "1234"),
        ("#### 1,000,000  \n", "1000000"),
        ("Step one #### is not the end.\n#### -5", "-5"),  # the LAST ####
        ("#### 42\nThe answer is 42.", "42"),  # the rest of the #### line only, not the lines below
    ],
)
def test_parse_gsm8k_answer(solution, answer):
    assert parse_gsm8k_answer(solution) == answer


def test_parse_gsm8k_answer_without_marker(tmp_path):
    with pytest.raises(DataError, match="no '####' final answer"):
        parse_gsm8k_answer("The answer is 5.")
    with pytest.raises(DataError, match="nothing after its '####'"):  # "" would score every completion wrong
        parse_gsm8k_answer("So it is.\n####  \n")
    rows = [{"question": "a", "answer": "x\n#### 1"}, {"question": "b", "answer": "The answer is 5."}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_gsm8k(path)
    assert str(e.value) == f"{path}:2: GSM8K solution has no '####' final answer: 'The answer is 5.'"


def test_load_gsm8k_file_and_folder(tmp_path):
    rows = [
        {"question": "How many?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
        {"question": "How much?", "answer": "It costs $1,250.\n#### 1,250"},
    ]
    write_jsonl(tmp_path / "test.jsonl", rows[:1])
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    examples = load_gsm8k(path)
    assert examples == [
        Example("How many?", "5", {"solution": rows[0]["answer"]}),
        Example("How much?", "1250", {"solution": rows[1]["answer"]}),
    ]
    assert load_gsm8k(tmp_path, "test") == examples[:1]
    cfg = DataCfg(source="gsm8k", path=str(tmp_path))
    assert build_dataset(cfg) == examples and build_dataset(cfg, "test") == examples[:1]


@pytest.mark.skipif(not GSM8K_DIR.is_dir(), reason="the shared GSM8K copy is absent")
def test_real_gsm8k():
    train, test = load_gsm8k(GSM8K_DIR, "train"), load_gsm8k(GSM8K_DIR, "test")
    assert (len(train), len(test)) == (7473, 1319)
    assert train[0].prompt.startswith("Natalia sold clips to 48 of her friends in April")
    assert train[0].answer == "72" and train[0].columns["solution"].endswith("#### 72")
    assert all(re.fullmatch(r"-?\d+", ex.answer) for ex in train + test)  # every GSM8K answer is an integer
    cfg = DataCfg(source="gsm8k", path=str(GSM8K_DIR), num_eval=100)
    assert len(build_dataset(cfg)) == 7473 and build_dataset(cfg, "test") == test[:100]


# ----------------------------------------------------------------------------- JSONL, parquet


def test_jsonl_with_custom_fields(tmp_path):
    rows = [
        {"problem": "2+2?", "solution": 4, "difficulty": "easy", "tags": ["add"]},
        {"problem": [{"role": "user", "content": "3*3?"}], "solution": "9", "difficulty": "easy", "tags": []},
    ]
    examples = load_jsonl(write_jsonl(tmp_path / "d.jsonl", rows), prompt_field="problem", answer_field="solution")
    assert examples[0] == Example("2+2?", "4", {"difficulty": "easy", "tags": ["add"]})
    assert examples[1].prompt == [{"role": "user", "content": "3*3?"}] and examples[1].answer == "9"


def test_jsonl_errors_name_the_file_line_and_field(tmp_path):
    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "x", "answer": "1"}, {"q": "y", "answer": "2"}])
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    assert str(e.value) == f"{path}:2: no field 'question' (the row has: q, answer; see data.prompt_field)"
    with pytest.raises(DataError) as e:
        build_dataset(DataCfg(source="jsonl", path=str(path), prompt_field="answer", answer_field="solution"))
    assert str(e.value) == f"{path}:1: no field 'solution' (the row has: question, answer; see data.answer_field)"
    path.write_text('{"question": "x", "answer": "1"}\n\n{"question": "y", "answer": null}\n')
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    assert str(e.value) == f"{path}:3: field 'answer' is null"  # blank lines still count as lines
    path.write_text('{"question": "x", "answer": "1"}\n{"question": oops}\n')
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    assert str(e.value) == f"{path}:2: not valid JSON: Expecting value (column 14)"
    path.write_text('{"question": "x", "answer": "1"}\n["question", "answer"]\n')
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    assert str(e.value) == f"{path}:2: a JSON list, not an object with named fields"


def test_message_list_prompts_that_are_no_messages_name_the_row(tmp_path):
    """Found when the file is read (before any weights load), not by the chat template later."""
    rows = [{"question": [{"role": "user", "content": "x"}], "answer": "1"}, {"question": ["hi"], "answer": "2"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    assert str(e.value) == f"{path}:2: message 0 of 'question' needs a text 'role' and a 'content', got 'hi'"
    write_jsonl(path, [{"question": [{"role": "user"}], "answer": "1"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: message 0 of 'question' needs a text 'role' and a 'content'"):
        load_jsonl(path)
    write_jsonl(path, [{"question": [], "answer": "1"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'question' is an empty list of messages"):
        load_jsonl(path)


@pytest.mark.parametrize(
    "message, problem",
    [
        (
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            "message 1 of 'question' has a list as 'content'; it must be text",
        ),
        ({"role": "user", "content": None}, "message 1 of 'question' has None as 'content'; it must be text"),
        (
            {"role": "robot", "content": "hi"},
            "message 1 of 'question' has role 'robot'; known roles: system, user, assistant, tool",
        ),
    ],
    ids=["list_content", "null_content", "unknown_role"],
)
def test_message_contents_and_roles_are_checked_when_read(tmp_path, message, problem):
    """A list content used to crash the plain-text rendering of a model without a chat template
    (a TypeError in the join) and reach a template unchecked; an unknown role was accepted."""
    from minigrpo.data import encode_prompts

    good = {"question": "What is 1 + 1?", "answer": "2"}
    path = write_jsonl(
        tmp_path / "d.jsonl", [good, {"question": [{"role": "system", "content": "s"}, message], "answer": "1"}]
    )
    with pytest.raises(DataError) as e:
        examples = load_jsonl(path)
        encode_prompts(examples, tiny_tokenizer())  # no chat template: the plain-text rendering
    assert str(e.value) == f"{path}:2: {problem}"


def test_json_array_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"question": "a", "answer": "1"},\n  {"question": "b", "answer": }\n]\n')
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    assert str(e.value) == f"{path}:3: not valid JSON: Expecting value (column 31)"
    path.write_text('[{"question": "a", "answer": "1"}, {"answer": "2"}]')
    with pytest.raises(DataError, match=r"d\.json: item 2: no field 'question'"):
        load_jsonl(path)


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [b'{"question": "a", "answer": "1"}', b'{"question": "b", "answer": "2"}', b'{"question": "caf\xe9"}']
    path.write_bytes(b"\n".join(lines) + b"\n")  # Latin-1 "e acute" on line 3
    with pytest.raises(DataError) as e:
        build_dataset(DataCfg(source="jsonl", path=str(tmp_path)))
    assert str(e.value) == f"{path}:3: not UTF-8 text (byte 0xe9 at column 18); save the file as UTF-8"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines[:2]) + b"\n")  # a UTF-8 byte-order mark is fine
    assert [ex.prompt for ex in load_jsonl(path)] == ["a", "b"]


def test_missing_data_files_are_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as e:
        load_jsonl(missing)
    assert str(e.value) == f"data file {missing} does not exist"
    with pytest.raises(DataError) as e:
        build_dataset(DataCfg(source="jsonl", path=str(missing)))
    assert str(e.value) == f"data.path {str(missing)!r} does not exist"
    with pytest.raises(DataError) as e:
        build_dataset(DataCfg(source="jsonl", path="/dev/null"))  # there, but no file to read
    assert str(e.value) == "data.path '/dev/null' is neither a file nor a folder"
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "1"}])
    cfg = DataCfg(source="jsonl", path=str(train), eval_path=str(tmp_path / "eval.jsonl"))
    assert len(build_dataset(cfg)) == 1
    with pytest.raises(DataError, match=r"data\.eval_path '.*eval\.jsonl' does not exist"):
        build_dataset(cfg, "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.jsonl/\.json files for split 'train' in .*empty"):
        build_dataset(DataCfg(source="jsonl", path=str(tmp_path / "empty")))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n")
    with pytest.raises(DataError) as e:  # there and readable, but empty: the file is named
        build_dataset(DataCfg(source="jsonl", path=str(blank)))
    assert str(e.value) == f"split 'train': {blank} holds no rows"


def test_jsonl_source_folder_and_eval_file(tmp_path):
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(5)])
    write_jsonl(tmp_path / "data" / "test.jsonl", [{"question": f"t{i}", "answer": str(i)} for i in range(5)])
    cfg = DataCfg(source="jsonl", path=str(tmp_path / "data"), num_eval=3)
    assert [ex.prompt for ex in build_dataset(cfg)] == ["q0", "q1", "q2", "q3", "q4"]
    assert [ex.prompt for ex in build_dataset(cfg, "test")] == ["t0", "t1", "t2"]  # capped at num_eval
    single = DataCfg(
        source="jsonl", path=str(tmp_path / "data" / "train.jsonl"), eval_path=str(tmp_path / "data" / "test.jsonl")
    )
    assert build_dataset(single)[0].prompt == "q0" and build_dataset(single, "test")[0].prompt == "t0"
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(DataCfg(source="jsonl", path=str(tmp_path / "nope.jsonl")))
    # one file and no eval_path: its eval split would be the training rows, so there is none
    with pytest.raises(DataError, match=r"set data\.eval_path"):
        build_dataset(DataCfg(source="jsonl", path=str(tmp_path / "data" / "train.jsonl")), "test")


def test_an_eval_split_never_reads_a_training_file(tmp_path):
    """data.eval_path naming the training file (spelled another way too), or an eval split name that
    matches a training file of the folder, would score the eval on training prompts: refused."""
    train = write_jsonl(tmp_path / "data" / "train.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(3)])
    spelled = str(tmp_path / "data" / ".." / "data" / "train.jsonl")
    cfg = DataCfg(source="jsonl", path=str(train), eval_path=spelled)
    with pytest.raises(DataError) as e:
        build_dataset(cfg, "test")
    assert str(e.value) == (
        f"split 'test' reads {train}, a file of the training split 'train': the eval prompts would be training "
        "prompts; name a different file or split"
    )
    write_jsonl(tmp_path / "data" / "train-dev.jsonl", [{"question": "d", "answer": "1"}])  # split train AND dev
    write_jsonl(tmp_path / "data" / "test.jsonl", [{"question": "t", "answer": "1"}])
    folder = DataCfg(source="jsonl", path=str(tmp_path / "data"))
    with pytest.raises(DataError, match=r"split 'dev' reads .*train-dev\.jsonl, a file of the training split"):
        build_dataset(folder, "dev")
    assert [ex.prompt for ex in build_dataset(folder, "test")] == ["t"]  # apart: read
    only_eval = tmp_path / "eval_only"
    write_jsonl(only_eval / "test.jsonl", [{"question": "e", "answer": "2"}])  # no training files: nothing shared
    assert [ex.prompt for ex in build_dataset(DataCfg(source="jsonl", path=str(only_eval)), "test")] == ["e"]


def test_gsm8k_eval_split_matching_a_training_file_is_refused(tmp_path):
    folder = tmp_path / "gsm8k"
    write_jsonl(folder / "train_test.jsonl", [{"question": "q", "answer": "#### 1"}])  # both splits' name
    with pytest.raises(DataError, match=r"split 'test' reads .*train_test\.jsonl, a file of the training split"):
        build_dataset(DataCfg(source="gsm8k", path=str(folder)), "test")


def test_byte_order_marks_of_joined_files_are_skipped(tmp_path):
    """`cat a.jsonl b.jsonl` of files saved with a BOM puts one at the start of a later line."""
    part = '\ufeff{"question": "a", "answer": 1}\r\n'
    path = tmp_path / "d.jsonl"
    path.write_bytes((part + part.replace('"a"', '"b"') + "\r\n").encode())
    assert [(ex.prompt, ex.answer) for ex in load_jsonl(path)] == [("a", "1"), ("b", "1")]


def test_jsonl_lines_end_only_at_line_breaks(tmp_path):
    """U+2028, U+2029 and U+0085 may stand unescaped in a JSON string (json.dumps(ensure_ascii=False)
    writes them so): they used to split the line, failing the file with 'Unterminated string' and
    numbering every later line wrong. CRLF, CR-only, blank lines and a last line without a newline are read."""
    texts = ["a\u2028b", "c\u2029d", "e\x85f"]
    lines = [json.dumps({"question": t, "answer": str(i)}, ensure_ascii=False) for i, t in enumerate(texts)]
    path = tmp_path / "d.jsonl"
    path.write_bytes(("\r\n".join(lines) + "\r\n\r\n" + '{"question": "g", "answer": 3}').encode())
    rows = [(ex.prompt, ex.answer) for ex in load_jsonl(path)]
    assert rows == [("a\u2028b", "0"), ("c\u2029d", "1"), ("e\x85f", "2"), ("g", "3")]
    path.write_bytes("\r".join(lines[:2]).encode())  # classic Mac line ends
    assert [ex.prompt for ex in load_jsonl(path)] == texts[:2]
    path.write_bytes(("\n".join(lines) + '\n{"question": oops}\n').encode())
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    assert str(e.value) == f"{path}:4: not valid JSON: Expecting value (column 14)"


def test_an_eval_split_reads_only_the_rows_it_keeps(tmp_path):
    """Files stream: an eval split of data.num_eval rows stops reading there, so a bad row past them
    (or a file far larger than memory) is never read; the training split reads every row."""
    rows = [{"question": f"t{i}", "answer": i} for i in range(3)]
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"question": oops}\n', encoding="utf-8")
    write_jsonl(tmp_path / "train.jsonl", rows)
    for source in ("jsonl", "gsm8k"):
        if source == "gsm8k":
            rows = [{"question": f"t{i}", "answer": f"so #### {i}"} for i in range(3)]
            test.write_text("".join(json.dumps(r) + "\n" for r in rows) + "oops\n", encoding="utf-8")
        cfg = DataCfg(source=source, path=str(tmp_path), num_eval=3)
        assert [(ex.prompt, ex.answer) for ex in build_dataset(cfg, "test")] == [("t0", "0"), ("t1", "1"), ("t2", "2")]
        with pytest.raises(DataError, match=re.escape(f"{test}:4: not valid JSON")):
            build_dataset(cfg, "test", limit=4)
    assert build_dataset(DataCfg(source="jsonl", path=str(tmp_path), num_eval=0), "test") == []


def test_a_parquet_eval_split_reads_only_the_rows_it_keeps(tmp_path):
    """A parquet file is read a batch of rows at a time: a null prompt in row 2500 is past an eval
    split of 5 rows, and the training split, which reads it, names the row."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    questions = [f"q{i}" for i in range(3000)]
    questions[2499] = None
    table = pa.table({"question": questions, "answer": [str(i) for i in range(3000)]})
    pq.write_table(table, tmp_path / "test.parquet", row_group_size=1000)
    pq.write_table(table, tmp_path / "train.parquet")
    cfg = DataCfg(source="parquet", path=str(tmp_path), num_eval=5)
    assert [ex.prompt for ex in build_dataset(cfg, "test")] == ["q0", "q1", "q2", "q3", "q4"]
    with pytest.raises(DataError) as e:
        build_dataset(cfg)
    assert str(e.value) == f"{tmp_path / 'train.parquet'}: row 2500: field 'question' is null"


def test_a_large_jsonl_file_is_streamed_not_read_whole(tmp_path):
    """Reading the first rows of an 8 MB file takes far less than 8 MB (it used to be read, decoded
    and split whole: three copies of the file at once)."""
    path = tmp_path / "test.jsonl"
    row = json.dumps({"question": "q" * 1000, "answer": "1"}) + "\n"
    path.write_text(row * 8000, encoding="utf-8")
    write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "1"}])
    tracemalloc.start()
    try:
        examples = build_dataset(DataCfg(source="jsonl", path=str(tmp_path), num_eval=5), "test")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(examples) == 5 and peak < 1_000_000, f"peak {peak / 1e6:.1f} MB"


@pytest.mark.parametrize("column", ["answers", "completions", "prompts"])
def test_a_column_named_like_a_reward_argument_is_refused_when_read(tmp_path, column):
    """Columns reach reward functions as keyword arguments: an 'answers' column (the accepted answers,
    say) would collide with their third argument at the first step, after the model loaded."""
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "1", column: "one"}])
    with pytest.raises(DataError) as e:
        build_dataset(DataCfg(source="jsonl", path=str(path)))
    assert str(e.value) == (
        f"{path}:1: field {column!r} has the name of a reward function argument (prompts, completions, answers); "
        "rename it in the data (or read it as data.prompt_field / data.answer_field)"
    )
    cfg = DataCfg(source="jsonl", path=str(path), answer_field=column)
    assert [(ex.answer, ex.columns) for ex in build_dataset(cfg)] == [("one", {"answer": "1"})]


def test_a_field_named_twice_is_refused(tmp_path):
    """json.loads keeps the last of two "answer"s without a word; which one the row means is unknown."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n{"question": "b", "answer": "2", "answer": "3"}\n')
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    assert str(e.value) == f"{path}:2: an object names the field 'answer' twice"
    array = tmp_path / "d.json"
    array.write_text('[{"question": [{"role": "user", "role": "system", "content": "x"}], "answer": "1"}]')
    with pytest.raises(DataError) as e:
        load_jsonl(array)
    assert str(e.value) == f"{array}: an object names the field 'role' twice"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [(7, "7"), (2.5, "2.5"), (True, "True"), ("", "")],
)
def test_numeric_answers_become_text(tmp_path, answer, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": answer}])
    assert load_jsonl(path)[0].answer == expected


@pytest.mark.parametrize(
    ("answer_json", "problem"),
    [
        ("[1, 2]", "field 'answer' is a list; the reference answer must be text or a number"),
        ('{"value": 1}', "field 'answer' is an object; the reference answer must be text or a number"),
        ("NaN", "field 'answer' is nan, not an answer (see data.answer_field)"),
        ("-Infinity", "field 'answer' is -inf, not an answer (see data.answer_field)"),
    ],
    ids=["list", "object", "nan", "infinity"],
)
def test_answers_that_are_no_text_or_number_are_refused(tmp_path, answer_json, problem):
    """They used to become their Python str() ("[1, 2]", "{'value': 1}", "nan"): a reference no
    completion could match, so every reward and the accuracy read 0 without a word."""
    path = tmp_path / "d.jsonl"
    path.write_text(f'{{"question": "q", "answer": "1"}}\n{{"question": "q", "answer": {answer_json}}}\n')
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    assert str(e.value) == f"{path}:2: {problem}"


def test_gsm8k_from_one_file_has_no_eval_split(tmp_path):
    """data.source=gsm8k with data.path one file (GSM8K has no data.eval_path) used to hand the
    training rows out as the test split: an eval on what the model trained on."""
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(3)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:1])
    cfg = DataCfg(source="gsm8k", path=str(train))
    assert [ex.answer for ex in build_dataset(cfg)] == ["0", "1", "2"]
    with pytest.raises(DataError) as e:
        build_dataset(cfg, "test")
    assert str(e.value) == (
        f"split 'test': data.path {train} is one file, the training data; "
        "point data.path at a folder with per-split files"
    )
    assert [ex.prompt for ex in build_dataset(DataCfg(source="gsm8k", path=str(tmp_path)), "test")] == ["q0"]


def test_build_dataset_limit_overrides_num_eval(tmp_path):
    """`limit` (eval --num) may ask an eval split for more rows than data.num_eval, which caps it by default."""
    write_jsonl(tmp_path / "train.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(6)])
    write_jsonl(tmp_path / "test.jsonl", [{"question": f"t{i}", "answer": str(i)} for i in range(6)])
    cfg = DataCfg(source="jsonl", path=str(tmp_path), num_eval=2)
    assert len(build_dataset(cfg, "test")) == 2
    assert [ex.prompt for ex in build_dataset(cfg, "test", limit=5)] == ["t0", "t1", "t2", "t3", "t4"]
    assert [ex.prompt for ex in build_dataset(cfg, "train", limit=3)] == ["q0", "q1", "q2"]
    assert len(build_dataset(cfg, "test", limit=50)) == 6  # all there is; the caller says whether that is enough
    syn = DataCfg(num_eval=3, synthetic=SyntheticCfg(seed=1))
    assert build_dataset(syn, "test", limit=7)[:3] == build_dataset(syn, "test")  # a longer prefix of one stream


def test_a_data_path_not_found_says_where_it_was_looked_for(tmp_path, monkeypatch):
    """Relative paths are read from the working directory (not the config's folder), and a pattern
    is not expanded: the message says so instead of a bare 'does not exist'."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        build_dataset(DataCfg(source="jsonl", path="data/train.jsonl"))
    assert str(e.value) == f"data.path 'data/train.jsonl' does not exist (relative to the working directory {tmp_path})"
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"question": "q", "answer": "1"}])
    assert build_dataset(DataCfg(source="jsonl", path="data/train.jsonl"))[0].prompt == "q"
    with pytest.raises(DataError) as e:
        build_dataset(DataCfg(source="jsonl", path=str(tmp_path / "data" / "*.jsonl")))
    assert str(e.value) == (
        f"data.path {str(tmp_path / 'data' / '*.jsonl')!r} does not exist "
        "(a pattern is not expanded: name one file, or a folder holding the split's files)"
    )


def test_parquet_without_pyarrow_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError) as e:
        load_parquet(tmp_path / "d.parquet")
    assert "needs the 'pyarrow' package" in str(e.value) and "pip install pyarrow" in str(e.value)
    assert str(tmp_path / "d.parquet") in str(e.value)


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"question": ["a?", "b?"], "answer": ["1", "2"], "level": [1, 2]}), path)
    assert load_parquet(path) == [Example("a?", "1", {"level": 1}), Example("b?", "2", {"level": 2})]
    assert build_dataset(DataCfg(source="parquet", path=str(tmp_path))) == load_parquet(path)
    messages = [
        [{"role": "user", "content": "3*3?"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}],
    ]
    pq.write_table(pa.table({"question": messages, "answer": [9, 1]}), path)  # chat prompts, numeric answers
    assert load_parquet(path) == [Example(messages[0], "9"), Example(messages[1], "1")]


def test_parquet_errors_name_the_file_and_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"question": ["a?", None, "c?"], "answer": ["1", "2", "3"]}), path)
    with pytest.raises(DataError) as e:
        load_parquet(path)
    assert str(e.value) == f"{path}: row 2: field 'question' is null"
    with pytest.raises(DataError) as e:
        build_dataset(DataCfg(source="parquet", path=str(path), answer_field="solution"))
    assert str(e.value) == f"{path}: row 1: no field 'solution' (the row has: question, answer; see data.answer_field)"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"train\.parquet: not a readable parquet file"):
        load_parquet(path)
    with pytest.raises(DataError, match=r"data file .*nope\.parquet does not exist"):
        load_parquet(tmp_path / "nope.parquet")


# ----------------------------------------------------------------------------- hub


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A dataset repo snapshot with two configs (main, socratic); records the download calls."""
    import huggingface_hub

    root = tmp_path / "snapshot"
    for config in ("main", "socratic"):
        for split in ("train", "test"):
            rows = [{"question": f"{config}-{split}-{i}", "answer": f"...\n#### {i + 1},000"} for i in range(3)]
            write_jsonl(root / config / f"{split}-00000-of-00001.jsonl", rows)
    write_jsonl(root / "main" / "pretrain-extra.jsonl", [{"question": "no", "answer": "#### 0"}])
    (root / ".cache").mkdir()
    write_jsonl(root / ".cache" / "train.jsonl", [{"question": "hidden", "answer": "#### 0"}])
    calls = []

    def snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_hub_source_picks_the_split_files(fake_hub):
    examples = load_hub("org/data", "test", subset="socratic", revision="v1")
    assert [ex.prompt for ex in examples] == ["socratic-test-0", "socratic-test-1", "socratic-test-2"]
    assert examples[2].answer == "...\n#### 3,000" and examples[2].columns == {}
    assert fake_hub[0]["repo_id"] == "org/data" and fake_hub[0]["repo_type"] == "dataset"
    assert fake_hub[0]["revision"] == "v1" and "*.parquet" in fake_hub[0]["allow_patterns"]
    cfg = DataCfg(source="hub", path="org/data", subset="main")
    assert [ex.prompt for ex in build_dataset(cfg)] == ["main-train-0", "main-train-1", "main-train-2"]
    with pytest.raises(DataError, match=r"several folders .* \(main, socratic\): set data.subset"):
        load_hub("org/data", "train")


def test_hub_source_reads_a_local_snapshot_folder(tmp_path, monkeypatch):
    """A hub dataset's files downloaded beforehand (data/<split>-*.parquet) are read offline from data.path."""
    pytest.importorskip("pyarrow")
    import huggingface_hub
    import pyarrow as pa
    import pyarrow.parquet as pq

    def offline(**kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    root = tmp_path / "snapshot"
    (root / "data").mkdir(parents=True)
    for split, n in (("train", 3), ("test", 2)):
        table = pa.table({"problem": [f"{split}{i}" for i in range(n)], "solution": list(range(n))})
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    cfg = DataCfg(source="hub", path=str(root), prompt_field="problem", answer_field="solution")
    assert [(ex.prompt, ex.answer) for ex in build_dataset(cfg)] == [("train0", "0"), ("train1", "1"), ("train2", "2")]
    assert [ex.prompt for ex in build_dataset(cfg, "test")] == ["test0", "test1"]
    assert [ex.prompt for ex in load_hub(str(root), "test", "problem", "solution")] == ["test0", "test1"]


def test_gsm8k_from_the_hub_by_default(fake_hub):
    examples = build_dataset(DataCfg(source="gsm8k"), "test")
    assert fake_hub[0]["repo_id"] == "openai/gsm8k"
    assert [ex.prompt for ex in examples] == ["main-test-0", "main-test-1", "main-test-2"]
    assert [ex.answer for ex in examples] == ["1000", "2000", "3000"]


def test_split_files_matches_whole_words(tmp_path):
    flat = ["train.jsonl", "trainer.jsonl", "pretrain.jsonl", "x_train_1.json", "train-0-of-2.parquet", "train.txt"]
    nested = ["nested/data/train/0.jsonl", "nested/data/test/0.jsonl", "nested/train.jsonl"]
    for name in flat + nested:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    with pytest.raises(DataError, match=r"several folders of .* \(\., nested, nested/data/train\): set data.subset"):
        split_files(tmp_path, "train")
    assert [p.relative_to(tmp_path).as_posix() for p in split_files(tmp_path, "train", "data")] == [nested[0]]
    with pytest.raises(DataError, match=r"no \.jsonl files for split 'dev'"):
        split_files(tmp_path, "dev", suffixes=(".jsonl",))


def test_split_files_in_one_folder(tmp_path):
    for name in [
        "train.jsonl",
        "trainer.jsonl",
        "pretrain.jsonl",
        "x_train_1.json",
        "train-0-of-2.parquet",
        "train.txt",
    ]:
        (tmp_path / name).write_text("")
    json_files = split_files(tmp_path, "train", suffixes=(".jsonl", ".json"))
    assert [p.name for p in json_files] == ["train.jsonl", "x_train_1.json"]
    mixed = r"split 'train' in .* has both JSON and parquet files \(train-0-of-2.parquet, "
    with pytest.raises(DataError, match=mixed):
        split_files(tmp_path, "train")  # one split in two formats would be read twice over
    assert [p.name for p in split_files(tmp_path, "train", suffixes=(".jsonl",))] == ["train.jsonl"]


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_per_seed_and_split():
    a, b = synthetic_arithmetic(0, 50), synthetic_arithmetic(0, 50)
    assert a == b
    assert [ex.prompt for ex in synthetic_arithmetic(1, 50)] != [ex.prompt for ex in a]
    assert [ex.prompt for ex in synthetic_arithmetic(0, 50, split="test")] != [ex.prompt for ex in a]
    assert synthetic_arithmetic(0, 80)[:50] == a  # a longer set extends the same stream


def test_synthetic_default_is_single_digit_add_sub():
    examples = synthetic_arithmetic(0, 300)
    for ex in examples:
        m = re.fullmatch(r"(\d) ([+-]) (\d)", ex.columns["expression"])
        assert m, ex.columns["expression"]
        instruction = "Give the final answer as a number inside <answer></answer>."
        assert ex.prompt == f"What is {ex.columns['expression']}? {instruction}"
        assert int(ex.answer) == eval(ex.columns["expression"]) >= 0
    assert {ex.columns["expression"][2] for ex in examples} == {"+", "-"}


def test_synthetic_answers_follow_precedence():
    cfg = SyntheticCfg(
        operations=["+", "-", "*"],
        num_operands=4,
        min_operand=-20,
        max_operand=99,
        allow_negative=True,
        instruction=None,
    )
    examples = synthetic_arithmetic(3, 500, cfg)
    assert all(int(ex.answer) == eval(ex.columns["expression"]) for ex in examples)
    assert all(ex.prompt == f"What is {ex.columns['expression']}?" for ex in examples)
    assert min(int(ex.answer) for ex in examples) < 0  # negatives allowed here
    with pytest.raises(DataError, match="only negative values"):
        synthetic_arithmetic(0, 1, SyntheticCfg(operations=["-"], num_operands=3, min_operand=5, max_operand=5))


def test_build_dataset_synthetic_sizes():
    cfg = DataCfg(num_eval=30, synthetic=SyntheticCfg(num_train=70, seed=4))
    train, test = build_dataset(cfg), build_dataset(cfg, "test")
    assert (len(train), len(test)) == (70, 30)
    assert train == synthetic_arithmetic(4, 70, cfg.synthetic, split="train")


def _whole_space(operations: list[str], numbers: range, num_operands: int, allow_negative: bool) -> set[str]:
    """Every expression of a synthetic space, enumerated here independently of minigrpo.synthetic."""
    spaces = set()
    for operands in itertools.product(numbers, repeat=num_operands):
        for ops in itertools.product(operations, repeat=num_operands - 1):
            text = " ".join([str(operands[0])] + [f"{op} {x}" for op, x in zip(ops, operands[1:])])
            if allow_negative or eval(text) >= 0:
                spaces.add(text)
    return spaces


@pytest.mark.parametrize(
    ("synthetic", "space"),
    [
        (SyntheticCfg(), _whole_space(["+", "-"], range(10), 2, False)),  # the default: 155 expressions
        (
            SyntheticCfg(
                operations=["+", "-", "*"], num_operands=3, min_operand=-1, max_operand=2, allow_negative=True
            ),
            _whole_space(["+", "-", "*"], range(-1, 3), 3, True),  # 576 expressions
        ),
    ],
)
def test_synthetic_eval_split_is_held_out_of_training(synthetic, space):
    """The eval split draws only expressions the training split never draws: over the whole space
    (every expression drawn at least once by one split or the other), the two share no prompt, and
    each split is the same list on every build."""
    synthetic.num_train = 6000
    cfg = DataCfg(num_eval=3000, synthetic=synthetic)
    train, test = build_dataset(cfg), build_dataset(cfg, "test")
    train_expressions = {ex.columns["expression"] for ex in train}
    test_expressions = {ex.columns["expression"] for ex in test}
    assert train_expressions | test_expressions == space
    assert train_expressions & test_expressions == set()
    assert {ex.prompt for ex in train} & {ex.prompt for ex in test} == set()
    assert 0.1 < len(test_expressions) / len(space) < 0.3  # about a fifth is held out
    assert (build_dataset(cfg), build_dataset(cfg, "test")) == (train, test)
    validation = build_dataset(cfg, "validation", limit=300)  # another eval split: another stream, same part
    assert {ex.columns["expression"] for ex in validation} <= test_expressions
    assert [ex.prompt for ex in validation[:300]] != [ex.prompt for ex in test[:300]]


def test_synthetic_without_eval_split_trains_on_the_whole_space():
    """With data.eval_split null nothing is held out: the training split is the one stream of the whole
    space (the demo's data), and SFT's warm-up on the "train" split keeps clear of the eval part."""
    cfg = DataCfg(eval_split=None)
    train = build_dataset(cfg)
    assert train == synthetic_arithmetic(0, 2000, cfg.synthetic, part="all")
    assert len({ex.columns["expression"] for ex in train}) == 155
    assert [ex.columns["expression"] for ex in train[:4]] == ["8 - 3", "0 + 7", "9 - 3", "5 + 4"]
    held_out = {ex.columns["expression"] for ex in build_dataset(DataCfg(), "test")}
    assert {ex.columns["expression"] for ex in synthetic_arithmetic(0, 2000)} & held_out == set()


@pytest.mark.parametrize(
    ("seed", "split", "problem"),
    [
        (0, "train", "all are held out for the eval split"),  # "3 + 3" is held out for seed 0
        (1, "test", "none is held out for the eval split 'test'"),  # and kept for training for seed 1
    ],
)
def test_a_synthetic_space_too_small_to_hold_out_an_eval_split_is_named(seed, split, problem):
    cfg = DataCfg(synthetic=SyntheticCfg(seed=seed, operations=["+"], min_operand=3, max_operand=3))
    with pytest.raises(DataError, match=re.escape(f"data.synthetic has 1 expressions and {problem}")):
        build_dataset(cfg, split)
    assert [ex.prompt for ex in build_dataset(DataCfg(eval_split=None, synthetic=cfg.synthetic))][:1] == [
        "What is 3 + 3? Give the final answer as a number inside <answer></answer>."
    ]


# ----------------------------------------------------------------------------- rendering


class FakeTokenizer:
    chat_template = "{{ messages }}"

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, **kwargs):
        self.calls.append((messages, kwargs))
        return "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"


def test_build_messages():
    ex = Example("What is 2 + 2?", "4")
    assert build_messages(ex) == [{"role": "user", "content": "What is 2 + 2?"}]
    assert build_messages(ex, "Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
    ]
    chat = Example([{"role": "system", "content": "old"}, {"role": "user", "content": "hi"}], "x")
    assert build_messages(chat) == chat.prompt and build_messages(chat) is not chat.prompt
    assert build_messages(chat, "new") == [{"role": "system", "content": "new"}, {"role": "user", "content": "hi"}]


def test_render_prompt_uses_the_chat_template():
    tok = FakeTokenizer()
    messages = build_messages(Example("Q?", "1"), "S.")
    assert render_prompt(messages, tok) == "<|system|>S.\n<|user|>Q?\n<|assistant|>"
    assert tok.calls == [(messages, {"add_generation_prompt": True, "tokenize": False})]


def test_render_prompt_plain_text_fallback():
    messages = build_messages(Example("Q?", "1"), "S.")
    base = FakeTokenizer()
    base.chat_template = None  # a base model's tokenizer
    assert render_prompt(messages, base) == "S.\n\nQ?" and base.calls == []
    assert render_prompt(messages, None) == "S.\n\nQ?"
    assert render_prompt(messages[1:], object()) == "Q?"


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory):
    from helpers.tok_fixtures import smollm2_tokenizer_dir

    return smollm2_tokenizer_dir(tmp_path_factory)


TRIMMING_TEMPLATE = (  # Llama-3 style: every content trimmed
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize("reply", ["<think>\n", "Step 1: ", "So"])
def test_a_begun_assistant_reply_is_continued_as_transformers_does(smol_dir, reply):
    """A prompt ending with an assistant message is a prefill (transformers' continue_final_message, as
    TRL renders it): the text stops inside that turn; it used to close it and open a new assistant turn."""
    from helpers.tok_fixtures import hf_tokenizer

    from minigrpo.data import encode_prompts
    from minigrpo.tokenizer import Tokenizer

    prompt = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": reply}]
    example = Example(prompt, "4")
    hf = hf_tokenizer(smol_dir)
    for template in (hf.chat_template, TRIMMING_TEMPLATE):
        hf.chat_template = template
        messages = build_messages(example, "Be brief.")
        expected = hf.apply_chat_template(messages, continue_final_message=True, tokenize=False)
        assert render_prompt(messages, hf, prefill=True) == expected
    ours = Tokenizer.from_dir(smol_dir)
    ids, texts = encode_prompts([example], ours, "Be brief.")
    hf = hf_tokenizer(smol_dir)
    expected = hf.apply_chat_template(build_messages(example, "Be brief."), continue_final_message=True, tokenize=False)
    assert texts == [expected] and texts[0].endswith("<|im_start|>assistant\n" + reply)
    assert ids == [hf.encode(expected, add_special_tokens=False)]
    plain = build_messages(Example("Q?", "1"))  # a user turn last: the generation header as before
    assert render_prompt(plain, ours, prefill=True) == hf.apply_chat_template(
        plain, add_generation_prompt=True, tokenize=False
    )


def test_render_prompt_rejects_token_ids():
    class IdsTokenizer(FakeTokenizer):
        def apply_chat_template(self, messages, **kwargs):
            return [1, 2, 3]

    with pytest.raises(TypeError, match="returned list, expected the prompt text"):
        render_prompt([{"role": "user", "content": "x"}], IdsTokenizer())


def test_filter_long_prompts():
    examples = [Example("one", "1"), Example("one two three", "3"), Example("a b c d e", "5")]
    kept = filter_long_prompts(examples, str.split, 3)
    assert kept == examples[:2]
    assert filter_long_prompts(examples, str.split, None) == examples
    render = lambda ex: render_prompt(build_messages(ex, "sys prompt"), None)
    assert filter_long_prompts(examples, str.split, 3, render) == examples[:1]
    with pytest.raises(DataError, match=r"all 3 prompts are longer than data\.max_prompt_tokens=0"):
        filter_long_prompts(examples, str.split, 0)


def test_batch_columns_repeat_each_row_per_group():
    batch = [Example("a", "1", {"solution": "s1", "level": 1}), Example("b", "2", {"solution": "s2"})]
    assert batch_columns(batch, repeat=3) == {
        "solution": ["s1", "s1", "s1", "s2", "s2", "s2"],
        "level": [1, 1, 1, None, None, None],
    }
    assert batch_columns([Example("a", "1")], repeat=4) == {}


# ----------------------------------------------------------------------------- loader


def numbered(n: int) -> list[Example]:
    return [Example(f"q{i}", str(i)) for i in range(n)]


def ids(batch: list[Example]) -> list[int]:
    return [int(ex.answer) for ex in batch]


def test_each_epoch_is_a_different_seeded_permutation():
    n = 20
    loader = PromptLoader(numbered(n), seed=7)
    epochs = [ids(loader.next_batch(n)) for _ in range(4)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4 and epochs[0] != list(range(n))
    assert epochs == [loader.order(e) for e in range(4)]
    again = PromptLoader(numbered(n), seed=7)
    assert [ids(again.next_batch(n)) for _ in range(4)] == epochs
    other = PromptLoader(numbered(n), seed=8)
    assert ids(other.next_batch(n)) != epochs[0]
    plain = PromptLoader(numbered(n), shuffle=False)
    assert ids(plain.next_batch(n + 5)) == [*range(n), 0, 1, 2, 3, 4]


def test_batches_straddle_epochs():
    loader = PromptLoader(numbered(10), seed=1)
    seen = ids(loader.next_batch(4)) + ids(loader.next_batch(4)) + ids(loader.next_batch(4))
    assert seen[:10] == loader.order(0) and seen[10:] == loader.order(1)[:2]
    assert (loader.epoch, loader.index, loader.consumed) == (1, 2, 12)
    big = PromptLoader(numbered(3), seed=1)
    assert ids(big.next_batch(8)) == big.order(0) + big.order(1) + big.order(2)[:2]


@pytest.mark.parametrize(("n", "batch_size"), [(12, 4), (10, 4), (5, 7), (7, 1)])
def test_resume_reproduces_the_uninterrupted_sequence(n, batch_size):
    """Cut after every possible batch, including exactly at an epoch boundary (n=12, B=4: after 3,
    6, 9 batches) and inside batches that straddle two epochs; JSON-serialise the cursor like a
    checkpoint does."""
    steps = 3 * n // batch_size + 3
    reference = PromptLoader(numbered(n), seed=3)
    expected = [ids(reference.next_batch(batch_size)) for _ in range(steps)]
    for cut in range(steps + 1):
        first = PromptLoader(numbered(n), seed=3)
        got = [ids(first.next_batch(batch_size)) for _ in range(cut)]
        state = json.loads(json.dumps(first.state_dict()))
        resumed = PromptLoader(numbered(n), seed=3)
        resumed.load_state_dict(state)
        got += [ids(resumed.next_batch(batch_size)) for _ in range(steps - cut)]
        assert got == expected, f"cut after batch {cut}"
        assert resumed.consumed == steps * batch_size


def test_epoch_boundary_cursor():
    loader = PromptLoader(numbered(8), seed=0)
    loader.next_batch(4), loader.next_batch(4)
    state = loader.state_dict()
    assert (state["epoch"], state["index"]) == (0, 8)  # epoch 0 used up, epoch 1 not begun
    resumed = PromptLoader(numbered(8), seed=0)
    resumed.load_state_dict(state)
    assert ids(resumed.next_batch(8)) == loader.order(1)  # neither skips nor repeats an epoch
    assert (resumed.epoch, resumed.index) == (1, 8)


def test_resume_refuses_a_different_dataset():
    state = PromptLoader(numbered(8), seed=0).state_dict()
    assert set(state) == {"epoch", "index", "seed", "shuffle", "consumed", "num_examples", "fingerprint"}
    with pytest.raises(DataError, match="saved num_examples=8, this run has 9"):
        PromptLoader(numbered(9), seed=0).load_state_dict(state)
    changed = numbered(8)
    changed[3] = Example("other", "3")
    with pytest.raises(DataError, match="saved fingerprint="):
        PromptLoader(changed, seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="saved seed=0, this run has 1"):
        PromptLoader(numbered(8), seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="empty dataset"):
        PromptLoader([])
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        PromptLoader(numbered(3)).next_batch(0)


# ----------------------------------------------------------------------------- chat template variables, named templates


def test_chat_template_kwargs_reach_every_prompt_as_transformers_renders_them(smol_dir, tmp_path):
    """data.chat_template_kwargs ({enable_thinking: false} for Qwen3) are template variables of every prompt,
    a begun reply included: the prompt ends with the empty think block exactly as transformers writes it."""
    from helpers.tok_fixtures import hf_tokenizer, tokenizer_variant
    from test_chat_template import QWEN3_TEMPLATE

    from minigrpo.config import load_config
    from minigrpo.data import encode_prompts
    from minigrpo.tokenizer import Tokenizer

    d = tokenizer_variant(smol_dir, tmp_path / "qwen3", {"chat_template": QWEN3_TEMPLATE})
    ours, hf = Tokenizer.from_dir(d), hf_tokenizer(d)
    cfg = load_config(None, ["data.chat_template_kwargs={enable_thinking: false}"])
    assert DataCfg().chat_template_kwargs == {} and cfg.data.chat_template_kwargs == {"enable_thinking": False}
    begun = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "So"}]
    examples = [Example("What is 2+3?", "5"), Example(begun, "4")]
    ids, texts = encode_prompts(examples, ours, "Be brief.", cfg.data.chat_template_kwargs)
    chats = [build_messages(ex, "Be brief.") for ex in examples]
    expected = [
        hf.apply_chat_template(chats[0], add_generation_prompt=True, tokenize=False, enable_thinking=False),
        hf.apply_chat_template(chats[1], continue_final_message=True, tokenize=False, enable_thinking=False),
    ]
    assert texts == expected and texts[0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert ids == [hf.encode(t, add_special_tokens=False) for t in expected]
    assert encode_prompts(examples[:1], ours)[1][0].endswith("<|im_start|>assistant\n")  # thinking on: no block


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"1": True}, r"data\.chat_template_kwargs: '1' is not a template variable name"),
        ({"enable-thinking": False}, r"'enable-thinking' is not a template variable name"),
        ({"add_generation_prompt": False}, r"data\.chat_template_kwargs\.add_generation_prompt is set by the prompt"),
        ({"messages": []}, r"data\.chat_template_kwargs\.messages is set by the prompt rendering itself"),
        (["enable_thinking"], r"data\.chat_template_kwargs must be a mapping"),
    ],
)
def test_bad_chat_template_kwargs_name_the_key(kwargs, match):
    from minigrpo.data import encode_prompts
    from minigrpo.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        encode_prompts([Example("Q?", "1")], FakeTokenizer(), None, kwargs)


def test_named_chat_templates_without_a_default_raise_as_in_transformers(smol_dir, tmp_path):
    """A folder whose chat templates are all named ("tool_use", "rag") and none "default": transformers
    refuses to render a prompt without a name; GRPO prompts used to fall back to the plain base-model text.
    A name given (data.chat_template_kwargs.chat_template) picks one, and tools pick "tool_use"."""
    from helpers.tok_fixtures import hf_tokenizer, tokenizer_variant

    from minigrpo.chat_template import ChatTemplateError
    from minigrpo.data import encode_prompts
    from minigrpo.tokenizer import Tokenizer

    named = [{"name": "tool_use", "template": "T{{ messages[0].content }}"}, {"name": "rag", "template": "R"}]
    d = tokenizer_variant(smol_dir, tmp_path / "named", {"chat_template": named})
    ours, hf = Tokenizer.from_dir(d), hf_tokenizer(d)
    messages = build_messages(Example("Q?", "1"))
    with pytest.raises(ValueError, match="no default specified"):
        hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with pytest.raises(ChatTemplateError, match=r"\['rag', 'tool_use'\] include no 'default' one"):
        render_prompt(messages, ours)
    with pytest.raises(ChatTemplateError, match="include no 'default' one"):
        encode_prompts([Example("Q?", "1")], ours)
    assert encode_prompts([Example("Q?", "1")], ours, None, {"chat_template": "rag"})[1] == ["R"]
    assert render_prompt(messages, ours, chat_template_kwargs={"tools": []}) == "TQ?"
    assert render_prompt(messages, hf, chat_template_kwargs={"tools": []}) == "TQ?"
