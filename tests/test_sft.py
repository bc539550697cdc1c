"""SFT (python -m minigrpo.sft): assistant-only labels, the fused loss against full logits, learning a
format that a following GRPO step is rewarded for, exact resume (full and LoRA), one-line CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers.cli import one_error_line, run_module
from helpers.runs import TIMING
from helpers.tiny import WORDS, tiny_model
from helpers.tok_fixtures import smollm2_checkpoint
from test_chat_template import QWEN3_TEMPLATE
from test_tokenizer import CHATML_TEMPLATE

from minigrpo.config import Config
from minigrpo.data import Example, encode_prompts
from minigrpo.datafiles import DataError
from minigrpo.errors import UserError
from minigrpo.memory_estimate import format_bytes
from minigrpo.models.loading import build_random, load_pretrained, save_pretrained
from minigrpo.sft_data import IGNORE, collate, load_conversations, row_to_conversation, tokenize_conversation
from minigrpo.tokenizer import Tokenizer

# ------------------------------------------------------------------------------------------------
# tokenizers: SmolLM2 (its own ChatML template), the same vocabulary with Qwen2.5's template, and a
# word-level one with a tiny template and the answer-format tags as whole tokens


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return smollm2_checkpoint().tokenizer()


@pytest.fixture(scope="module")
def qwen_style(smol) -> Tokenizer:
    return Tokenizer(smol.backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)


TAGS = ["<reasoning>", "</reasoning>", "<answer>", "</answer>"]
CHAT_WORDS = [*WORDS, "user", "assistant", "system", "be", "brief", *TAGS]
TINY_TEMPLATE = (
    "{% for m in messages %}{{ m.role + ' : ' + m.content + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant : ' }}{% endif %}"
)


def chat_tokenizer(template: str | None = TINY_TEMPLATE) -> Tokenizer:
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.WordLevel({w: i for i, w in enumerate(CHAT_WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_tokens([AddedToken(t, normalized=False) for t in TAGS])  # matched whole, kept by decode
    return Tokenizer(
        backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", chat_template=template
    )


def spans(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of every run of loss tokens."""
    out, start = [], None
    for i, x in enumerate([*labels, IGNORE]):
        if x != IGNORE and start is None:
            start = i
        elif x == IGNORE and start is not None:
            out.append((start, i))
            start = None
    return out


_CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
TOOL_CALL_CHAT = [  # a tool call, its result and the answer
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": None, "tool_calls": [_CALL]},
    {"role": "tool", "content": "5", "name": "add"},
    {"role": "assistant", "content": "<answer>5</answer>"},
]


def sft_cfg(**sft) -> Config:
    return Config.from_dict({"sft": sft})


# ------------------------------------------------------------------------------------------------
# assistant-only labels


@pytest.mark.parametrize("which", ["smol", "qwen_style"])
def test_prompt_response_row_labels_only_the_reply(which, request):
    tok = request.getfixturevalue(which)
    cfg = sft_cfg(format="prompt_response", prompt_field="q", response_field="a")
    messages = row_to_conversation("x:1", {"q": "What is 2+3?", "a": "<answer>5</answer>"}, cfg)
    ids, labels = tokenize_conversation(messages, tok)
    # the prompt part is exactly GRPO's prompt tokens (same text, same encoding)
    prompt_ids = encode_prompts([Example("What is 2+3?", "5")], tok)[0][0]
    assert spans(labels) == [(len(prompt_ids), len(ids))]
    assert ids[: len(prompt_ids)] == prompt_ids
    assert all(x == IGNORE for x in labels[: len(prompt_ids)])  # no prompt token carries loss
    assert labels[len(prompt_ids) :] == ids[len(prompt_ids) :]
    assert tok.decode(ids[len(prompt_ids) :]) == "<answer>5</answer><|im_end|>\n"  # the reply and its end of turn
    # the pieces tokenize as the whole rendered conversation does
    assert ids == tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)


@pytest.mark.parametrize("which", ["smol", "qwen_style"])
def test_multi_turn_messages_label_every_reply_and_nothing_else(which, request):
    tok = request.getfixturevalue(which)
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "<answer>5</answer>"},
            {"role": "user", "content": "And 4*4?"},
            {"role": "assistant", "content": "It is <answer>16</answer>"},
        ]
    }
    messages = row_to_conversation("x:1", row, sft_cfg())
    ids, labels = tokenize_conversation(messages, tok)
    found = spans(labels)
    assert [tok.decode(ids[a:b]) for a, b in found] == [
        "<answer>5</answer><|im_end|>\n",
        "It is <answer>16</answer><|im_end|>\n",
    ]
    # each reply starts right after the generation prompt of its prefix: exact token positions
    for (a, _), turns in zip(found, (2, 4)):
        prefix = encode_prompts([Example(messages[1:turns], "")], tok, "Be brief.")[0][0]
        assert a == len(prefix) and ids[:a] == prefix
    # every other token carries no loss; the text outside the spans is the template's scaffolding
    outside = [i for i in range(len(ids)) if not any(a <= i < b for a, b in found)]
    assert all(labels[i] == IGNORE for i in outside)
    assert "What is 2+3?" in tok.decode([ids[i] for i in outside])
    assert ids == tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)


