"""Prompts on the way in, against transformers: a begun reply that a reasoning model's template rewrites,
and dataset messages carrying values JSON has no type for (a parquet timestamp, bytes, a decimal)."""

# ruff: noqa: E501  (the template is kept as the model ships it)
from __future__ import annotations

import dataclasses
import datetime
import decimal

import pytest
from helpers.tok_fixtures import hf_tokenizer, smollm2_tokenizer_dir, tokenizer_variant

from minigrpo.chat_template import ChatTemplateError, check_template_variables, render_chat_template
from minigrpo.config import Config, DataCfg
from minigrpo.data import Example, build_dataset, build_messages, encode_prompts, render_prompt
from minigrpo.errors import ConfigError
from minigrpo.prompt_fit import prompts_that_fit
from minigrpo.tokenizer import Tokenizer

# DeepSeek-R1-Distill-Qwen's template (tool branches left out): an assistant message keeps only what follows
# its "</think>", and the generation prompt opens the think block
R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)
DUMP_TEMPLATE = "{% for m in messages %}{{ m | tojson }}\n{% endfor %}{{ extra | tojson }}"


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory):
    return smollm2_tokenizer_dir(tmp_path_factory)


@pytest.fixture()
def r1_dir(tmp_path, smol_dir):
    return tokenizer_variant(smol_dir, tmp_path / "r1", {"chat_template": R1_TEMPLATE})


# ---- a begun reply the template rewrites -----------------------------------------------------------------------


@pytest.mark.parametrize("reply", ["<think>\n", "<think>\nLet me add", "The answer is "])
def test_a_begun_reply_the_template_keeps_is_continued_as_transformers_does(r1_dir, reply):
    """DeepSeek-R1's template keeps a reply with no "</think>": the prompt stops inside it, as in transformers."""
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": reply}]
    hf = hf_tokenizer(r1_dir)
    expected = hf.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    ours = Tokenizer.from_dir(r1_dir)
    assert render_prompt(messages, ours, prefill=True) == render_prompt(messages, hf, prefill=True) == expected
    assert expected.endswith("<｜Assistant｜>" + reply)  # this template keeps the trailing space


def test_a_begun_reply_the_template_rewrites_is_refused_as_in_transformers(r1_dir):
    """DeepSeek-R1's template drops the thinking of a reply that holds "</think>": transformers' continue_final_message
    refuses it, and so must the rollout's prompt (it rendered '<｜Assistant｜>\\n\\nThe answer is ', the thinking gone)."""
    reply = "<think>\nplan: add them</think>\n\nThe answer is "
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": reply}]
    hf = hf_tokenizer(r1_dir)
    with pytest.raises(ValueError, match="does not appear in the chat"):
        hf.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    ours = Tokenizer.from_dir(r1_dir)
    for tokenizer in (ours, hf):
        with pytest.raises(ChatTemplateError, match=r"rewrites the begun assistant reply '<think>\\nplan"):
            render_prompt(messages, tokenizer, prefill=True)
    cfg = Config()
    examples = [Example("What is 1 + 1?", "2"), Example(messages, "4")]
    with pytest.raises(ChatTemplateError, match=r"^the model's chat template fails on the prompt '\[\{\"role\"") as e:
        prompts_that_fit(cfg, examples, ours)  # names the prompt, in one line
    assert "\n" not in str(e.value)


# ---- values JSON has no type for -------------------------------------------------------------------------------


@dataclasses.dataclass
class Meta:
    source: str
    level: int


RICH = {
    "sent": datetime.datetime(2024, 5, 1, 12, 0),
    "day": datetime.date(2024, 5, 1),
    "blob": b"\x00\x01",
    "price": decimal.Decimal("1.5"),
    "meta": Meta("gsm8k", 3),
}


def test_rich_values_in_messages_render_as_transformers_renders_them(tmp_path, smol_dir):
    """transformers renders a value JSON has no type for as a placeholder naming its type, and a dataclass as
    its fields; we raised a bare TypeError (a traceback) on the first such message."""
    d = tokenizer_variant(smol_dir, tmp_path / "dump", {"chat_template": DUMP_TEMPLATE})
    messages = [{"role": "user", "content": "q", **RICH}]
    ours, hf = Tokenizer.from_dir(d), hf_tokenizer(d)
    expected = hf.apply_chat_template(messages, tokenize=False, extra=[RICH["sent"], 1])
    assert ours.apply_chat_template(messages, extra=[RICH["sent"], 1]) == expected
    assert '"sent": "<datetime>", "day": "<date>", "blob": "<bytes>", "price": "<Decimal>"' in expected
    assert '"meta": {"source": "gsm8k", "level": 3}' in expected and expected.endswith('["<datetime>", 1]')
    assert render_chat_template("{{ tools | tojson }}", messages, tools=[{"at": RICH["day"]}]) == '[{"at": "<date>"}]'


def test_a_parquet_prompt_with_a_timestamp_encodes_as_transformers(tmp_path, smol_dir):
    """A parquet message struct with a timestamp loads (the loader keeps it): its prompt must render and encode
    as transformers' apply_chat_template does, not stop the run with a TypeError."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    chats = [[{"role": "user", "content": f"What is {i} + {i}?", "sent": RICH["sent"]}] for i in range(3)]
    pq.write_table(pa.table({"question": chats, "answer": [str(2 * i) for i in range(3)]}), tmp_path / "train.parquet")
    examples = build_dataset(DataCfg(source="parquet", path=str(tmp_path)))
    ours, hf = Tokenizer.from_dir(smol_dir), hf_tokenizer(smol_dir)
    ids, texts = encode_prompts(examples, ours, "Be brief.")
    for ex, row_ids, text in zip(examples, ids, texts, strict=True):
        messages = build_messages(ex, "Be brief.")
        assert text == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert row_ids == hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    cfg = Config()
    cfg.data.system_prompt = "Be brief."
    kept, longest = prompts_that_fit(cfg, examples, ours)
    assert len(kept) == 3 and longest == max(map(len, ids))


def test_config_template_variables_stay_strict():
    """A config's template variable must be plain data: a YAML date left unquoted is named, not rendered as <date>."""
    with pytest.raises(ConfigError, match=r"data\.chat_template_kwargs\.date_string: .* got date"):
        check_template_variables({"date_string": datetime.date(2025, 1, 1)}, "data.chat_template_kwargs")
