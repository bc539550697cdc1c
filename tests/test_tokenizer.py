"""Tokenizer vs transformers' fast tokenizer on the same files: ids, special tokens, stop ids, chat templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.tok_fixtures import gsm8k_strings, hf_tokenizer, smollm2_tokenizer_dir
from tokenizers import Regex, decoders, models, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import pre_tokenizers as pt

from minigrpo.errors import UserError
from minigrpo.tokenizer import ChatTemplateError, Tokenizer

GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"

TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines\n\n\n",
    "many     spaces      here",
    "digits 0123456789 and 3.14159, 1,000,000; -42",
    "  6 apples and ¾ cup, ½ price, ² superscript, ٣ arabic-indic",
    "unicode: café naïve Zürich — “quotes” ‘single’ … 日本語のテキスト 😀👍🏽 Ελληνικά русский",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nprint(f(3))\n",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "I'm sure you'll see they've done it; she'd said we're OK. DON'T SHOUT",
    "special inline: <|im_start|>user\nhi<|im_end|>\n<|endoftext|> and <|im_start|",
    "Janet’s ducks lay 16 eggs per day. #### 18",
]

SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
    "<|im_start|>",
    "<|im_end|>",
]
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog while 12345 apples cost $3.50 each!",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "def solve(x):\n    return x * 2  # double it\n\nfor i in range(10):\n    print(solve(i))\n",
    "You are a helpful assistant. Cutting Knowledge Date: December 2023. Today Date: 26 Jul 2024.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "café naïve Zürich 日本語 Ελληνικά русский — “quotes” and ‘single’ … 😀",
]

# ---- chat templates (data; the same kind of templates the models ship) ----------------------------------

CHATML_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "system" and loop.first %}
        {%- continue %}
    {%- elif message.role in ["user", "system"] or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- for tool_call in message.tool_calls %}
            {{- '\\n<tool_call>\\n{"name": "' + tool_call.function.name + '", "arguments": ' }}
            {{- tool_call.function.arguments | tojson(indent=2) }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- else %}
        {{- raise_exception('Unsupported role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Unsupported role: ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

PHI3_TEMPLATE = """{% for message in messages %}
    {% if message['role'] == 'system' %}
        {{- '<|system|>\n' + message['content'] + '<|end|>\n' -}}
    {% elif message['role'] == 'user' %}
        {{- '<|user|>\n' + message['content'] + '<|end|>\n' -}}
    {% elif message['role'] == 'assistant' %}
        {{- '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' -}}
    {% else %}
        {{- raise_exception('Unsupported role: ' + message['role']) }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|assistant|>\n' -}}
{% else %}
    {{- eos_token -}}
{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You solve math."},
        {"role": "user", "content": "Natalia sold 48 clips. Half as many in May. Total?"},
        {"role": "assistant", "content": "48 + 24 = 72\n#### 72"},
        {"role": "user", "content": "And in June, 10 more than May?"},
    ],
    [{"role": "user", "content": "Unicode — café 😀 <b>bold</b> & 'quotes'", "name": None}],
]


# ---- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory):
    return smollm2_tokenizer_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def llama3_backend():
    """A small Llama-3-style byte-level BPE trained here: Llama-3 regex, BOS added by the post-processor."""
    tk = BackendTokenizer(models.BPE(ignore_merges=True))
    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.pre_tokenizer = pt.Sequence([pt.Split(Regex(LLAMA3_REGEX), behavior="isolated"), byte_level])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=SPECIAL, initial_alphabet=pt.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(CORPUS * 20, trainer)
    bos = "<|begin_of_text|>"
    tk.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A:0 {bos}:1 $B:1", special_tokens=[(bos, tk.token_to_id(bos))]
            ),
        ]
    )
    return tk