@pytest.mark.parametrize("which", ["qwen_style", "plain"])
def test_prompt_response_rows_learn_the_response_only(tmp_path, which, request):
    """Assistant turns inside a prompt (few-shot answers) are context, as in the prompt GRPO samples from:
    the prompt is GRPO's prompt tokens and only the response carries loss."""
    from minigrpo.sft_data import example_tokens, load_conversations

    tok = request.getfixturevalue(which) if which != "plain" else chat_tokenizer(template=None)
    shots = [
        {"role": "user", "content": "What is 1+1?"},
        {"role": "assistant", "content": "<answer>2</answer>"},
        {"role": "user", "content": "What is 2+3?"},
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": shots, "response": "<answer>5</answer>"}])
    (example,) = load_conversations(sft_cfg(format="prompt_response", path=str(data)))
    ids, labels = example_tokens(example, tok)
    prompt = encode_prompts([Example(shots, "5")], tok)[0][0]
    assert ids[: len(prompt)] == prompt and spans(labels) == [(len(prompt), len(ids))]
    reply = "<answer>5</answer><|im_end|>\n" if which != "plain" else "<answer> 5 </answer> </s>"
    assert tok.decode(ids[len(prompt) :], skip_special_tokens=False) == reply


def test_phi3_template_closing_eos_keeps_multi_turn_conversations(qwen_style):
    """Phi-3-mini's template ends a conversation without a generation prompt with EOS, which no earlier turn
    has inside the whole text: every reply carries loss up to its <|end|>, the last one with the EOS too."""
    from test_chat_template import PHI3_TEMPLATE

    tok = Tokenizer(qwen_style.backend, eos_token="<|endoftext|>", chat_template=PHI3_TEMPLATE)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "<answer>5</answer>"},
        {"role": "user", "content": "And 4*4?"},
        {"role": "assistant", "content": "<answer>16</answer>"},
    ]
    ids, labels = tokenize_conversation(messages, tok)
    found = spans(labels)
    assert [tok.decode(ids[a:b], skip_special_tokens=False) for a, b in found] == [
        "<answer>5</answer><|end|>\n",
        "<answer>16</answer><|end|>\n<|endoftext|>",
    ]
    for (a, _), turns in zip(found, (2, 4)):  # each reply starts where GRPO's prompt of its prefix ends
        assert ids[:a] == encode_prompts([Example(messages[1:turns], "")], tok, "Be brief.")[0][0]
    assert ids == tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)


def test_tool_calls_and_tool_results_reach_the_chat_template(tmp_path, qwen_style):
    """An assistant turn that calls a tool (content null, `tool_calls`) learns the call as Qwen2.5's template
    writes it, and the tool's result is context: the message fields beside role and content are kept."""
    from test_chat_template import QWEN25_TEMPLATE

    from minigrpo.sft_data import example_tokens, load_conversations

    tok = Tokenizer(qwen_style.backend, eos_token="<|im_end|>", chat_template=QWEN25_TEMPLATE)
    chat = TOOL_CALL_CHAT
    data = write_jsonl(tmp_path / "tools.jsonl", [{"messages": chat}])
    (example,) = load_conversations(sft_cfg(path=str(data)))
    ids, labels = example_tokens(example, tok)
    assert [tok.decode(ids[a:b]) for a, b in spans(labels)] == [
        '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>\n',
        "<answer>5</answer><|im_end|>\n",
    ]
    outside = tok.decode([x for x, y in zip(ids, labels) if y == IGNORE])
    assert "<tool_response>\n5\n</tool_response>" in outside


