"""Reward models (minigrpo/models/reward_model.py) against transformers' *ForSequenceClassification.

Tiny random Llama and Qwen2 sequence-classification models are built and saved by transformers
itself (save_pretrained: config.json with the architecture and labels, score.weight, no lm_head),
loaded into ours, and scored on padded batches (left and right padding): fp32 scores must equal
transformers' within 1e-5. The `reward_model` reward, built from a run config through the registry,
must give the scores transformers gives each rendered conversation alone (plain text and chat
template). Wrong checkpoints (a causal LM, num_labels=2, a missing folder) are UserErrors.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


def _import_hub_kernels() -> None:
    """`python -m pytest` puts the repo root first on sys.path, where our kernels/ folder shadows the
    `kernels` package (pip) that transformers imports with its model classes: import that module
    once with the repo root off the path."""
    root = {"", os.getcwd(), str(Path(__file__).resolve().parents[1])}
    saved, shadow = sys.path[:], sys.modules.pop("kernels", None)
    sys.path[:] = [p for p in sys.path if p not in root]
    try:
        import transformers.integrations.hub_kernels  # noqa: F401
    finally:
        sys.path[:] = saved
        if shadow is not None:
            sys.modules["kernels"] = shadow


_import_hub_kernels()

from helpers.tiny import WORDS, tiny_checkpoint, tiny_run_checkpoint, tiny_tokenizer  # noqa: E402

from minigrpo import config, rewards  # noqa: E402
from minigrpo.errors import UserError  # noqa: E402
from minigrpo.models.reward_model import (  # noqa: E402
    RewardModel,
    RewardModelError,
    last_token_index,
    load_reward_model,
)
from minigrpo.reward_fns import RewardError  # noqa: E402
from minigrpo.tokenizer import Tokenizer  # noqa: E402

ATOL = 1e-5  # fp32 scores; observed differences are ~1e-7
PAD = 0
BASE = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=PAD,
)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForSequenceClassification", dict(rope_theta=10000.0)),
    "qwen2": ("Qwen2Config", "Qwen2ForSequenceClassification", dict(rope_theta=1e6, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForSequenceClassification", dict(rope_theta=1e6, head_dim=16)),
    "mistral": ("MistralConfig", "MistralForSequenceClassification", dict(rope_theta=1e4)),
}
TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ? {% endfor %}"


def hf_reward_model(directory, family: str = "llama", *, num_labels: int = 1, seed: int = 0, tokenizer=None, **kw):
    """A random transformers sequence-classification model saved into `directory` (and returned)."""
    cfg_name, cls_name, extra = FAMILIES[family]
    hf_cfg = getattr(transformers, cfg_name)(**{**BASE, **extra, **kw}, num_labels=num_labels)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(hf_cfg).float().eval()
    with torch.no_grad():  # peakier than the default init, so errors show
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save(directory)
    return model


def padded_batch(side: str, vocab: int = 97, seed: int = 0):
    """ids (4, 12) with real lengths 12, 9, 5, 1 (no real token is the pad id), mask, position ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (4, 12), generator=g)
    lengths = torch.tensor([12, 9, 5, 1])
    cols = torch.arange(12)[None, :]
    mask = (cols >= 12 - lengths[:, None]) if side == "left" else (cols < lengths[:, None])
    ids = ids.masked_fill(~mask, PAD)
    return ids, mask.long(), (mask.long().cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scores_match_transformers(family, side, tmp_path):
    hf = hf_reward_model(tmp_path, family, seed=len(family))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == [FAMILIES[family][1]]
    ours, tok = load_reward_model(tmp_path)
    assert isinstance(ours, RewardModel) and tok is None and ours.lm_head is None
    assert ours.num_labels == 1 and ours.pad_token_id == PAD
    ids, mask, pos = padded_batch(side)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)  # (4, 1)
        want = hf(ids, attention_mask=mask, position_ids=pos).logits  # (4, 1)
        default = hf(ids, attention_mask=mask).logits  # transformers' own positions (0.. from column 0)
        alone = torch.cat([hf(row[m.bool()][None]).logits for row, m in zip(ids, mask)])  # unpadded rows
    assert got.dtype == torch.float32 and got.shape == (4, 1)
    assert want.abs().max() > 0.1, "scores too flat to test anything"
    assert (got - want).abs().max().item() < ATOL
    assert (got - default).abs().max().item() < ATOL  # RoPE is relative: left-pad offsets cancel
    assert (got - alone).abs().max().item() < ATOL  # padding changes nothing
    assert (got[:, 0] - got[0, 0]).abs().max() > 1e-3  # and the rows really differ