def write_dir(path: Path, backend: BackendTokenizer, config: dict, generation: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    return path


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory, llama3_backend):
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}
    ids = [llama3_backend.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    generation = {"bos_token_id": llama3_backend.token_to_id("<|begin_of_text|>"), "eos_token_id": ids}
    return write_dir(tmp_path_factory.mktemp("llama3"), llama3_backend, config, generation)


def assert_same_as_hf(ours: Tokenizer, hf, texts: list[str]) -> None:
    for special in (True, False):
        expected = hf(texts, add_special_tokens=special)["input_ids"]
        assert ours.encode_batch(texts, add_special_tokens=special) == expected
        assert [ours.encode(t, add_special_tokens=special) for t in texts[:50]] == expected[:50]
    ids = ours.encode_batch(texts, add_special_tokens=False)
    for skip in (False, True):
        assert ours.decode_batch(ids, skip_special_tokens=skip) == hf.batch_decode(ids, skip_special_tokens=skip)


# ---- encode / decode ---------------------------------------------------------------------------------------


def test_smollm2_encode_decode_match_transformers(smol_dir):
    from transformers import PreTrainedTokenizerFast

    ours = Tokenizer.from_dir(smol_dir)
    assert_same_as_hf(ours, hf_tokenizer(smol_dir), TEXTS)
    assert_same_as_hf(ours, PreTrainedTokenizerFast(tokenizer_file=str(smol_dir / "tokenizer.json")), TEXTS)
    for text in TEXTS:
        if "<|" not in text:
            assert ours.decode(ours.encode(text)) == text
    # SmolLM2 adds no BOS; specials in text are single tokens and skippable
    assert not ours.add_bos_token and ours.encode("hi") == ours.encode("hi", add_special_tokens=False)
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 5
    assert ours.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert (ours.vocab_size, len(ours), ours.token_to_id("<|im_end|>"), ours.id_to_token(2)) == (
        49152,
        49152,
        2,
        "<|im_end|>",
    )
    assert ours.id_to_token(10**6) is None and ours.token_to_id("no such token") is None


def test_gsm8k_matches_transformers(smol_dir):
    texts = gsm8k_strings(GSM8K_DIR, "test")
    if not texts:
        pytest.skip(f"no GSM8K data in {GSM8K_DIR}")
    assert len(texts) == 2 * 1319
    ours = Tokenizer.from_dir(smol_dir)
    ids = ours.encode_batch(texts)
    assert ids == hf_tokenizer(smol_dir)(texts)["input_ids"]
    assert ours.decode_batch(ids) == texts
    assert sum(map(len, ids)) > 200_000  # real text, not a vacuous pass


def test_llama3_style_bos_and_stop_ids(llama3_dir, llama3_backend):
    ours = Tokenizer.from_dir(llama3_dir)
    assert_same_as_hf(ours, hf_tokenizer(llama3_dir), TEXTS)
    bos, eot = llama3_backend.token_to_id("<|begin_of_text|>"), llama3_backend.token_to_id("<|eot_id|>")
    plain = ours.encode("Hello world", add_special_tokens=False)
    assert ours.encode("Hello world") == [bos, *plain] and bos not in plain
    assert ours.add_bos_token and not ours.add_eos_token
    expected_stops = sorted(llama3_backend.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"))
    assert list(ours.stop_ids) == expected_stops and len(ours.stop_ids) == 3
    assert (ours.eos_token_id, ours.bos_token_id) == (eot, bos)
    # no pad token in the config: pad falls back to eos (transformers leaves it None)
    assert (ours.pad_token, ours.pad_token_id) == ("<|eot_id|>", eot)
    no_bos = Tokenizer(llama3_backend, bos_token="<|begin_of_text|>", add_bos_token=False)
    assert no_bos.encode("Hello world") == plain and not no_bos.add_bos_token
    assert ours.generation_config() == {"bos_token_id": bos, "eos_token_id": expected_stops, "pad_token_id": eot}


def test_config_add_bos_flag_follows_transformers(tmp_path, llama3_backend):
    """tokenizer_config.json's add_bos_token is ignored next to tokenizer.json; an explicit argument is not."""
    backend = BackendTokenizer.from_str(llama3_backend.to_str())
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True}
    d = write_dir(tmp_path / "nobos", backend, config, generation={"eos_token_id": 1})
    ours, hf = Tokenizer.from_dir(d), hf_tokenizer(d)
    assert ours.encode("Hello") == hf("Hello")["input_ids"] == ours.encode("Hello", add_special_tokens=False)
    assert not ours.add_bos_token and ours.stop_ids == (1,)

    forced = Tokenizer(backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", add_bos_token=True)
    hf_forced = hf_tokenizer(d, add_bos_token=True)
    assert forced.encode("Hello") == hf_forced("Hello")["input_ids"] == [0, *ours.encode("Hello")]
    both = Tokenizer(backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", add_eos_token=True)
    assert both.encode("Hello") == [*ours.encode("Hello"), 1] and both.add_eos_token


def test_special_tokens_from_dicts_and_legacy_map(tmp_path, llama3_backend):
    bos = {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": False, "special": True}
    config = {"bos_token": bos, "eos_token": "<|im_end|>"}
    d = write_dir(tmp_path / "legacy", llama3_backend, config)
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|end|>"}}))
    ours, hf = Tokenizer.from_dir(d), hf_tokenizer(d)
    assert (ours.bos_token, ours.eos_token) == (hf.bos_token, hf.eos_token) == ("<|begin_of_text|>", "<|end|>")
    assert ours.eos_token_id == hf.eos_token_id == llama3_backend.token_to_id("<|end|>")


def test_errors(tmp_path, llama3_backend):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="'<nope>' is not in the tokenizer's vocabulary"):
        Tokenizer(llama3_backend, eos_token="<nope>")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Tokenizer(llama3_backend, eos_token="<|eot_id|>", extra_stop_ids=[10**6])
    with pytest.raises(ChatTemplateError, match="no chat template"):
        Tokenizer(llama3_backend).apply_chat_template([{"role": "user", "content": "hi"}])
    assert issubclass(ChatTemplateError, UserError) and issubclass(ChatTemplateError, ValueError)


def test_a_stop_id_above_the_token_count_of_a_vocabulary_with_gaps():
    """Ids may leave gaps (an added token placed past a hole): the count of tokens is no bound on the ids,
    so a stop token above it is one; an id no token has is refused."""
    backend = BackendTokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2, "<end>": 9}, unk_token="<unk>"))
    assert backend.get_vocab_size(with_added_tokens=True) == 4
    tok = Tokenizer(backend, eos_token="<end>")
    assert tok.eos_token_id == 9 and tok.stop_ids == (9,)
    with pytest.raises(ValueError, match=r"stop ids \[5\] are outside the vocabulary"):
        Tokenizer(backend, eos_token="<end>", extra_stop_ids=[5])


