"""SFT (python -m minigrpo.sft), more cases: reasoning templates whose generation prompt opens the
reasoning, datasets kept as local hub snapshots."""

from __future__ import annotations

import pytest
import torch
from helpers.tok_fixtures import smollm2_checkpoint
from test_chat_template import QWEN3_TEMPLATE
from test_sft import spans

from minigrpo.config import Config
from minigrpo.data import Example, encode_prompts
from minigrpo.sft_data import load_conversations, tokenize_conversation
from minigrpo.tokenizer import Tokenizer

# QwQ's layout: a reply keeps its reasoning only when it is the last message, and the generation
# prompt opens the reasoning ("<think>\n") for the model to continue
QWQ_STYLE_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'assistant' %}{% set content = m.content %}"
    "{% if not loop.last %}{% set content = content.split('</think>')[-1].lstrip('\\n') %}{% endif %}"
    "{{ '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
)

TWO_TURNS = [
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "<think>\n2+3=5\n</think>\n\n<answer>5</answer>"},
    {"role": "user", "content": "And 4*4?"},
    {"role": "assistant", "content": "<think>\n4*4=16\n</think>\n\n<answer>16</answer>"},
]


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return smollm2_checkpoint().tokenizer()


def chatml(smol: Tokenizer, template: str) -> Tokenizer:
    return Tokenizer(smol.backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=template)


def test_qwen3_without_thinking_keeps_multi_turn_conversations(smol):
    """Qwen3 with enable_thinking=false: the generation prompt ends with an empty think block, which
    the whole conversation shows for the last reply only. An earlier reply learns its answer and end
    of turn, the last one what follows GRPO's prompt; the ids are those of the whole conversation."""
    tok = chatml(smol, QWEN3_TEMPLATE)
    variables = {"enable_thinking": False}
    messages = [{**m, "content": m["content"].split("\n\n")[-1]} if m["role"] == "assistant" else m for m in TWO_TURNS]
    ids, labels = tokenize_conversation(messages, tok, chat_template_kwargs=variables)
    assert [tok.decode(ids[a:b]) for a, b in spans(labels)] == [
        "<answer>5</answer><|im_end|>\n",
        "<answer>16</answer><|im_end|>\n",
    ]
    assert tok.decode(ids) == tok.apply_chat_template(messages, **variables)
    prompt = encode_prompts([Example(messages[:3], "")], tok, chat_template_kwargs=variables)[0][0]
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # the last reply follows exactly GRPO's prompt tokens (its "\n\n" one token, as GRPO's prompt ends)
    assert ids[: spans(labels)[-1][0]] == prompt


def test_a_generation_prompt_that_opens_the_reasoning_keeps_every_reply(smol):
    """QwQ / DeepSeek-R1 style: the generation prompt opens the reasoning ("<think>\\n"). The last reply
    continues it (its reasoning and answer learned after GRPO's prompt); an earlier reply, whose
    reasoning the conversation drops, learns its answer; a single reply without reasoning its text."""
    tok = chatml(smol, QWQ_STYLE_TEMPLATE)
    ids, labels = tokenize_conversation(TWO_TURNS, tok)
    assert [tok.decode(ids[a:b]) for a, b in spans(labels)] == [
        "<answer>5</answer><|im_end|>\n",
        "4*4=16\n</think>\n\n<answer>16</answer><|im_end|>\n",
    ]
    assert ids == tok.encode(tok.apply_chat_template(TWO_TURNS), add_special_tokens=False)
    prompt = encode_prompts([Example(TWO_TURNS[:3], "")], tok)[0][0]
    assert ids[: spans(labels)[-1][0]] == prompt

    single = [TWO_TURNS[0], {"role": "assistant", "content": "<answer>5</answer>"}]
    ids, labels = tokenize_conversation(single, tok)
    assert [tok.decode(ids[a:b]) for a, b in spans(labels)] == ["<answer>5</answer><|im_end|>\n"]


def test_a_hub_source_reads_a_downloaded_snapshot_folder_offline(tmp_path, monkeypatch):
    """sft.source=hub with sft.path naming a local snapshot (one folder per config, split files inside),
    as data.source=hub reads one: the split's rows of that config, and the hub is never asked."""
    import huggingface_hub
    import pyarrow as pa
    import pyarrow.parquet as pq

    def offline(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    for config, split, n in (("main", "train", 3), ("main", "test", 2), ("other", "train", 4)):
        rows = [{"prompt": f"{config} {split} {i}", "response": f"<answer>{i}</answer>", "id": i} for i in range(n)]
        folder = tmp_path / "snapshot" / config
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}-00000-of-00001.parquet")
    sft = {"source": "hub", "path": str(tmp_path / "snapshot"), "subset": "main", "format": "prompt_response"}
    examples = load_conversations(Config.from_dict({"sft": sft}))
    assert [ex.prompt[0]["content"] for ex in examples] == ["main train 0", "main train 1", "main train 2"]
    assert [ex.answer for ex in examples] == ["<answer>0</answer>", "<answer>1</answer>", "<answer>2</answer>"]
    assert examples[0].columns["where"].startswith(str(tmp_path / "snapshot" / "main" / "train-00000-of-00001"))