def test_two_labels_load_and_match(tmp_path):
    hf = hf_reward_model(tmp_path, "llama", num_labels=2, seed=3)
    assert "id2label" not in json.loads((tmp_path / "config.json").read_text())  # 2 is the unwritten default
    ours, _ = load_reward_model(tmp_path)
    ids, mask, _ = padded_batch("right", seed=1)
    with torch.no_grad():
        assert ours(ids, attention_mask=mask).shape == (4, 2)
        diff = (ours(ids, attention_mask=mask) - hf(ids, attention_mask=mask).logits).abs().max().item()
    assert diff < ATOL


def test_last_token_index_follows_the_pad_id():
    ids = torch.tensor([[5, 0, 7, 0, 0], [0, 0, 4, 6, 9], [0, 0, 0, 0, 0], [3, 4, 5, 6, 7]])
    assert last_token_index(ids, 0).tolist() == [2, 4, 0, 4]  # an inner pad-id token is skipped too
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    assert last_token_index(ids, None, mask).tolist() == [3, 4, 0, 2]
    assert last_token_index(ids, None).tolist() == [4, 4, 4, 4]
    assert last_token_index(ids, 0, mask).tolist() == [2, 4, 0, 2]  # both: a pad id and a padding column


def test_lm_head_is_refused():
    model = RewardModel(_args(), num_labels=1, pad_token_id=0)
    with pytest.raises(TypeError, match="no LM head"):
        model.logits(torch.zeros(1, 64))
    assert "score.weight" in dict(model.named_parameters()) and "lm_head.weight" not in model.state_dict()


def _args():
    from minigrpo.models.args import ModelArgs

    return ModelArgs.from_hf_config({**BASE, "model_type": "llama", "rope_theta": 1e4})


# ---------------------------------------------------------------------------------------- as a reward

PROMPTS = ["what is 2 + 3 ?", "repeat 7", "what is 12 * 4 ?", "repeat 0", "what is 9 - 9 ?"]
COMPLETIONS = ["5", "7 7 7", "48 = 12 * 4", "", "is 0 : 0"]


def _run_rewards(tmp_path, kwargs: dict) -> list[rewards.RewardSpec]:
    """RewardSpecs as a run builds them: from the YAML config file's `rewards` list."""
    path = tmp_path / "run.yaml"
    rm = {"name": "reward_model", "weight": 2.0, "timeout_s": 60.0, "kwargs": kwargs}
    import yaml

    path.write_text(yaml.safe_dump({"rewards": [{"name": "exact_answer"}, rm]}))
    return rewards.build_reward_specs(config.load_config(path).rewards)


def _direct(hf, tok: Tokenizer, texts: list[str], *, special: bool) -> list[float]:
    with torch.no_grad():
        return [hf(torch.tensor([tok.encode(t, add_special_tokens=special)])).logits[0, 0].item() for t in texts]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reward_function_plain_text_equals_transformers(family, tmp_path):
    tok = tiny_tokenizer()
    hf = hf_reward_model(tmp_path / "rm", family, seed=5, tokenizer=tok, vocab_size=len(WORDS))
    specs = _run_rewards(tmp_path, {"path": str(tmp_path / "rm"), "batch_size": 2, "device": "cpu"})
    result = rewards.score(PROMPTS, COMPLETIONS, ["5"] * 5, specs)
    assert result.names == ["exact_answer", "reward_model"] and result.failures["reward_model"] == 0
    want = _direct(hf, tok, [f"{p}\n\n{c}" for p, c in zip(PROMPTS, COMPLETIONS)], special=True)
    got = result.per_fn[:, 1]
    assert (got - torch.tensor(want)).abs().max().item() < ATOL
    assert torch.allclose(result.total, result.per_fn[:, 0] + 2.0 * got, atol=1e-6)
    # a second build of the same reward reuses the loaded model
    again = _run_rewards(tmp_path, {"path": str(tmp_path / "rm"), "device": "cpu", "batch_size": 8})[1].fn
    assert again.load()[0] is specs[1].fn.load()[0]