def test_a_reply_that_opens_the_conversation_is_context(qwen_style):
    """An opening assistant turn has no prefix whose generation header marks where it starts: the template
    glue before it (here Qwen's default system prompt and the assistant header) must not carry loss."""
    messages = [
        {"role": "assistant", "content": "Hi, ask me."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<answer>4</answer>"},
    ]
    ids, labels = tokenize_conversation(messages, qwen_style)
    assert [qwen_style.decode(ids[a:b]) for a, b in spans(labels)] == ["<answer>4</answer><|im_end|>\n"]
    assert ids == qwen_style.encode(qwen_style.apply_chat_template(messages), add_special_tokens=False)


def test_reasoning_templates_keep_multi_turn_conversations(smol):
    """Qwen3's template drops the reasoning of every reply but the last: an earlier reply learns what the
    whole conversation shows of it (answer and end of turn), the last one its reasoning too; the ids are
    those of the whole conversation. A template that rewrites an earlier answer is still refused."""
    tok = Tokenizer(smol.backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN3_TEMPLATE)
    messages = [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "<think>\n2+3=5\n</think>\n\n<answer>5</answer>"},
        {"role": "user", "content": "And 4*4?"},
        {"role": "assistant", "content": "<answer>16</answer>", "reasoning_content": "4*4=16"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": ""},
    ]
    ids, labels = tokenize_conversation(messages, tok)
    assert [tok.decode(ids[a:b]) for a, b in spans(labels)] == [
        "<answer>5</answer><|im_end|>\n",
        "<answer>16</answer><|im_end|>\n",
        "<think>\n\n</think>\n\n<|im_end|>\n",
    ]
    assert ids == tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    prompt = encode_prompts([Example(messages[:5], "")], tok)[0][0]  # GRPO's prompt of the last turn
    assert ids[: spans(labels)[-1][0]] == prompt

    drop = ("{{- '<|im_start|>' + message.role + '\\n' + content }}", "{{- '<|im_start|>' + message.role + '\\n' }}")
    rewrites = QWEN3_TEMPLATE.replace(*drop)  # earlier answers dropped: their end of turn alone is left
    assert rewrites != QWEN3_TEMPLATE
    tok = Tokenizer(smol.backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=rewrites)
    with pytest.raises(DataError, match="renders assistant turn 1 differently"):
        tokenize_conversation(messages, tok)


PARTS_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for p in m.content %}{% if p.type == 'text' %}{{ p.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_content_given_as_text_parts_is_one_text(tmp_path_factory):
    """Messages whose content is a list of parts [{"type": "text", ...}] (the multimodal layout) train as
    the same conversation with each content one text, rendered as a parts-reading template (transformers)
    renders the parts; a part that is not text is an error naming the row."""
    from helpers.tok_fixtures import hf_tokenizer, smollm2_tokenizer_dir, tokenizer_variant

    folder = tokenizer_variant(smollm2_tokenizer_dir(tmp_path_factory), tmp_path_factory.mktemp("parts") / "tok")
    (folder / "chat_template.jinja").write_text(PARTS_TEMPLATE)
    tok, hf = Tokenizer.from_dir(folder), hf_tokenizer(folder)
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+3?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<answer>5</answer>"}]},
    ]
    messages = row_to_conversation("x.jsonl:1", {"messages": parts}, sft_cfg())
    assert [m["content"] for m in messages] == ["What is 2+3?", "<answer>5</answer>"]
    assert tok.apply_chat_template(messages) == hf.apply_chat_template(parts, tokenize=False)
    ids, labels = tokenize_conversation(messages, tok)
    assert ids == hf.apply_chat_template(parts, return_dict=False)
    assert [tok.decode(ids[a:b]) for a, b in spans(labels)] == ["<answer>5</answer><|im_end|>\n"]
    image = [{**parts[0], "content": [{"type": "image", "url": "a.png"}]}, parts[1]]
    with pytest.raises(DataError, match=r"x\.jsonl:1: message 0 has a content part that is not text"):
        row_to_conversation("x.jsonl:1", {"messages": image}, sft_cfg())


def metaspace_tokenizer(template: str | None) -> Tokenizer:
    """SentencePiece-style: a Metaspace pre-tokenizer (prepend_scheme="first", as in Llama-2 / Mistral
    conversions) over one token per character."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    chars = ["<unk>", "<s>", "</s>", *"▁abcdefghijklmnopqrstuvwxyz?"]
    backend = Backend(models.BPE({c: i for i, c in enumerate(chars)}, [], unk_token="<unk>"))  # one token a char
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    backend.add_special_tokens(["[INST]", "[/INST]"])
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", chat_template=template)


def test_a_sentencepiece_style_tokenizer_starts_no_reply_with_a_space():
    """A Metaspace pre-tokenizer marks the start of a text with "▁": each piece encoded on its own would
    start every reply with a space token that the rendered conversation, and what the model generates
    after its prompt, does not have."""
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}{{ '[INST] ' + m.content + '[/INST]' }}"
        "{% else %}{{ m.content + eos_token }}{% endif %}{% endfor %}"
    )
    tok = metaspace_tokenizer(template)
    messages = [
        {"role": "user", "content": "why?"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "so?"},
        {"role": "assistant", "content": "yes"},
    ]
    ids, labels = tokenize_conversation(messages, tok)
    assert [tok.id_to_token(x) for x in labels if x != IGNORE] == ["o", "k", "</s>", "y", "e", "s", "</s>"]
    assert ids == tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    assert ids[: spans(labels)[0][0]] == encode_prompts([Example("why?", "")], tok)[0][0]  # GRPO's prompt


def test_a_base_sentencepiece_tokenizer_encodes_the_prompt_as_grpo_and_the_reply_without_a_space():
    """Without a chat template: the system and user contents are one text (GRPO's plain prompt, BOS
    first), and the reply follows it without the "▁" a text of its own would start with."""
    tok = metaspace_tokenizer(None)
    messages = [
        {"role": "system", "content": "be"},
        {"role": "user", "content": "why?"},
        {"role": "assistant", "content": "ok"},
    ]
    ids, labels = tokenize_conversation(messages, tok)
    prompt = encode_prompts([Example("why?", "")], tok, "be")[0][0]
    assert ids[: len(prompt)] == prompt and spans(labels) == [(len(prompt), len(ids))]
    assert [tok.id_to_token(x) for x in labels if x != IGNORE] == ["o", "k", "</s>"]


def test_system_prompt_replaces_the_rows_and_max_seq_len_cuts():
    tok = chat_tokenizer()
    cfg = sft_cfg(system_prompt="be brief")
    row = {
        "messages": [
            {"role": "system", "content": "repeat"},
            {"role": "user", "content": "repeat 7"},
            {"role": "assistant", "content": "7"},
        ]
    }
    messages = row_to_conversation("x:1", row, cfg)
    assert messages[0] == {"role": "system", "content": "be brief"} and len(messages) == 3
    ids, labels = tokenize_conversation(messages, tok)
    assert tok.decode(ids) == "system : be brief </s> user : repeat 7 </s> assistant : 7 </s>"
    assert [tok.id_to_token(x) for x in labels if x != IGNORE] == ["7", "</s>"]
    cut_ids, cut_labels = tokenize_conversation(messages, tok, max_seq_len=len(ids) - 1)
    assert cut_ids == ids[:-1] and cut_labels == labels[:-1]


def test_without_a_chat_template_the_turns_join_as_grpo_prompts_do():
    tok = chat_tokenizer(template=None)
    messages = [{"role": "user", "content": "repeat 7"}, {"role": "assistant", "content": "7"}]
    ids, labels = tokenize_conversation(messages, tok)
    prompt = encode_prompts([Example("repeat 7", "7")], tok)[0][0]  # plain text
    assert ids == [*prompt, tok.token_to_id("7"), tok.eos_token_id]
    assert labels == [IGNORE] * len(prompt) + [tok.token_to_id("7"), tok.eos_token_id]


# ------------------------------------------------------------------------------------------------
# the loss


def test_loss_equals_full_logits_cross_entropy_in_fp64():
    from minigrpo.sft import sft_loss_sum

    torch.manual_seed(0)
    model = tiny_model(seed=3)
    rows = []
    for n, first_loss in ((9, 4), (6, 2), (12, 7)):
        ids = torch.randint(3, 128, (n,)).tolist()
        rows.append((ids, [IGNORE] * first_loss + ids[first_loss:]))
    ids, mask, labels = collate(rows, pad_id=0)  # right-padded (3, 12)
    weight = model.output_weight
    loss = sft_loss_sum(model, ids, mask, labels)
    (g_kernel,) = torch.autograd.grad(loss, weight)

    # reference: per sequence, unpadded, full logits in fp64
    ref = torch.zeros((), dtype=torch.float64)
    for seq, lab in rows:
        h = model.hidden(torch.tensor([seq]))[0].double()  # (n, D)
        logits = h @ weight.double().T  # (n, V)
        target = torch.tensor(lab[1:])
        ref = ref + torch.nn.functional.cross_entropy(logits[:-1], target, ignore_index=IGNORE, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref, weight)
    n_tokens = sum(sum(x != IGNORE for x in lab[1:]) for _, lab in rows)
    assert n_tokens == 5 + 4 + 5
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()), (loss.item(), ref.item())
    assert ((g_kernel.double() - g_ref).norm() / g_ref.norm()).item() < 1e-5


# ------------------------------------------------------------------------------------------------
# runs through the entry points


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def format_task(tmp_path: Path, n: int = 64) -> None:
    """A tiny model with the chat tokenizer, SFT conversations in the answer format, GRPO prompts."""
    model = build_random(_tiny_chat_config(), seed=0)
    save_pretrained(model, chat_tokenizer(), tmp_path / "base")
    digits = [i % 10 for i in range(n)]
    conversations = [
        {
            "messages": [
                {"role": "user", "content": f"repeat {d}"},
                {"role": "assistant", "content": f"<reasoning> {d} </reasoning> <answer> {d} </answer>"},
            ]
        }
        for d in digits
    ]
    write_jsonl(tmp_path / "sft.jsonl", conversations)
    write_jsonl(tmp_path / "grpo.jsonl", [{"question": f"repeat {d}", "answer": str(d)} for d in digits])


def _tiny_chat_config() -> dict:
    from helpers.tiny import tiny_config

    return tiny_config(vocab_size=len(CHAT_WORDS))


def sft_config(tmp_path: Path, name: str = "sft", **sections) -> dict:
    cfg = {
        "run": {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 0, "device": "cpu"},
        "model": {"name_or_path": str(tmp_path / "base")},
        "sft": {"source": "jsonl", "path": str(tmp_path / "sft.jsonl"), "batch_size": 16, "micro_batch_size": 8},
        "train": {"steps": 30, "lr": 0.003, "max_grad_norm": 1.0},
        "log": {"plots": False, "progress": False, "sample_every": 0},
        "checkpoint": {"every": 0, "save_final": True},
    }
    for key, values in sections.items():
        cfg[key] = {**cfg.get(key, {}), **values} if isinstance(values, dict) else values
    return cfg


def launch(tmp_path: Path, module: str, cfg: dict, *extra: str) -> list[dict]:
    """The entry point's main() in this process; the run's metrics.jsonl records."""
    path = tmp_path / f"{cfg['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if module == "sft":
        from minigrpo.sft import main
    else:
        from minigrpo.train import main
    main(["--config", str(path), *extra])
    lines = (Path(cfg["run"]["output_dir"]) / cfg["run"]["name"] / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def first_grpo_reward(tmp_path: Path, name: str, model: Path) -> float:
    """The mean soft_format reward of one GRPO step's rollouts (sampled before its update)."""
    cfg = {
        "run": {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 0, "device": "cpu"},
        "model": {"name_or_path": str(model)},
        "data": {"source": "jsonl", "path": str(tmp_path / "grpo.jsonl"), "eval_split": None},
        "sampler": {"temperature": 1.0, "max_new_tokens": 10},
        "grpo": {"prompts_per_step": 8, "group_size": 4},
        "rewards": [{"name": "soft_format"}],
        "train": {"steps": 1, "lr": 1e-4, "micro_batch_size": 32},
        "log": {"plots": False, "progress": False, "sample_every": 0},
        "checkpoint": {"every": 0, "save_final": False},
    }
    return launch(tmp_path, "train", cfg)[0]["reward"]


def test_sft_learns_the_format_and_grpo_starts_from_it(tmp_path):
    format_task(tmp_path)
    records = launch(tmp_path, "sft", sft_config(tmp_path))
    losses = [r["loss"] for r in records]
    assert len(losses) == 30 and all(r["loss_tokens"] > 0 for r in records)
    assert losses[-1] < 0.1 * losses[0], [round(x, 3) for x in losses]
    out = tmp_path / "runs" / "sft" / "model"  # the run's output: a plain checkpoint with the tokenizer
    assert (out / "config.json").is_file() and (tmp_path / "runs" / "sft" / "checkpoints" / "step_000030").is_dir()
    before = first_grpo_reward(tmp_path, "grpo_base", tmp_path / "base")
    after = first_grpo_reward(tmp_path, "grpo_sft", out)
    assert before <= 0.05 and after >= 0.4, (before, after)  # soft_format pays 0.5 for the format


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    assert tensors, f"no weights in {folder}"
    return tensors


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.3}},  # dropout: the RNG must be restored
        {"lora": {"enabled": True, "r": 4, "alpha": 8, "quantize_base": "nf4"}},  # QLoRA: the NF4 base re-quantized
        {"run": {"dtype": "bfloat16"}},  # bf16 weights, fp32 masters from the optimizer state
    ],
    ids=["full", "lora_dropout", "qlora", "bf16_masters"],
)
def test_crashed_run_resumes_to_identical_weights_and_metrics(tmp_path, monkeypatch, variant):
    """A run that dies in step 3 and resumes from its step-2 checkpoint ends where an uninterrupted run
    ends: bitwise equal weights, equal metrics (cosine schedule, shuffled data, LoRA dropout)."""
    import minigrpo.sft as sft_module
    from minigrpo import quant

    quant._probe.cache_clear()  # QLoRA: the 4-bit probe (random inputs) runs in the first run, as in a fresh process
    format_task(tmp_path, n=20)  # 20 conversations, 8 per step: steps cross epoch boundaries
    base = sft_config(
        tmp_path,
        train={"steps": 4, "lr": 0.003, "schedule": "cosine", "warmup_steps": 1},
        sft={"batch_size": 8, "micro_batch_size": 4},
        checkpoint={"every": 2, "keep_last": 5, "save_final": True},
        **variant,
    )
    straight = launch(tmp_path, "sft", {**base, "run": {**base["run"], "name": "straight"}})

    crashed = {**base, "run": {**base["run"], "name": "crashed"}}
    real_step, calls = sft_module.train_step, []

    def dies_in_step_3(run, examples):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real_step(run, examples)

    monkeypatch.setattr(sft_module, "train_step", dies_in_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        launch(tmp_path, "sft", crashed)
    monkeypatch.setattr(sft_module, "train_step", real_step)
    runs = tmp_path / "runs"
    assert [p.name for p in sorted((runs / "crashed" / "checkpoints").iterdir())] == ["step_000002"]
    resumed = launch(tmp_path, "sft", crashed, "--resume")

    def plain(records):
        return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in records]

    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert plain(resumed) == plain(straight)
    a = checkpoint_tensors(runs / "straight" / "checkpoints" / "step_000004")
    b = checkpoint_tensors(runs / "crashed" / "checkpoints" / "step_000004")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    if "lora" in variant:
        assert all("lora_" in k for k in a)  # the checkpoints hold the adapter only
    # the output is a plain checkpoint (LoRA: merged) that loads as a model and differs from the base
    base_model, _ = load_pretrained(tmp_path / "base")
    tuned, tokenizer = load_pretrained(runs / "crashed" / "model")
    assert tokenizer is not None and tokenizer.chat_template == TINY_TEMPLATE
    ids = torch.randint(3, 20, (2, 6))
    with torch.no_grad():
        assert (tuned(ids) - base_model(ids)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# mistakes: one `error:` line through the real entry point, before any weights load


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"sft": {"path": "gone.jsonl"}}, "gone.jsonl"),
        ({"sft": {"messages_field": "conversation"}}, "no field 'conversation'"),
        ({"sft": {"format": "prompt_response"}}, "sft.prompt_field"),
        ({"sft": {"batchsize": 4}}, "did you mean 'sft.batch_size'"),
        ({"sft": {"path": None}}, "sft.path"),
        ({"sft": {"batch_size": 6, "micro_batch_size": 4}}, "must divide sft.batch_size"),
        ({"sft": {"path": "blank.jsonl"}}, "blank.jsonl holds no conversation"),
    ],
    ids=["missing_file", "bad_messages_column", "bad_prompt_column", "bad_key", "no_path", "micro_batch", "empty_file"],
)
def test_mistakes_are_one_line(tmp_path, change, expected):
    write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    (tmp_path / "blank.jsonl").write_text("")
    (tmp_path / "base").mkdir()  # never read: the data is checked first
    cfg = sft_config(tmp_path)
    for key, values in change.items():
        cfg[key] = {**cfg[key], **values}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    message = one_error_line(run_module("minigrpo.sft", "--config", str(path), cwd=tmp_path))
    assert expected in message, message