# ---- chat templates ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template_dirs(tmp_path_factory, llama3_backend):
    base = tmp_path_factory.mktemp("templates")
    specs = {
        "chatml": {"eos_token": "<|im_end|>", "pad_token": "<|end_of_text|>", "chat_template": CHATML_TEMPLATE},
        "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE},
        "phi3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "chat_template": PHI3_TEMPLATE},
    }
    return {name: write_dir(base / name, llama3_backend, cfg) for name, cfg in specs.items()}


@pytest.mark.parametrize("name", ["chatml", "llama3", "phi3"])
def test_chat_template_matches_transformers(template_dirs, name):
    ours, hf = Tokenizer.from_dir(template_dirs[name]), hf_tokenizer(template_dirs[name])
    assert ours.chat_template == hf.chat_template
    for conversation in CONVERSATIONS:
        for gen in (False, True):
            text = ours.apply_chat_template(conversation, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(conversation, add_generation_prompt=gen, tokenize=False)
            ids = ours.apply_chat_template(conversation, add_generation_prompt=gen, tokenize=True)
            assert ids == hf.apply_chat_template(conversation, add_generation_prompt=gen, return_dict=False)
            assert ids == ours.encode(text, add_special_tokens=False)
    text = ours.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True)
    expected_start = {
        "chatml": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>",
        "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: Dec",
        "phi3": "<|user|>\nWhat is 2+3?<|end|>\n<|assistant|>\n",
    }[name]
    assert text.startswith(expected_start)