def test_a_resumed_sft_run_may_change_what_only_other_algorithms_read(tmp_path, monkeypatch):
    """SFT reads neither train.micro_batch_size (sft.micro_batch_size sizes its passes) nor
    `algorithm` and its sections, nor LoRA's settings with LoRA off: a config that changed them since the
    checkpoint resumes, and ends with the weights of a run that never stopped."""
    from test_sft import checkpoint_tensors, format_task, launch, sft_config

    import minigrpo.sft as sft_module

    format_task(tmp_path, n=12)
    steps = {"steps": 3, "lr": 0.003, "schedule": "cosine"}
    base = sft_config(tmp_path, name="sft", train=steps, sft={"batch_size": 4, "micro_batch_size": 2})
    base["checkpoint"] = {"every": 1, "keep_last": 5, "save_final": True}
    straight = {**base, "run": {**base["run"], "name": "straight"}}
    launch(tmp_path, "sft", straight)
    real_step = sft_module.train_step

    def dies_in_step_3(run, examples):
        if run.loader.consumed == 3 * 4:  # the third batch of 4 is drawn: the run dies in step 3
            raise RuntimeError("killed")
        return real_step(run, examples)

    monkeypatch.setattr(sft_module, "train_step", dies_in_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        launch(tmp_path, "sft", base)
    monkeypatch.setattr(sft_module, "train_step", real_step)
    changed = {
        **base,
        "train": {**steps, "micro_batch_size": 4},
        "algorithm": "ppo",
        "ppo": {"gamma": 0.9},
        "lora": {"enabled": False, "r": 4},  # read only with LoRA on
    }
    records = launch(tmp_path, "sft", changed, "--resume")
    assert [r["step"] for r in records] == [1, 2, 3]
    a = checkpoint_tensors(tmp_path / "runs" / "straight" / "checkpoints" / "step_000003")
    b = checkpoint_tensors(tmp_path / "runs" / "sft" / "checkpoints" / "step_000003")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- a reply begun in the prompt, conversations without loss -------------------------------------------------


def _begun_rows(tmp_path, rows: list[dict]) -> Config:
    import json

    path = tmp_path / "begun.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = {
        "source": "jsonl",
        "path": str(path),
        "format": "prompt_response",
        "prompt_field": "q",
        "response_field": "a",
    }
    return Config.from_dict({"sft": sft, "data": {"chat_template_kwargs": {"date_string": "01 Jan 2025"}}})


@pytest.mark.parametrize("template", ["chatml", "llama3.2", "plain"])
def test_a_reply_begun_in_the_prompt_is_continued_as_grpo_samples_it(tmp_path, smol, template):
    """A prompt that ends with an assistant message is a reply begun for the model: GRPO renders it with
    render_prompt(prefill=True) and samples its continuation. SFT trains on that layout: the prompt tokens
    are GRPO's, the loss is on the response and the end of turn only, and there is one assistant turn."""
    from test_chat_template import LLAMA32_TEMPLATE

    from minigrpo.sft_data import IGNORE, example_tokens

    templates = {"chatml": None, "llama3.2": LLAMA32_TEMPLATE, "plain": None}
    tok = (
        smol
        if template == "chatml"
        else Tokenizer(smol.backend, eos_token="<|im_end|>", chat_template=templates[template])
    )
    prompt = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "<think>\nThe sum"}]
    cfg = _begun_rows(tmp_path, [{"q": prompt, "a": " is 5.\n</think>\n<answer>5</answer>"}])
    (example,) = load_conversations(cfg)
    assert [m["role"] for m in example.prompt] == ["user", "assistant"]
    ids, labels = example_tokens(example, tok)
    grpo_prompt = encode_prompts([Example(prompt, "")], tok, chat_template_kwargs={"date_string": "01 Jan 2025"})[0][0]
    start = next(t for t, x in enumerate(labels) if x != IGNORE)
    assert ids[:start] == grpo_prompt and set(labels[:start]) == {IGNORE}
    assert labels[start:] == ids[start:]
    end_of_turn = {"chatml": "<|im_end|>\n", "llama3.2": "<|eot_id|>", "plain": "<|im_end|>"}[template]
    assert tok.decode(ids[start:]) == " is 5.\n</think>\n<answer>5</answer>" + end_of_turn


def test_a_begun_reply_the_template_renders_otherwise_is_refused_naming_the_row(tmp_path, smol):
    """Qwen3's template moves "<think>...</think>" out of the content of a finished reply, so the begun
    "<think>\\n" that GRPO continues is not where the whole reply puts it: one error naming the row."""
    from minigrpo.datafiles import DataError
    from minigrpo.sft_data import check_conversations

    tok = chatml(smol, QWEN3_TEMPLATE)
    prompt = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "<think>\n"}]
    examples = load_conversations(_begun_rows(tmp_path, [{"q": prompt, "a": "2+3=5\n</think>\n\n5"}]))
    with pytest.raises(DataError, match=r"begun\.jsonl:1: the chat template renders the prompt's begun reply"):
        check_conversations(examples, tok, max_seq_len=512)


def test_conversations_whose_only_reply_opens_them_are_counted_in_a_warning(tmp_path, smol):
    """An assistant turn that opens its conversation is context (nothing tells it from the template's glue),
    so a conversation with no other reply carries no loss: a warning counts them and names one."""
    import json

    from minigrpo.sft_data import check_conversations

    path = tmp_path / "chats.jsonl"
    rows = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        [{"role": "assistant", "content": "Ask me."}, {"role": "user", "content": "ok"}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    ]
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    examples = load_conversations(Config.from_dict({"sft": {"source": "jsonl", "path": str(path)}}))
    with pytest.warns(UserWarning) as record:
        check_conversations(examples, smol, max_seq_len=512)
    assert [str(w.message) for w in record] == [
        f"1 of 3 conversations have no assistant token to learn from (e.g. {path}:2): a reply that opens its "
        "conversation is context and an empty one may hold none, so they carry no loss"
    ]