def test_a_conversation_without_a_reply_is_named_with_its_line(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "7"}]}] * 2
    write_jsonl(tmp_path / "sft.jsonl", [*rows, {"messages": [{"role": "user", "content": "hi"}]}])
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(sft_config(tmp_path)))
    message = one_error_line(run_module("minigrpo.sft", "--config", str(path), cwd=tmp_path))
    assert "sft.jsonl:3" in message and "no assistant turn" in message, message


def _no_weights_read(monkeypatch) -> None:
    def read_weights(*args, **kwargs):
        raise AssertionError("weights were read before the mistake was reported")

    monkeypatch.setattr("minigrpo.models.loading._fill", read_weights)


def _main_error(tmp_path: Path, cfg: dict, capsys) -> str:
    """The one `error:` line of python -m minigrpo.sft's main() run in this process."""
    from minigrpo.sft import main

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as info:
        main(["--config", str(path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err.removeprefix("error: ").strip()


def test_a_conversation_the_chat_template_fails_on_is_named_before_the_weights_load(tmp_path, monkeypatch, capsys):
    from minigrpo.chat_template import ChatTemplateError
    from minigrpo.sft import check_before_loading

    no_tools = (
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tool turns') }}{% endif %}{% endfor %}"
    )
    save_pretrained(
        build_random(_tiny_chat_config(), seed=0), chat_tokenizer(no_tools + TINY_TEMPLATE), tmp_path / "base"
    )
    good = {"messages": [{"role": "user", "content": "repeat 7"}, {"role": "assistant", "content": "7"}]}
    tool = {"role": "tool", "content": "7"}
    bad = {"messages": [good["messages"][0], tool, good["messages"][1]]}
    data = write_jsonl(tmp_path / "sft.jsonl", [good, good, bad, good])
    _no_weights_read(monkeypatch)
    cfg = sft_config(tmp_path)
    with pytest.raises(ChatTemplateError) as e:
        check_before_loading(Config.from_dict(cfg))
    template = tmp_path / "base" / "tokenizer_config.json"  # the file the template was read from
    problem = f"the model's chat template fails on this conversation: {template}: chat template raised: no tool turns"
    assert str(e.value) == f"{data}:3: {problem}"
    assert _main_error(tmp_path, cfg, capsys) == str(e.value)


def _replies_after(tmp_path: Path, prompts: list[str]) -> Path:
    """A model with the chat tokenizer and one conversation per prompt, answered '7'."""
    save_pretrained(build_random(_tiny_chat_config(), seed=0), chat_tokenizer(), tmp_path / "base")
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "7"}]} for p in prompts]
    return write_jsonl(tmp_path / "sft.jsonl", rows)