def test_pad_id_minus_one_scores_each_row_at_its_last_token(tmp_path):
    """pad_token_id = -1 (older Llama configs): no id is padding, so transformers scores a lone row at
    its last token; the reward (padded batches) must give those scores, not fail on id -1 (1e-5)."""
    tok = tiny_tokenizer()
    hf = hf_reward_model(tmp_path / "rm", "llama", seed=5, tokenizer=tok, vocab_size=len(WORDS), pad_token_id=-1)
    fn = rewards.make_reward("reward_model", {"path": str(tmp_path / "rm"), "device": "cpu", "batch_size": 4})
    got = fn(PROMPTS, COMPLETIONS, ["5"] * 5)
    want = _direct(hf, tok, [f"{p}\n\n{c}" for p, c in zip(PROMPTS, COMPLETIONS)], special=True)
    assert max(abs(a - b) for a, b in zip(got, want)) < ATOL
    ours, _ = load_reward_model(tmp_path / "rm")
    ids, mask, _ = padded_batch("right", vocab=len(WORDS), seed=2)
    with torch.no_grad():  # padding that holds some other id than pad_token_id is never read
        alone = torch.cat([hf(row[m.bool()][None]).logits for row, m in zip(ids, mask)])
        assert (ours(ids.masked_fill(mask == 0, 5), attention_mask=mask) - alone).abs().max().item() < ATOL


def test_reward_function_uses_the_chat_template(tmp_path):
    tok = _templated_tokenizer(TEMPLATE)
    hf = hf_reward_model(tmp_path / "rm", "qwen2", seed=9, tokenizer=tok, vocab_size=len(WORDS))
    prompts = [[{"role": "system", "content": "repeat"}, {"role": "user", "content": p}] for p in PROMPTS[:3]]
    fn = rewards.make_reward("reward_model", {"path": str(tmp_path / "rm"), "device": "cpu", "dtype": "float32"})
    got = fn(prompts, COMPLETIONS[:3], [None] * 3)
    texts = [
        tok.apply_chat_template([*p, {"role": "assistant", "content": c}]) for p, c in zip(prompts, COMPLETIONS[:3])
    ]
    assert texts[0].startswith("system : repeat ? user : what")
    want = _direct(hf, tok, texts, special=False)
    assert max(abs(a - b) for a, b in zip(got, want)) < ATOL
    plain = rewards.make_reward("reward_model", {"path": str(tmp_path / "rm"), "chat_template": "none"})
    assert max(abs(a - b) for a, b in zip(plain(prompts, COMPLETIONS[:3], [None] * 3), got)) > 1e-4


def test_a_begun_reply_and_its_completion_are_one_assistant_turn(tmp_path):
    """A prompt that ends with an assistant message ("repeat", a prefill) is continued by the policy: the
    reply is that message plus the completion. It used to be scored as two assistant turns; the scores
    must be transformers' on the conversation whose last turn is the whole reply (1e-5)."""
    from helpers.tok_fixtures import hf_tokenizer

    tok = _templated_tokenizer(TEMPLATE)
    tok.save(tmp_path / "tok")
    reference = hf_tokenizer(tmp_path / "tok")  # transformers renders and tokenizes the reference rows
    hf = hf_reward_model(tmp_path / "rm", "llama", seed=11, tokenizer=tok, vocab_size=len(WORDS))
    begun = [[{"role": "user", "content": p}, {"role": "assistant", "content": "repeat"}] for p in PROMPTS[:3]]
    fn = rewards.make_reward("reward_model", {"path": str(tmp_path / "rm"), "device": "cpu", "batch_size": 2})
    got = fn(begun, COMPLETIONS[:3], [None] * 3)
    texts = [
        reference.apply_chat_template([p[0], {"role": "assistant", "content": "repeat" + c}], tokenize=False)
        for p, c in zip(begun, COMPLETIONS[:3])
    ]
    assert texts[0] == "user : what is 2 + 3 ? ? assistant : repeat5 ? "
    with torch.no_grad():
        ids = [reference(t, add_special_tokens=False)["input_ids"] for t in texts]
        want = [hf(torch.tensor([row])).logits[0, 0].item() for row in ids]
    assert max(abs(a - b) for a, b in zip(got, want)) < ATOL
    assert max(want) - min(want) > 1e-3
    # the loop's prompt_messages column (the conversations the policy saw) is scored in place of prompts
    assert fn(PROMPTS[:3], COMPLETIONS[:3], [None] * 3, prompt_messages=begun) == got


