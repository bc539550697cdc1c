"""The own sampler's rollout on inputs the other sampler tests leave out: rows of a dynamic NTK model
that would decode past max_position_embeddings, prompts that are not lists of token ids, and stop
strings over multi-byte and special tokens of a real byte-level BPE vocabulary."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import tiny_model
from test_sampler import CharTokenizer

from minigrpo.logprobs import completion_logprobs
from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.sampling.params import SamplingError, SamplingParams

DYNAMIC = dict(max_position_embeddings=16, rope_scaling={"type": "dynamic", "factor": 4.0})
LONG_PROMPT = [1, 5, 9, 13, 17, 21, 25, 30, 31, 32]  # 10 tokens: 6 new tokens reach max_position_embeddings


def test_dynamic_ntk_rows_stay_within_max_position_embeddings():
    """Dynamic NTK rotates a forward longer than max_position_embeddings with a larger base, at every
    position: the trainer's forward of a 10 + 14 token row did, the cache held the prompt rotated by the
    default base, and the sampler's log-probs parted from the trainer's by 0.19 nats, silently. Such a
    call is refused naming the setting (by generate and by a session); up to the limit the two agree."""
    model = tiny_model(seed=4, **DYNAMIC)
    sampler = KVCacheSampler(model, CharTokenizer())
    refusal = r"^a prompt of 10 tokens and max_new_tokens=14 pass the model's max_position_embeddings=16,"
    refusal += r".* set max_new_tokens=6 or less, or shorten it$"
    for target in (sampler, sampler.start_session()):
        with pytest.raises(SamplingError, match=refusal):
            target.generate([[1, 40], LONG_PROMPT], SamplingParams(max_new_tokens=14))
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, ignore_stop=True)
    out = sampler.generate([[1, 40], LONG_PROMPT], params, key=(2,))
    assert out.completion_mask.all() and out.completion_ids.shape == (4, 6)  # the long rows reach position 15
    with torch.no_grad():
        logp = completion_logprobs(model, out.input_ids(), out.attention_mask(), out.completion_mask)
    err = (logp - out.sampler_logp).abs().max().item()
    assert err < 1e-5, f"trainer vs sampler log-probs: max |diff| {err:.2e}"


def test_a_plain_rope_model_still_decodes_past_its_context():
    """Default RoPE has one set of frequencies: rows past max_position_embeddings are rotated as
    transformers' generate rotates them (tests/test_sampler_semantics.py), so nothing is refused."""
    model = tiny_model(seed=4, max_position_embeddings=16)
    out = KVCacheSampler(model, CharTokenizer()).generate([LONG_PROMPT], SamplingParams(max_new_tokens=10), key=(1,))
    with torch.no_grad():
        logp = completion_logprobs(model, out.input_ids(), out.attention_mask(), out.completion_mask)
    assert (logp - out.sampler_logp).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "prompts,message",
    [
        (["what is 2+2"], r"^prompt 0 is text, 'what is 2\+2': a sampler takes token ids"),
        ([5, 6], r"^prompt 0 must be a sequence of integer token ids, got 5 \(prompt_ids is a list of prompts"),
        ([[1, 2], [1, None]], r"^prompt 1 must be a sequence of integer token ids, got \[1, None\]"),
        ([[1, "2"]], r"^prompt 0 must be a sequence of integer token ids, got \[1, '2'\]"),
        ([[1, 2**70]], r"^prompt 0 must be a sequence of integer token ids"),
    ],
    ids=["text", "flat-list", "none", "str-id", "overflow"],
)
def test_prompts_that_are_not_token_ids_are_one_sampling_error(prompts, message):
    """Text instead of ids, a flat list for a list of prompts, None among the ids: each was a bare
    ValueError / TypeError / RuntimeError from torch.as_tensor ("too many dimensions 'str'", "'int'
    object is not iterable", "Could not infer dtype of NoneType"); now one SamplingError naming the prompt,
    from generate and from a session alike."""
    sampler = KVCacheSampler(tiny_model(seed=1), CharTokenizer())
    for target in (sampler, sampler.start_session()):
        with pytest.raises(SamplingError, match=message):
            target.generate(prompts, SamplingParams(max_new_tokens=2))


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """The SmolLM2 tokenizer (byte-level BPE) and a tiny model over its vocabulary."""
    from helpers.tok_fixtures import smollm2_tokenizer_dir

    from minigrpo.tokenizer import Tokenizer

    folder = smollm2_tokenizer_dir(tmp_path_factory)
    tok = Tokenizer.from_dir(folder)
    model = tiny_model(seed=1, vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_attention_heads=2)
    return folder, tok, model


@pytest.mark.parametrize(
    "text,stops,stop_ids",
    [
        ("hello world", ("lo w",), ()),  # across two tokens, ending inside the second
        ("这是。好的", ("。",), ()),  # CJK: the stop character and its neighbours are byte tokens
        ("x 😀 y", ("😀",), ()),  # a 4-byte character split over two tokens: the second completes it
        ("abc def", ("bc", "ab"), ()),  # overlapping stop strings, both in the first token
        ("a<|im_end|>b", ("<|im_end|>",), ()),  # a special token's text: searched, then left out of the text
        ("one two<|im_end|>", ("two",), (2,)),  # a stop string before the stop id ends the row first
    ],
)
def test_forced_completions_stop_where_transformers_stops(smol, text, stops, stop_ids):
    """The completion is forced to `text`'s tokens (a logits processor): the row ends at the token
    transformers' StopStringCriteria stops at, with ids, mask, log-probs and text cut alike."""
    from helpers.tok_fixtures import hf_tokenizer
    from transformers.generation.stopping_criteria import StopStringCriteria

    folder, tok, model = smol
    script = tok.encode(text, add_special_tokens=False)
    forced = torch.tensor(script)

    def force(logits, rows, step):  # (n, V), (n,), (1,): only the script's token may be drawn
        want = forced[step.clamp(max=len(script) - 1)].expand(logits.shape[0])  # (n,)
        return torch.full_like(logits, float("-inf")).scatter(1, want[:, None], 0.0)

    criterion = StopStringCriteria(hf_tokenizer(folder), list(stops))
    want = next(k for k in range(1, len(script) + 1) if criterion(torch.tensor([script[:k]]), None).item())
    sampler = KVCacheSampler(model, tok, logits_processor=force)
    params = SamplingParams(n=2, max_new_tokens=len(script) + 2, stop_strings=stops, stop_ids=stop_ids)
    out = sampler.generate([tok.encode("Q:", add_special_tokens=False)], params, key=(0,))
    assert out.completion_lengths.tolist() == [want, want] and not out.truncated.any()
    assert out.completion_ids.shape == (2, want) and out.completion_ids[0].tolist() == script[:want]
    assert (out.sampler_logp == 0).all()  # one possible token: log-prob 0
    assert out.completion_texts == [tok.decode(script[:want], skip_special_tokens=True)] * 2