def test_a_max_seq_len_that_cuts_away_every_reply_names_the_key_before_the_weights_load(tmp_path, monkeypatch, capsys):
    from minigrpo.sft import check_before_loading

    _replies_after(tmp_path, ["repeat 7", "repeat 7 7", "what is 7"])  # 'user : repeat 7 </s> assistant :' = 7 tokens
    _no_weights_read(monkeypatch)
    cfg = sft_config(tmp_path, sft={"max_seq_len": 7, "batch_size": 2, "micro_batch_size": 2})
    with pytest.raises(UserError) as e:
        check_before_loading(Config.from_dict(cfg))
    assert str(e.value) == (
        "sft.max_seq_len=7 cuts every conversation before its first assistant token, so nothing would be "
        "learned: the earliest reply starts at token 7 (set sft.max_seq_len >= 8)"
    )
    assert _main_error(tmp_path, cfg, capsys) == str(e.value)


def test_a_max_seq_len_that_cuts_away_some_replies_is_one_warning(tmp_path, monkeypatch):
    from minigrpo.sft import check_before_loading

    data = _replies_after(tmp_path, ["repeat 7", "repeat 7 7", "what is 7", "repeat 1 2 3"])
    _no_weights_read(monkeypatch)
    cfg = sft_config(tmp_path, sft={"max_seq_len": 8, "batch_size": 2, "micro_batch_size": 2})
    with pytest.warns(UserWarning) as record:
        _, examples, checked = check_before_loading(Config.from_dict(cfg))
    assert (
        checked
        and len(examples) == 4
        and [str(w.message) for w in record]
        == [f"sft.max_seq_len=8 cuts every assistant token of 3 of 4 conversations (e.g. {data}:2): they carry no loss"]
    )