def test_chat_template_kwargs_and_tools(template_dirs):
    ours, hf = Tokenizer.from_dir(template_dirs["chatml"]), hf_tokenizer(template_dirs["chatml"])
    tools = [{"type": "function", "function": {"name": "add", "description": "a+b <é>", "parameters": {}}}]
    call = {"function": {"name": "add", "arguments": {"a": 1, "b": "ü"}}}
    chat = [
        {"role": "user", "content": "add"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "user", "content": "thanks"},
    ]
    text = ours.apply_chat_template(chat, tools=tools, add_generation_prompt=True)
    assert text == hf.apply_chat_template(chat, tools=tools, add_generation_prompt=True, tokenize=False)
    assert '"description": "a+b <é>"' in text  # tojson: no HTML escaping, no ASCII escaping
    assert '{\n  "a": 1,\n  "b": "ü"\n}' in text  # tojson(indent=2)

    llama = Tokenizer.from_dir(template_dirs["llama3"])
    hf_llama = hf_tokenizer(template_dirs["llama3"])
    fixed = llama.apply_chat_template(CONVERSATIONS[0], date_string="01 Jan 2025")
    assert "Today Date: 01 Jan 2025\n" in fixed
    assert fixed == hf_llama.apply_chat_template(CONVERSATIONS[0], date_string="01 Jan 2025", tokenize=False)


@pytest.mark.parametrize("name", ["chatml", "llama3", "phi3"])
def test_chat_template_raise_exception(template_dirs, name):
    ours = Tokenizer.from_dir(template_dirs[name])
    with pytest.raises(ChatTemplateError, match="Unsupported role: robot"):
        ours.apply_chat_template([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__base__ }}",
        "{% set ns = namespace(__class__=1) %}{{ ns }}",
        "{% set ns = namespace(a=1) %}{% set ns._x = 2 %}{{ ns }}",
        "{% set x = [] %}{{ x.append(1) }}",
        "{{ dict.__call__.__globals__ }}",
        "{% for m in messages %}{{ m.content",  # does not parse
    ],
)
def test_chat_template_sandbox_blocks(llama3_backend, template):
    tok = Tokenizer(llama3_backend, chat_template=template)
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("template", ["{{ messages.__class__ }}", "{{ raise_exception.__globals__ }}", "{{ ''.mro }}"])
def test_chat_template_sandbox_hides_internals(llama3_backend, template):
    # the sandbox renders an unsafe attribute as undefined (empty); using it any further raises (above)
    tok = Tokenizer(llama3_backend, chat_template=template)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == ""


def test_chat_template_sandbox_allows_normal_use(llama3_backend):
    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
        "{{ ns.n }}|{{ dict(a=1) | tojson }}|{{ messages[0].content | upper }}"
        "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}|{{ extra }}"
    )
    tok = Tokenizer(llama3_backend, chat_template=template)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}] * 3, extra="e") == '3|{"a": 1}|X01|e'


def test_named_templates_and_jinja_file(tmp_path, llama3_backend):
    named = [{"name": "default", "template": "D{{ messages|length }}"}, {"name": "tool_use", "template": "T"}]
    d = write_dir(tmp_path / "named", llama3_backend, {"eos_token": "<|eot_id|>", "chat_template": named})
    tok, msgs = Tokenizer.from_dir(d), [{"role": "user", "content": "x"}]
    assert (tok.apply_chat_template(msgs), tok.apply_chat_template(msgs, chat_template="tool_use")) == ("D1", "T")
    assert tok.apply_chat_template(msgs, chat_template="{{ 'inline' }}") == "inline"
    (d / "chat_template.jinja").write_text("J{{ eos_token }}")  # a .jinja file wins, as in transformers
    assert (
        Tokenizer.from_dir(d).apply_chat_template(msgs)
        == "J<|eot_id|>"
        == hf_tokenizer(d).apply_chat_template(msgs, tokenize=False)
    )