def _char_tokenizer(template: str) -> Tokenizer:
    """One token per character, ChatML specials, `template` as the chat template."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate([*specials, *map(chr, range(32, 127)), "\n"])}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return Tokenizer(
        backend,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<unk>",
        chat_template=template,
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


QWEN3_CONVERSATIONS = [  # (prompt, completion): system, multi-turn, a tool episode, a begun "<think>" reply
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "7*6?"}], "<think>\nmul\n</think>\n\n42"),
    (
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "9-9?"},
        ],
        "0",
    ),
    (
        [
            {"role": "user", "content": "add 2 3"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}],
            },
            {"role": "tool", "content": "5"},
        ],
        "It is 5.",
    ),
    ([{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "<think>\n"}], "add\n</think>\n\n5"),
    ("2+3?", "5"),
]


def test_qwen3_conversations_score_as_transformers_renders_them(tmp_path):
    """A Qwen3 reward model with Qwen3's chat template (thinking blocks, tool calls and results), pad ==
    eos: every batch size gives transformers' score of the conversation its tokenizer renders (1e-5),
    the begun "<think>" reply rendered as one assistant turn with its completion."""
    from helpers.tok_fixtures import hf_tokenizer
    from test_chat_template import QWEN3_TEMPLATE

    tok = _char_tokenizer(QWEN3_TEMPLATE)
    tok.save(tmp_path / "tok")
    reference = hf_tokenizer(tmp_path / "tok")
    vocab = tok.backend.get_vocab_size()
    kw = dict(vocab_size=vocab, max_position_embeddings=512, pad_token_id=5, eos_token_id=5, tokenizer=tok)
    hf = hf_reward_model(tmp_path / "rm", "qwen3", seed=12, **kw)
    prompts, completions = zip(*QWEN3_CONVERSATIONS)
    want = []
    for prompt, completion in QWEN3_CONVERSATIONS:
        chat = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        begun = chat.pop()["content"] if chat[-1]["role"] == "assistant" else ""
        text = reference.apply_chat_template(
            [*chat, {"role": "assistant", "content": begun + completion}], tokenize=False
        )
        with torch.no_grad():
            want.append(hf(torch.tensor([reference(text, add_special_tokens=False)["input_ids"]])).logits.item())
    assert max(want) - min(want) > 1e-2
    for batch_size in (1, 3, len(prompts)):
        kwargs = {"path": str(tmp_path / "rm"), "device": "cpu", "batch_size": batch_size}
        got = rewards.make_reward("reward_model", kwargs)(list(prompts), list(completions), [None] * len(prompts))
        assert max(abs(a - b) for a, b in zip(got, want)) < ATOL, batch_size


def test_rows_longer_than_the_positions_keep_their_last_tokens(tmp_path):
    """A conversation longer than max_position_embeddings (64) is scored on its last 64 tokens (the scored
    token stays the last one), as transformers scores those tokens; max_length keeps fewer."""
    tok = _templated_tokenizer(TEMPLATE)
    hf = hf_reward_model(tmp_path / "rm", "llama", seed=13, tokenizer=tok, vocab_size=len(WORDS))
    prompts = ["what is " + " + ".join("12" for _ in range(40)) + " ?", "repeat 7"]
    completions = ["4 8 0", "7"]
    ids = [
        tok.encode(
            tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}]),
            add_special_tokens=False,
        )
        for p, c in zip(prompts, completions)
    ]
    assert len(ids[0]) > 64 > len(ids[1])
    for max_length in (None, 20):
        keep = max_length or 64
        with torch.no_grad():
            want = [hf(torch.tensor([row[-keep:]])).logits.item() for row in ids]
        fn = rewards.make_reward(
            "reward_model", {"path": str(tmp_path / "rm"), "device": "cpu", "max_length": max_length}
        )
        got = fn(prompts, completions, [None, None])
        assert max(abs(a - b) for a, b in zip(got, want)) < ATOL


def test_a_completion_that_is_none_has_no_score(tmp_path):
    """None is a completion with no text (the reward contract): it must score None, not the prompt with an
    empty reply; the other rows keep the scores they have without it."""
    tok = _templated_tokenizer(TEMPLATE)
    hf_reward_model(tmp_path / "rm", "qwen2", seed=6, tokenizer=tok, vocab_size=len(WORDS))
    for template in ("auto", "none"):
        fn = rewards.make_reward(
            "reward_model", {"path": str(tmp_path / "rm"), "device": "cpu", "chat_template": template}
        )
        got = fn(PROMPTS[:3], ["5", None, COMPLETIONS[2]], [None] * 3)
        alone = fn([PROMPTS[0], PROMPTS[2]], ["5", COMPLETIONS[2]], [None] * 2)
        assert got[1] is None
        assert abs(got[0] - alone[0]) < ATOL and abs(got[2] - alone[1]) < ATOL


def test_a_score_bias_is_ignored_as_transformers_ignores_it(tmp_path):
    """A checkpoint whose head carries score.bias: transformers loads it (the bias-free head drops the
    bias), so the scores must be transformers' (1e-5) with a warning; it used to be refused as an
    unexpected tensor, at build time and at load time."""
    from safetensors.torch import load_file, save_file

    hf_reward_model(tmp_path, "llama", seed=8, tokenizer=tiny_tokenizer(), vocab_size=len(WORDS))
    state = load_file(tmp_path / "model.safetensors")
    state["score.bias"] = torch.tensor([0.75])
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).float().eval()
    with pytest.warns(UserWarning, match=r"score\.bias is ignored"):
        ours, _ = load_reward_model(tmp_path)
    ids, mask, _ = padded_batch("left", vocab=len(WORDS), seed=5)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask).logits  # (4, 1)
        assert (ours(ids, attention_mask=mask) - want).abs().max().item() < ATOL
    with pytest.warns(UserWarning, match=r"score\.bias"):
        fn = rewards.make_reward("reward_model", {"path": str(tmp_path), "device": "cpu"})
    with pytest.warns(UserWarning, match=r"score\.bias"):  # the weights load on the first call
        got = fn(PROMPTS[:1], COMPLETIONS[:1], [None])[0]
    assert abs(got - _direct(hf, tiny_tokenizer(), [f"{PROMPTS[0]}\n\n{COMPLETIONS[0]}"], special=True)[0]) < ATOL


# ---------------------------------------------------------------------------------------- errors


def test_a_causal_lm_is_no_reward_model(tmp_path):
    tiny_checkpoint(tmp_path)
    with pytest.raises(RewardModelError, match="not a sequence-classification checkpoint") as info:
        load_reward_model(tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)
    with pytest.raises(RewardModelError, match="LlamaForCausalLM"):
        rewards.make_reward("reward_model", {"path": str(tmp_path)})


def test_two_labels_are_no_reward(tmp_path):
    hf_reward_model(tmp_path, "llama", num_labels=2)
    with pytest.raises(RewardModelError, match="num_labels=2") as info:
        rewards.build_reward_specs([config.RewardSpec("reward_model", kwargs={"path": str(tmp_path)})])
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "path is missing"),
        ({"path": "./no/such/folder"}, "does not exist"),
        ({"path": "x", "batch_size": 0}, "batch_size=0"),
        ({"path": "x", "dtype": "int8"}, "dtype='int8'"),
        ({"path": "x", "device": "gpu7"}, "device='gpu7'"),
        ({"path": "x", "temperature": 1.0}, "no setting 'temperature'"),
    ],
)
def test_bad_settings_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        rewards.make_reward("reward_model", kwargs)


def test_a_checkpoint_with_an_lm_head_still_loads(tmp_path):
    """Some reward checkpoints also carry lm_head.weight: it is ignored, the scores are unchanged."""
    from safetensors.torch import load_file, save_file

    hf = hf_reward_model(tmp_path, "llama", seed=2)
    state = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in state and "score.weight" in state
    state["lm_head.weight"] = torch.randn(97, 64)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours, _ = load_reward_model(tmp_path)
    ids, mask, _ = padded_batch("right", seed=4)
    with torch.no_grad():
        assert (ours(ids, attention_mask=mask) - hf(ids, attention_mask=mask).logits).abs().max().item() < ATOL


def test_a_classifier_config_without_score_head_is_named(tmp_path):
    """A causal LM's weights under a *ForSequenceClassification config: the missing head is said as such,
    with the folder, for a reward and for ppo.value_path, from the headers (before any weights load)."""
    from minigrpo.algorithms.value_model import check_value_path

    folder = tiny_run_checkpoint(tmp_path / "headless")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(architectures=["LlamaForSequenceClassification"], num_labels=1)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RewardModelError, match=r"headless: .* no score head \(score\.weight\)") as info:
        rewards.make_reward("reward_model", {"path": str(folder)})
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"ppo\.value_path=.*headless.* no score head"):
        check_value_path(str(folder))


def test_a_folder_without_tokenizer_fails_before_loading(tmp_path):
    hf_reward_model(tmp_path, "llama")
    with pytest.raises(UserError, match="has no tokenizer"):
        rewards.make_reward("reward_model", {"path": str(tmp_path)})


def _templated_reward_model(directory, templates) -> None:
    """A reward model whose tokenizer carries `templates` (one source, or a dict of named sources)."""
    hf_reward_model(directory, "llama", seed=7, tokenizer=_templated_tokenizer(templates), vocab_size=len(WORDS))


def _templated_tokenizer(templates) -> Tokenizer:
    """The tiny word tokenizer with special tokens and `templates` as its chat template(s)."""
    from tokenizers import Tokenizer as Backend

    return Tokenizer(
        Backend.from_str(tiny_tokenizer().backend.to_str()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=templates,
    )


def test_a_chat_template_name_the_tokenizer_lacks_fails_when_built(tmp_path):
    """An unknown template name used to render as its own text: every row the same constant string, so
    every completion the same score (no signal, no error). It must fail when the reward is built,
    one line naming the key and the templates the tokenizer has; a known name and jinja source pass."""
    _templated_reward_model(tmp_path / "rm", {"default": TEMPLATE, "short": "{{ messages[-1]['content'] }}"})
    path = str(tmp_path / "rm")
    with pytest.raises(RewardModelError, match=r"chat_template='chatml' .* default, short") as info:
        rewards.make_reward("reward_model", {"path": path, "chat_template": "chatml", "device": "cpu"})
    assert "\n" not in str(info.value) and "reward_model" in str(info.value)
    with pytest.raises(RewardModelError, match=r"chat_template .* does not parse"):
        rewards.make_reward("reward_model", {"path": path, "chat_template": "{% for m in messages %}{{ m }}"})
    short = rewards.make_reward("reward_model", {"path": path, "chat_template": "short", "device": "cpu"})
    source = rewards.make_reward(
        "reward_model", {"path": path, "chat_template": "{{ messages[-1]['content'] }}", "device": "cpu"}
    )
    got, same = short(PROMPTS[:3], COMPLETIONS[:3], [None] * 3), source(PROMPTS[:3], COMPLETIONS[:3], [None] * 3)
    assert max(abs(a - b) for a, b in zip(got, same)) < ATOL  # a name renders the source it names
    assert max(got) - min(got) > 1e-3  # the completions score differently


def test_a_chat_template_name_without_templates_fails_when_built(tmp_path):
    hf_reward_model(tmp_path / "rm", "llama", tokenizer=tiny_tokenizer(), vocab_size=len(WORDS))
    with pytest.raises(RewardModelError, match=r"chat_template='default' .* has no chat template"):
        rewards.make_reward("reward_model", {"path": str(tmp_path / "rm"), "chat_template": "default"})


def test_an_unavailable_device_fails_when_built(tmp_path):
    """device='cuda:K' past the last GPU (or 'cuda' without one) used to pass the build and then fail
    every call, each failure masked as an unscored row; 'meta' is no device to score on."""
    hf_reward_model(tmp_path / "rm", "llama", tokenizer=tiny_tokenizer(), vocab_size=len(WORDS))
    absent = f"cuda:{torch.cuda.device_count()}"
    for device in (absent, "meta"):
        with pytest.raises(RewardError, match=rf"device='{device}'"):
            rewards.make_reward("reward_model", {"path": str(tmp_path / "rm"), "device": device})


def test_max_length_beyond_the_model_positions_fails_when_built(tmp_path):
    """max_length past max_position_embeddings (64 here) would score rows at positions the model never
    saw, silently; the folder's config is read when the reward is built."""
    hf_reward_model(tmp_path / "rm", "llama", tokenizer=tiny_tokenizer(), vocab_size=len(WORDS))
    with pytest.raises(RewardError, match=r"max_length=65 .* max_position_embeddings \(64\)"):
        rewards.make_reward("reward_model", {"path": str(tmp_path / "rm"), "max_length": 65})
    rewards.make_reward("reward_model", {"path": str(tmp_path / "rm"), "max_length": 64})


