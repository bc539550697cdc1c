"""Reward models and the critic read from places the main tests do not draw: hub repos (a local stand-in
records what is downloaded: nothing checkable may wait for the weights), a GGUF file named in capitals,
a tokenizer larger than the model's vocabulary, and a scoring that outlives its timeout.

transformers (test-only oracle) saves each tiny random sequence-classification model.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from helpers.hub import fake_hub  # noqa: E402
from helpers.tiny import WORDS, tiny_checkpoint, tiny_tokenizer  # noqa: E402
from test_reward_model import ATOL, COMPLETIONS, PROMPTS, hf_reward_model  # noqa: E402  (imports transformers safely)

from minigrpo import rewards  # noqa: E402
from minigrpo.errors import UserError  # noqa: E402
from minigrpo.models.reward_model import RewardModelError  # noqa: E402

REPO = "someone/reward-model"


def _hub_reward(monkeypatch, tmp_path, remote, repo=REPO, **kwargs):
    """The `reward_model` reward on hub repo `repo` served from `remote`: (reward fn, download calls, snapshot).
    A model loads once per name in the process: a repo that loads has a name of its own."""
    snapshot = tmp_path / "snapshot"
    calls = fake_hub(monkeypatch, remote, snapshot)
    fn = rewards.make_reward("reward_model", {"path": repo, "device": "cpu", "dtype": "float32", **kwargs})
    return fn, calls, snapshot


def _no_weights_fetched(calls, snapshot) -> bool:
    return len(calls) == 1 and not list(snapshot.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------- hub repos


def _without_tokenizer(remote):
    hf_reward_model(remote, "llama", seed=1)


def _causal_lm(remote):
    tiny_checkpoint(remote)
    tiny_tokenizer().save(remote)


def _two_labels(remote):
    hf_reward_model(remote, "llama", num_labels=2, tokenizer=tiny_tokenizer(), vocab_size=len(WORDS))


def _small_vocabulary(remote):
    hf_reward_model(remote, "llama", tokenizer=tiny_tokenizer(), vocab_size=len(WORDS) - 4)


def _one_label(remote):
    hf_reward_model(remote, "llama", tokenizer=tiny_tokenizer(), vocab_size=len(WORDS))


HUB_REFUSALS = {  # the repo, the reward's kwargs, what the one-line error says
    "no tokenizer": (_without_tokenizer, {}, rf"'{REPO}' on the Hugging Face Hub has no tokenizer"),
    "a causal LM": (_causal_lm, {}, r"not a sequence-classification checkpoint .*LlamaForCausalLM"),
    "two labels": (_two_labels, {}, r"has num_labels=2: a reward needs one score per sequence"),
    "max_length": (_one_label, {"max_length": 65}, r"max_length=65 is more than .* max_position_embeddings \(64\)"),
    "a small vocabulary": (_small_vocabulary, {}, r"token ids up to 22 but config.json's vocab_size is 19"),
}


@pytest.mark.parametrize("case", list(HUB_REFUSALS))
def test_a_hub_reward_model_is_refused_before_its_weights_download(case, monkeypatch, tmp_path):
    """A hub repo's tokenizer was checked after the weights downloaded, and its architecture, labels,
    vocabulary and this reward's settings only once they had loaded: gigabytes fetched to be refused.
    Each is one RewardModelError line on the first call (the run stops), with no weights file fetched."""
    make, kwargs, message = HUB_REFUSALS[case]
    make(tmp_path / "remote")
    fn, calls, snapshot = _hub_reward(monkeypatch, tmp_path, tmp_path / "remote", **kwargs)
    specs = [rewards.RewardSpec("reward_model", fn=fn, timeout_s=None)]
    with pytest.raises(RewardModelError, match=message) as info:
        rewards.score(PROMPTS[:2], COMPLETIONS[:2], [None, None], specs)
    assert "\n" not in str(info.value)
    assert _no_weights_fetched(calls, snapshot), (calls, sorted(p.name for p in snapshot.iterdir()))


def test_a_hub_reward_model_scores_as_its_folder_does(monkeypatch, tmp_path):
    """The same repo from the hub and from its folder: equal scores (1e-5), weights fetched after the check."""
    hf_reward_model(tmp_path / "remote", "qwen2", seed=4, tokenizer=tiny_tokenizer(), vocab_size=len(WORDS))
    local = rewards.make_reward("reward_model", {"path": str(tmp_path / "remote"), "device": "cpu"})
    fn, calls, snapshot = _hub_reward(monkeypatch, tmp_path, tmp_path / "remote", repo="someone/fine-reward-model")
    want, got = local(PROMPTS, COMPLETIONS, [None] * 5), fn(PROMPTS, COMPLETIONS, [None] * 5)
    assert len(calls) == 2 and (snapshot / "model.safetensors").is_file()
    assert max(abs(a - b) for a, b in zip(got, want)) < ATOL and max(want) - min(want) > 1e-3


def test_a_tokenizer_larger_than_the_vocabulary_fails_when_built(tmp_path):
    """A tokenizer whose ids pass config.json's vocab_size (another model's tokenizer) passed the build;
    every row's forward then raised an IndexError, masked as a failed row on every step. It is one line
    naming both numbers when the reward is built, as load_pretrained says it for a policy."""
    _small_vocabulary(tmp_path)
    with pytest.raises(UserError, match=r"token ids up to 22 but config.json's vocab_size is 19") as info:
        rewards.make_reward("reward_model", {"path": str(tmp_path), "device": "cpu"})
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------- the critic


def test_a_critic_from_a_gguf_file_named_in_capitals_loads(tmp_path):
    """ppo.value_path = "X.GGUF": the critic's loader compared the suffix with ".gguf" exactly, so it read the
    file as a folder ("is no model: expected a model folder"); it must load as "x.gguf" does."""
    from test_gguf_export import bpe_tokenizer, family_model

    from minigrpo.algorithms.value_model import load_value_body
    from minigrpo.export import save_gguf

    lower = save_gguf(family_model("llama"), bpe_tokenizer(), tmp_path / "critic.f16.gguf", "f16")
    upper = tmp_path / "CRITIC.F16.GGUF"
    shutil.copy(lower, upper)
    cpu = torch.device("cpu")
    body, head = load_value_body(str(upper), dtype=torch.float32, device=cpu)
    want, _ = load_value_body(str(lower), dtype=torch.float32, device=cpu)
    assert head is None and body.args.n_layers == want.args.n_layers == 2
    assert all(torch.equal(a, b) for a, b in zip(body.parameters(), want.parameters(), strict=True))


def test_a_hub_critic_with_two_labels_is_refused_before_its_weights_download(monkeypatch, tmp_path):
    """ppo.value_path naming a hub classifier with num_labels=2: refused after its weights had downloaded
    and loaded; one line naming the key, before any weights file is fetched. One label loads."""
    from minigrpo.algorithms.value_model import load_value_body

    hf_reward_model(tmp_path / "remote", "llama", num_labels=2)
    snapshot = tmp_path / "snapshot"
    calls = fake_hub(monkeypatch, tmp_path / "remote", snapshot)
    with pytest.raises(UserError, match=rf"^ppo.value_path='{REPO}' has num_labels=2: a value head gives one"):
        load_value_body(REPO, dtype=torch.float32, device=torch.device("cpu"))
    assert _no_weights_fetched(calls, snapshot)
    shutil.rmtree(tmp_path / "remote")
    hf = hf_reward_model(tmp_path / "remote", "llama", seed=6)
    _, head = load_value_body(REPO, dtype=torch.float32, device=torch.device("cpu"))
    assert torch.equal(head.weight, hf.score.weight.detach())


# ---------------------------------------------------------------------------------------- timeouts


def test_a_timed_out_scoring_ends_before_its_per_row_retry_runs(tmp_path, monkeypatch):
    """The whole-batch call outlives its timeout (0.6 s; its forward takes 1.5 s) and rewards.score retries
    row by row. The retry's forwards ran beside the abandoned one (two alive at once: twice the memory on
    a GPU); they must wait for it. The rows then score as transformers scores each alone (1e-5)."""
    tok = tiny_tokenizer()
    hf = hf_reward_model(tmp_path / "rm", "llama", seed=5, tokenizer=tok, vocab_size=len(WORDS))
    fn = rewards.make_reward("reward_model", {"path": str(tmp_path / "rm"), "device": "cpu", "batch_size": 8})
    model, _ = fn.load()
    alive, most, lock = [0], [0], threading.Lock()
    forward = model.hidden

    def slow_hidden(ids, **kwargs):
        with lock:
            alive[0] += 1
            most[0] = max(most[0], alive[0])
        try:
            time.sleep(1.5 if ids.shape[0] > 1 else 0.0)  # the batch call is slow, a single row is not
            return forward(ids, **kwargs)
        finally:
            with lock:
                alive[0] -= 1

    monkeypatch.setattr(model, "hidden", slow_hidden)
    spec = rewards.RewardSpec("reward_model", fn=fn, timeout_s=0.6, max_consecutive_timeouts=5)
    result = rewards.score(PROMPTS[:3], COMPLETIONS[:3], [None] * 3, [spec])
    deadline = time.monotonic() + 10
    while alive[0] and time.monotonic() < deadline:  # the abandoned call, if still running
        time.sleep(0.05)
    assert most[0] == 1, f"{most[0]} forwards ran at once"
    with torch.no_grad():
        ids = [tok.encode(f"{p}\n\n{c}") for p, c in zip(PROMPTS[:3], COMPLETIONS[:3])]
        want = [hf(torch.tensor([row])).logits.item() for row in ids]
    scored = [i for i in range(3) if not torch.isnan(result.per_fn[i, 0])]
    assert scored, "no row was scored"
    assert max(abs(result.per_fn[i, 0].item() - want[i]) for i in scored) < ATOL
    assert json.dumps(result.failures) == '{"reward_model": 0}'