# ---- save -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["smollm2", "llama3"])
def test_save_roundtrip_with_transformers(tmp_path, smol_dir, llama3_dir, which):
    ours = Tokenizer.from_dir(smol_dir if which == "smollm2" else llama3_dir)
    ours.save(tmp_path / "saved")
    hf, again = hf_tokenizer(tmp_path / "saved"), Tokenizer.from_dir(tmp_path / "saved")
    assert_same_as_hf(ours, hf, TEXTS)
    assert ours.encode_batch(TEXTS) == again.encode_batch(TEXTS)
    assert hf.chat_template == again.chat_template == ours.chat_template is not None
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (ours.bos_token, ours.eos_token, ours.pad_token)
    assert again.add_bos_token == ours.add_bos_token == (which == "llama3")
    msgs = CONVERSATIONS[2]
    assert again.apply_chat_template(msgs, add_generation_prompt=True) == hf.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False
    )
    # stop ids beyond eos live in generation_config.json, which the model saver writes
    assert again.stop_ids == (ours.eos_token_id,)


def test_reasoning_fields_are_aliased_like_transformers(tmp_path, llama3_backend):
    template = (
        "{% for m in messages %}{{ m.role }}:{{ m.reasoning_content }}|{{ m.thinking }}|{{ m.content }};{% endfor %}"
    )
    d = write_dir(tmp_path / "think", llama3_backend, {"eos_token": "<|eot_id|>", "chat_template": template})
    chat = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning": "r1"},
        {"role": "assistant", "content": "b", "thinking": "t2", "reasoning_content": "rc2"},
    ]
    ours = Tokenizer.from_dir(d).apply_chat_template(chat)
    assert ours == hf_tokenizer(d).apply_chat_template(chat, tokenize=False)
    assert ours == "user:||q;assistant:r1|r1|a;assistant:rc2|t2|b;"


def test_a_tokenizer_folder_parses_each_file_once(tmp_path, llama3_backend, monkeypatch):
    """load_tokenizer_folder checks every file and builds the tokenizer from one read of each."""
    from collections import Counter

    from minigrpo.models.tokenizer_files import load_tokenizer_folder

    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    generation = {"eos_token_id": [llama3_backend.token_to_id("<|eot_id|>")]}
    d = write_dir(tmp_path / "tok", llama3_backend, config, generation)
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    reads = Counter()
    read_text, read_bytes = Path.read_text, Path.read_bytes
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.update([self.name]) or read_text(self, *a, **k))
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.update([self.name]) or read_bytes(self))
    tok = load_tokenizer_folder(d)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    expected = ["tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja"]
    assert {name: reads[name] for name in expected} == dict.fromkeys(expected, 1)


# ---- tokenizer_config.json's added_tokens_decoder -------------------------------------------------------------


def _added(content: str, **flags) -> dict:
    return {"content": content, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False, **flags}


ADDED_TEXTS = ["c<tool_call>d", "a <tool_call> b</tool_call>", "x <|im_end|> y", "x<|im_end|>  y", "<think>\nhm"]