def test_the_config_pair_hands_the_sft_output_to_grpo():
    from minigrpo.config import load_config
    from minigrpo.sft import FINAL_MODEL

    root = Path(__file__).resolve().parents[1] / "configs"
    sft = load_config(root / "smollm2_sft_format.yaml")
    grpo = load_config(root / "smollm2_format_grpo.yaml")
    assert Path(grpo.model.name_or_path) == sft.run.run_dir / FINAL_MODEL
    assert grpo.data.synthetic == sft.data.synthetic and sft.sft.source == "synthetic"
    # the SFT reply is exactly the layout the GRPO config rewards
    from minigrpo.reward_fns import strict_format

    reply = sft.sft.response_template.format(expression="12 + 30", answer="42")
    assert [r.name for r in grpo.rewards] == ["correctness", "strict_format"]
    assert strict_format([""], [reply], ["42"]) == [0.5]


def test_parquet_and_jsonl_files_give_the_same_conversations(tmp_path):
    """sft.source=parquet reads the same rows as jsonl, for `messages` and for prompt/response columns."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    from minigrpo.sft_data import load_conversations

    chats = [
        [
            {"role": "user", "content": f"what is {i} + 1?"},
            {"role": "assistant", "content": f"<answer>{i + 1}</answer>"},
        ]
        for i in range(5)
    ]
    pairs = [{"question": f"q{i}", "reply": f"r{i}"} for i in range(4)]
    for name, rows, columns in (
        ("chat", [{"messages": c} for c in chats], {"format": "messages"}),
        ("pairs", pairs, {"format": "prompt_response", "prompt_field": "question", "response_field": "reply"}),
    ):
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{name}.parquet")
        got = {
            source: load_conversations(sft_cfg(source=source, path=str(tmp_path / f"{name}.{source}"), **columns))
            for source in ("jsonl", "parquet")
        }
        assert [e.prompt for e in got["parquet"]] == [e.prompt for e in got["jsonl"]]
        assert [e.answer for e in got["parquet"]] == [e.answer for e in got["jsonl"]]
        assert len(got["parquet"]) == len(rows)
    assert got["parquet"][3].answer == "r3" and got["parquet"][3].prompt[-1]["content"] == "r3"


# ------------------------------------------------------------------------------------------------
# the model's limits: positions, memory; what the metrics count


def test_cut_frac_counts_only_the_conversations_max_seq_len_cuts(tmp_path):
    """Conversations of 9 and 10 tokens under sft.max_seq_len=9: one is cut (not both: the one exactly
    max_seq_len long is whole)."""
    _replies_after(tmp_path, ["repeat 7", "repeat 7 7"])  # 'user : repeat 7 </s> assistant : 7 </s>' = 9 tokens
    cfg = sft_config(
        tmp_path, sft={"max_seq_len": 9, "batch_size": 2, "micro_batch_size": 2, "shuffle": False}, train={"steps": 1}
    )
    (record,) = launch(tmp_path, "sft", cfg)  # the cut one keeps its reply, loses its end-of-turn token
    assert (record["seq_len_max"], record["seq_len_mean"], record["cut_frac"]) == (9.0, 9.0, 0.5)
    whole = sft_config(tmp_path, name="whole", sft={"max_seq_len": 10, "batch_size": 2, "micro_batch_size": 2})
    (record,) = launch(tmp_path, "sft", {**whole, "train": {**whole["train"], "steps": 1}})
    assert (record["seq_len_max"], record["cut_frac"]) == (10.0, 0.0)


def test_conversations_longer_than_the_models_positions_are_refused_before_the_weights_load(
    tmp_path, monkeypatch, capsys
):
    """A model of max_position_embeddings=9 and conversations of 9 and 10 tokens: the default
    sft.max_seq_len (1024) would feed it position 9, which it never saw; max_seq_len=9 runs."""
    from helpers.tiny import tiny_config

    from minigrpo.sft import build_run, check_before_loading

    data = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "7"}]}
            for p in ("repeat 7", "repeat 7 7")
        ],
    )
    model = build_random(tiny_config(vocab_size=len(CHAT_WORDS), max_position_embeddings=9), seed=0)
    save_pretrained(model, chat_tokenizer(), tmp_path / "base")
    cfg = sft_config(tmp_path, sft={"batch_size": 2, "micro_batch_size": 2})
    expected = (
        f"{data}:2 takes 10 positions with sft.max_seq_len=1024, more than the model's max_position_embeddings=9; "
        "set sft.max_seq_len=9 (longer conversations are cut there)"
    )
    real_fill = __import__("minigrpo.models.loading", fromlist=["_fill"])._fill
    _no_weights_read(monkeypatch)
    with pytest.raises(UserError) as e:
        check_before_loading(Config.from_dict(cfg))
    assert str(e.value) == expected
    assert _main_error(tmp_path, cfg, capsys) == expected
    monkeypatch.setattr("minigrpo.models.loading._fill", real_fill)
    with pytest.raises(UserError, match="takes 10 positions"):  # a hub or GGUF model: checked once it is loaded
        build_run(Config.from_dict(cfg), None, load_conversations(Config.from_dict(cfg)), checked=False)
    fits = sft_config(tmp_path, sft={"batch_size": 2, "micro_batch_size": 2, "max_seq_len": 9})
    assert check_before_loading(Config.from_dict(fits))[2]


def test_a_step_that_cannot_fit_on_the_gpu_is_refused_before_the_weights_load(tmp_path, monkeypatch):
    """On CUDA the memory pre-flight runs with the conversations' longest row, before any weights load,
    and names SFT's settings; given the memory it needs, the run goes on."""
    import minigrpo.sft as sft_module
    from minigrpo import memory
    from minigrpo.models.args import ModelArgs

    _replies_after(tmp_path, ["repeat 7", "repeat 7 7", "what is 7"])
    cfg = Config.from_dict(sft_config(tmp_path, sft={"batch_size": 2, "micro_batch_size": 2}))
    monkeypatch.setattr(sft_module, "pick_device", lambda name: torch.device("cuda"))
    args = ModelArgs.from_hf_config(json.loads((tmp_path / "base" / "config.json").read_text()))
    need = memory.estimate_sft_peak(cfg, args, seq_len=10).total  # the longest conversation: 10 tokens
    assert need == memory.estimate_sft_peak(cfg, args, seq_len=10, device_type="cuda").total > 2**26
    _no_weights_read(monkeypatch)
    monkeypatch.setattr(memory, "_device_memory", lambda device: (need, 80 * 2**30))  # less the 5% margin
    with pytest.raises(memory.MemoryPreflightError) as e:
        sft_module.check_before_loading(cfg)
    assert f"predicted to need {format_bytes(need)}" in str(e.value) and "grpo." not in str(e.value)
    monkeypatch.setattr(memory, "_device_memory", lambda device: (int(need / 0.95) + 1, 80 * 2**30))
    assert sft_module.check_before_loading(cfg)[2]