def test_a_hub_id_that_cannot_be_fetched_stops_the_run(tmp_path, monkeypatch):
    """A hub id that is not on disk is checked when fetched, on the first call: that error used to be
    a ModelNotFoundError, masked as a failed row on every step; it must stop the run (a RewardError)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    specs = rewards.build_reward_specs(
        [config.RewardSpec("reward_model", kwargs={"path": "nobody/no-such-reward-model", "device": "cpu"})]
    )
    with pytest.raises(RewardError, match=r"nobody/no-such-reward-model"):
        rewards.score(PROMPTS[:2], COMPLETIONS[:2], ["5", "7"], specs)


# ---------------------------------------------------------------------------------------- length_penalty


def test_length_penalty_buffer_longer_than_the_completion_limit_stops_the_run():
    """buffer with L_max from the max_completion_length column (256): a buffer of 300 put the penalty's
    start at 256 - 300 < 0, so an empty completion scored -0.1467 instead of 0. It must stop the run."""
    specs = rewards.build_reward_specs([config.RewardSpec("length_penalty", kwargs={"buffer": 300})])
    columns = {"completion_lengths": [0, 200], "max_completion_length": [256, 256]}
    with pytest.raises(RewardError, match=r"buffer=300 is more than the maximum length 256"):
        rewards.score(["p", "q"], ["", "x"], ["1", "2"], specs, columns=columns)
    fit = rewards.build_reward_specs([config.RewardSpec("length_penalty", kwargs={"buffer": 256})])
    got = rewards.score(["p", "q"], ["", "x"], ["1", "2"], fit, columns=columns).per_fn[:, 0]
    assert got.tolist() == pytest.approx([0.0, -200 / 256], abs=1e-6)


@pytest.mark.parametrize("factor", [float("nan"), float("inf")])
def test_length_penalty_factor_must_be_finite(factor):
    """A NaN factor made every row NaN, which the rewards read as unscored: the reward vanished silently."""
    with pytest.raises(RewardError, match=r"factor=.* must be a finite number"):
        rewards.make_reward("length_penalty", {"max_length": 100, "factor": factor})


def capture_prompt_messages(prompts, completions, answers, prompt_messages=None, **_):
    """A reward function that writes the loop's prompt_messages column to $CAPTURE_PATH (the loop may
    import this file as another module than the test's)."""
    Path(os.environ["CAPTURE_PATH"]).write_text(json.dumps(prompt_messages))
    return [0.0] * len(completions)


def test_the_loop_passes_the_conversation_the_policy_saw(tmp_path, monkeypatch):
    """A reward model scores the prompt as the policy saw it: data.system_prompt included (the bare
    `prompts` lack it), one conversation per completion; and the scorer reads it in place of prompts."""
    from helpers.runs import launch, run_config

    monkeypatch.setenv("CAPTURE_PATH", str(tmp_path / "seen.json"))
    system = "Answer with one digit."
    cfg = run_config(
        tmp_path,
        data={"system_prompt": system},
        grpo={"prompts_per_step": 2, "group_size": 2},
        train={"steps": 1, "micro_batch_size": 4},
        rewards=[{"name": "test_reward_model:capture_prompt_messages"}],
    )
    launch(tmp_path, cfg)
    messages = json.loads((tmp_path / "seen.json").read_text())
    assert len(messages) == 4 and messages[0] == messages[1]
    assert messages[0][0] == {"role": "system", "content": system} and messages[0][1]["role"] == "user"