def test_added_tokens_missing_from_tokenizer_json_are_added_as_in_transformers(tmp_path, smol_dir):
    """A token that only tokenizer_config.json's added_tokens_decoder lists is added at its id, and a listed
    token whose flags differ from tokenizer.json's (rstrip on <|im_end|>) takes the config's, as transformers
    does; both used to be ignored (vocab 49152 vs 49153, "c<tool_call>d" split into pieces)."""
    from helpers.tok_fixtures import tokenizer_variant

    decoder = {
        "2": _added("<|im_end|>", special=True, rstrip=True),
        "49152": _added("<tool_call>"),
        "49153": _added("</tool_call>", special=True),
    }
    d = tokenizer_variant(smol_dir, tmp_path / "added", {"added_tokens_decoder": decoder, "eos_token": "<|im_end|>"})
    ours, hf = Tokenizer.from_dir(d), hf_tokenizer(d)
    assert ours.vocab_size == len(hf) == 49154
    assert (ours.token_to_id("<tool_call>"), ours.token_to_id("</tool_call>")) == (49152, 49153)
    assert ours.encode("c<tool_call>d") == hf.encode("c<tool_call>d") == [83, 49152, 84]
    assert ours.encode("x <|im_end|> y") == hf.encode("x <|im_end|> y") == [104, 216, 2, 105]  # rstrip ate " "
    assert_same_as_hf(ours, hf, ADDED_TEXTS + TEXTS)
    assert ours.decode(ours.encode("a<tool_call>b</tool_call>"), skip_special_tokens=True) == "a<tool_call>b"


@pytest.mark.parametrize(
    ("decoder", "match"),
    [
        ({"49160": _added("<tool_call>")}, r"added_tokens_decoder\[49160\] '<tool_call>' is not in tokenizer.json "),
        ({"x": _added("<tool_call>")}, r"added_tokens_decoder key 'x' is not a token id"),
        ({"49152": {"content": ""}}, r"added_tokens_decoder\['49152'\] must be"),
        ({"49152": _added("<t>", rstrip="yes")}, r"added_tokens_decoder\['49152'\]: rstrip='yes'"),
        ([{"content": "<t>"}], r"added_tokens_decoder must map token ids to tokens"),
    ],
)
def test_added_tokens_that_make_no_tokenizer_name_the_file_and_token(tmp_path, smol_dir, decoder, match):
    """A token tokenizer.json lacks at an id that is not the next free one would get another id than the
    model's embedding row for it: one line naming the file and token, as for every malformed entry."""
    from helpers.tok_fixtures import tokenizer_variant

    from minigrpo.tokenizer_config import TokenizerConfigError

    d = tokenizer_variant(smol_dir, tmp_path / "bad", {"added_tokens_decoder": decoder})
    with pytest.raises(TokenizerConfigError, match=r"tokenizer_config\.json: " + match) as err:
        Tokenizer.from_dir(d)
    assert "\n" not in str(err.value)


def test_a_named_token_that_is_an_added_token_keeps_its_matching_flags(tmp_path, llama3_backend):
    """eos/pad naming an added token that is not special yet: it becomes special (skipped on decode) but keeps
    how it is matched in text, single_word and normalized included, as in transformers; they used to be reset
    (normalized=False: "<eot>" in lowercased text no longer matched; single_word dropped: "<x>c" matched)."""
    from tokenizers import AddedToken, normalizers

    backend = BackendTokenizer.from_str(llama3_backend.to_str())
    backend.normalizer = normalizers.Lowercase()
    backend.add_tokens([AddedToken("<EOT>", normalized=True), AddedToken("<x>", lstrip=True, single_word=True)])
    d = write_dir(tmp_path / "flags", backend, {"eos_token": "<EOT>", "pad_token": "<x>"})
    ours, hf = Tokenizer.from_dir(d), hf_tokenizer(d)
    eot, x = backend.token_to_id("<EOT>"), backend.token_to_id("<x>")
    assert eot in ours.encode("a<eot>b", add_special_tokens=False)  # normalized: matched after lowercasing
    assert ours.encode("a <x> b <x>c", add_special_tokens=False).count(x) == 1  # single_word: "<x>c" is no match
    assert_same_as_hf(ours, hf, ["a<eot>b", "a<EOT> b", "a <x> b <x>c", " <x>", *TEXTS])
    assert ours.decode(ours.encode("a <x> b", add_special_tokens=False), skip_special_tokens=True) == "a b"