def test_a_resumed_sft_run_may_lower_what_a_step_holds_in_memory(tmp_path):
    """Checkpointing, offload and the micro-batch size change memory, not the step's mean loss: a
    resumed SFT run may switch them; its learning rate may not change."""
    format_task(tmp_path, n=20)
    sizes = {"batch_size": 8, "micro_batch_size": 4}
    base = sft_config(tmp_path, train={"steps": 1}, sft=sizes, checkpoint={"every": 1})
    launch(tmp_path, "sft", base)
    resumed = {**base, "train": {**base["train"], "steps": 2}, "sft": {**base["sft"], "micro_batch_size": 2}}
    resumed["model"] = {**base["model"], "gradient_checkpointing": True, "activation_offload": True}
    assert [r["step"] for r in launch(tmp_path, "sft", resumed, "--resume")] == [1, 2]
    changed_lr = {**resumed, "train": {**resumed["train"], "steps": 3, "lr": 0.1}}
    with pytest.raises(SystemExit):
        launch(tmp_path, "sft", changed_lr, "--resume")


def test_ctrl_c_in_sft_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    """Ctrl-C in step 3 (checkpoints every 2): exit status 130 with one line naming the checkpoint,
    metrics of steps 1-2 only, and --resume runs steps 3 and 4."""
    import minigrpo.sft as sft_module

    format_task(tmp_path, n=20)
    cfg = sft_config(
        tmp_path, train={"steps": 4}, sft={"batch_size": 8, "micro_batch_size": 4}, checkpoint={"every": 2}
    )
    real_step, calls = sft_module.train_step, []

    def ctrl_c_in_step_3(run, examples):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(run, examples)

    monkeypatch.setattr(sft_module, "train_step", ctrl_c_in_step_3)
    with pytest.raises(SystemExit) as exit_info:
        launch(tmp_path, "sft", cfg)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    checkpoint = tmp_path / "runs" / "sft" / "checkpoints" / "step_000002"
    assert err[-1] == f"interrupted: continue from {checkpoint} with --resume", err
    monkeypatch.setattr(sft_module, "train_step", real_step)
    assert [r["step"] for r in launch(tmp_path, "sft", cfg, "--resume")] == [1, 2, 3, 4]


def test_ctrl_c_while_sft_writes_its_model_says_what_resume_writes(tmp_path, monkeypatch, capsys):
    """Ctrl-C after the final checkpoint, while run_dir/model is written: the line names the missing
    model folder and --resume (not "continue from" a run with no step left); after --resume, which writes
    it, the same question has the run complete."""
    import minigrpo.sft as sft_module
    from minigrpo.bookkeeping import how_to_go_on
    from minigrpo.config import load_config

    format_task(tmp_path, n=20)
    cfg = sft_config(tmp_path, train={"steps": 2}, sft={"batch_size": 8, "micro_batch_size": 4})

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sft_module, "write_final_model", ctrl_c)
    with pytest.raises(SystemExit) as exit_info:
        launch(tmp_path, "sft", cfg)
    run = tmp_path / "runs" / "sft"
    final = run / "checkpoints" / "step_000002"
    assert exit_info.value.code == 130 and not (run / "model").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"interrupted: {run} ran to train.steps=2 ({final}) but lacks model: rerun with --resume, which writes "
        "it from that checkpoint"
    ), err
    monkeypatch.undo()
    launch(tmp_path, "sft", cfg, "--resume")
    assert (run / "model" / "config.json").is_file()
    loaded = load_config(run / "config.yaml")
    assert how_to_go_on(run, loaded, (sft_module.FINAL_MODEL,)) == (
        f"the run is complete: {run} ran to train.steps=2; its final model is {run / 'model'}"
    )


@pytest.mark.parametrize("eval_split", ["test", None])
def test_synthetic_sft_never_trains_on_the_questions_grpo_evaluates(eval_split):
    """With an eval split, GRPO's eval prompts are expressions held out of training (minigrpo/synthetic.py):
    the SFT warm-up on the same task must not learn them either; without one it draws from the whole space,
    as GRPO's training does."""
    from minigrpo.data import build_dataset

    cfg = Config.from_dict({"sft": {"source": "synthetic"}, "data": {"source": "synthetic", "eval_split": eval_split}})
    sft_expressions = {m["content"] for ex in load_conversations(cfg) for m in ex.prompt if m["role"] == "user"}
    grpo_train = {ex.prompt for ex in build_dataset(cfg.data)}
    if eval_split is None:
        assert sft_expressions == grpo_train and len(sft_expressions) == 155
    else:
        held_out = {ex.prompt for ex in build_dataset(cfg.data, split=eval_split)}
        assert held_out and not sft_expressions & held_out
        assert sft_expressions == grpo_train


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_sft_on_a_missing_gpu_says_so_before_reading_the_conversations(tmp_path):
    """As training does: the device first, so a CPU machine reads no data for a CUDA run."""
    from minigrpo.sft import check_before_loading

    missing = tmp_path / "nowhere.jsonl"
    cfg = Config.from_dict({"run": {"device": "cuda"}, "sft": {"source": "jsonl", "path": str(missing)}})
    with pytest.raises(UserError, match=r"^run.device='cuda' but CUDA is not available"):
        check_before_loading(cfg)


# ------------------------------------------------------------------------------------------------
# what reaches the chat template: a row's tools, data.chat_template_kwargs, named templates

SFT_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers <a+b>",
            "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
        },
    }
]


def test_a_tools_column_reaches_the_chat_template_as_in_transformers(tmp_path, smol):
    """A row's `tools` (a list, or JSON text of one) are the function definitions the template shows in the
    system turn; they used to be dropped, so tool-calling data trained without them. The ids equal
    transformers' apply_chat_template(tools=...), and the definitions carry no loss."""
    from helpers.tok_fixtures import hf_tokenizer
    from test_chat_template import QWEN25_TEMPLATE

    from minigrpo.sft_data import example_tokens

    Tokenizer(smol.backend, eos_token="<|im_end|>", chat_template=QWEN25_TEMPLATE).save(tmp_path / "tok")
    tok, hf = Tokenizer.from_dir(tmp_path / "tok"), hf_tokenizer(tmp_path / "tok")
    chat = TOOL_CALL_CHAT
    rows = [{"messages": chat, "tools": SFT_TOOLS}, {"messages": chat, "tools": json.dumps(SFT_TOOLS)}]
    expected = hf.apply_chat_template(chat, tools=SFT_TOOLS, return_dict=False)
    for example in load_conversations(sft_cfg(path=str(write_jsonl(tmp_path / "t.jsonl", rows)))):
        ids, labels = example_tokens(example, tok)
        assert ids == expected
        context = tok.decode([x for x, y in zip(ids, labels) if y == IGNORE])
        assert '"description": "Add two numbers <a+b>"' in context and "# Tools" in context
        assert [tok.decode(ids[a:b]) for a, b in spans(labels)] == [
            '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>\n',
            "<answer>5</answer><|im_end|>\n",
        ]


@pytest.mark.parametrize(
    ("tools", "match"),
    [
        ({"name": "add"}, "field 'tools' must be a list of function definitions"),
        (["add"], "field 'tools' must be a list of function definitions"),
        ("[{'name': 'add'}]", "field 'tools' is text but not JSON"),
    ],
)
def test_a_malformed_tools_column_names_the_row(tmp_path, tools, match):
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    data = write_jsonl(tmp_path / "t.jsonl", [{"messages": chat}, {"messages": chat, "tools": tools}])
    with pytest.raises(DataError, match=r"t\.jsonl:2: " + match):
        load_conversations(sft_cfg(path=str(data)))


def test_sft_renders_with_data_chat_template_kwargs_as_grpo_prompts_do(tmp_path, smol):
    """With data.chat_template_kwargs={enable_thinking: false} the reply starts after the empty think block
    of the generation header, exactly where the GRPO prompt (rendered with the same variables) ends."""
    from minigrpo.sft_data import example_tokens

    tok = Tokenizer(smol.backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN3_TEMPLATE)
    rows = [{"q": "What is 2+3?", "a": "<answer>5</answer>"}]
    raw = {"sft": {"path": str(write_jsonl(tmp_path / "p.jsonl", rows)), "format": "prompt_response"}}
    raw["sft"] |= {"prompt_field": "q", "response_field": "a"}
    off = Config.from_dict({**raw, "data": {"chat_template_kwargs": {"enable_thinking": False}}})
    (example,) = load_conversations(off)
    ids, labels = example_tokens(example, tok)
    prompt = encode_prompts([Example("What is 2+3?", "5")], tok, None, {"enable_thinking": False})[0][0]
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert ids[: len(prompt)] == prompt and spans(labels) == [(len(prompt), len(ids))]
    assert tok.decode(ids[len(prompt) :]) == "<answer>5</answer><|im_end|>\n"
    (default,) = load_conversations(Config.from_dict(raw))  # thinking on: the reply holds the empty block
    ids, labels = example_tokens(default, tok)
    assert [tok.decode(ids[a:b]) for a, b in spans(labels)] == ["<think>\n\n</think>\n\n<answer>5</answer><|im_end|>\n"]


def test_named_chat_templates_without_a_default_fail_instead_of_plain_text(smol):
    """Only named templates ("tool_use") and no default: the conversation is refused with the template
    error (as transformers refuses it), not trained in the plain base-model layout; its tools pick it."""
    from minigrpo.chat_template import ChatTemplateError

    named = {"tool_use": CHATML_TEMPLATE}
    tok = Tokenizer(smol.backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=named)
    messages = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "<answer>5</answer>"}]
    with pytest.raises(ChatTemplateError, match=r"\['tool_use'\] include no 'default' one"):
        tokenize_conversation(messages, tok)
    ids, labels = tokenize_conversation(messages, tok, chat_template_kwargs={"tools": SFT_TOOLS})
    assert ids == tok.apply_chat_template(messages, tools=SFT_TOOLS, tokenize=True)
    assert [tok.decode(ids[a:b]) for a, b in spans(labels)] == ["<answer>5</answer><|im_end|>\n"]
