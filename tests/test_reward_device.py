"""Where a `reward_model` reward loads its checkpoint: the run's device, not whichever GPU is current.

run.device=cuda:1 in one process never makes GPU 1 the current device (only torchrun's ranks set
theirs), and the rewards are scored in threads of their own, whose current CUDA device is the default
one: a reward model on device "auto" or "cuda" must still load on the policy's GPU, named by
reward_fns.set_run_device, and the memory pre-flight must count it there. An explicit "cpu" or
"cuda:N" wins. No GPU is needed: torch.cuda's device queries are replaced by a per-thread fake (the
main thread's current device is GPU 1, every other thread's GPU 0), and the load records where it
was asked to put the weights (which load on the CPU).
"""

from __future__ import annotations

import threading

import pytest
import torch
from helpers.tiny import WORDS, tiny_tokenizer

from minigrpo import rewards
from minigrpo.models import reward_model
from minigrpo.reward_fns import run_device, set_run_device

SMALL_RM = dict(
    vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1, max_position_embeddings=64
)


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda as a process with two GPUs whose main thread made GPU 1 current; every load of a
    reward model recorded as (device, dtype) and done on the CPU; the run's device forgotten after."""
    main = threading.main_thread()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1 if threading.current_thread() is main else 0)
    monkeypatch.setattr(reward_model, "_LOADED", {})
    asked: list[tuple[str, torch.dtype]] = []
    real_load = reward_model.load_reward_model

    def load_on_cpu(path, *, dtype, device, **kw):
        asked.append((str(device), dtype))
        return real_load(path, dtype=torch.float32, device="cpu", **kw)

    monkeypatch.setattr(reward_model, "load_reward_model", load_on_cpu)
    yield asked
    set_run_device(None)


@pytest.fixture
def rm_path(tmp_path):
    from test_reward_model import hf_reward_model  # imports transformers' classes safely (or skips)

    hf_reward_model(tmp_path / "rm", tokenizer=tiny_tokenizer(), **SMALL_RM)
    return str(tmp_path / "rm")


def _score_in_a_thread(fn) -> list:
    """The scores of two rows as the loop gets them: through rewards.score, in its timeout thread."""
    spec = rewards.RewardSpec("reward_model", fn=fn, timeout_s=60.0)
    result = rewards.score(["1 + 1", "2 + 2"], ["2", "4"], ["2", "4"], [spec])
    assert not result.errors, result.errors
    return result.per_fn[:, 0].tolist()


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_a_reward_model_loads_on_the_runs_gpu_from_the_scoring_thread(device, two_gpus, rm_path):
    """run.device=cuda:1: the reward scored in its thread (current device 0) loads on cuda:1, in bf16."""
    set_run_device("cuda:1")
    fn = reward_model.make_reward_model(rm_path, device=device, chat_template="none")
    scores = _score_in_a_thread(fn)
    assert two_gpus == [("cuda:1", torch.bfloat16)]
    assert all(s == s for s in scores)  # scored, not masked


def test_an_index_left_open_is_the_current_gpu_of_the_thread_that_placed_the_policy(two_gpus, rm_path):
    """run.device=auto or cuda gives the policy torch.device("cuda"): the current GPU of the main thread (1
    here, as torchrun's set_device makes it), not the scoring thread's (0)."""
    set_run_device(torch.device("cuda"))
    assert run_device() == torch.device("cuda", 1)
    _score_in_a_thread(reward_model.make_reward_model(rm_path, chat_template="none"))
    assert two_gpus == [("cuda:1", torch.bfloat16)]


@pytest.mark.parametrize(("device", "want"), [("cuda:0", ("cuda:0", torch.bfloat16)), ("cpu", ("cpu", torch.float32))])
def test_an_explicit_device_wins_over_the_runs(device, want, two_gpus, rm_path):
    set_run_device("cuda:1")
    _score_in_a_thread(reward_model.make_reward_model(rm_path, device=device, chat_template="none"))
    assert two_gpus == [want]


def test_auto_on_a_cpu_run_stays_on_the_cpu_and_cuda_takes_the_current_gpu(two_gpus, rm_path):
    """A run on the CPU of a machine with GPUs: "auto" follows it (float32), an explicit "cuda" is a GPU."""
    set_run_device("cpu")
    reward_model.make_reward_model(rm_path, chat_template="none").load()
    reward_model.make_reward_model(rm_path, device="cuda", chat_template="none").load()
    assert two_gpus == [("cpu", torch.float32), ("cuda:1", torch.bfloat16)]


def test_without_a_run_device_auto_is_the_current_gpu(two_gpus, rm_path):
    """Called directly (no run placed a policy): "auto" is CUDA when available, the current device."""
    reward_model.make_reward_model(rm_path, chat_template="none").load()
    assert two_gpus == [("cuda:1", torch.bfloat16)]


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_the_preflight_counts_auto_and_cuda_on_the_runs_gpu(device, tmp_path, monkeypatch):
    """A run on cuda:1 alone (device_index 1, current device 0): its reward model on "auto" or "cuda" is
    on GPU 1 with it, so the pre-flight of GPU 1 counts it, once, as a run on GPU 0 counts it there."""
    from test_memory_rewards import QWEN15, _lora_cfg, _qwen7b_reward_model, _with_reward_model

    from minigrpo.memory import estimate_peak
    from minigrpo.memory_rewards import reward_model_weight_bytes
    from minigrpo.models.args import ModelArgs
    from minigrpo.models.presets import preset_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    rm = ModelArgs.from_hf_config(preset_config("qwen2.5-7b"))
    cfg = _with_reward_model(_lora_cfg(), path=_qwen7b_reward_model(tmp_path / "rm7b"), device=device)

    def counted(index: int) -> int:
        return estimate_peak(cfg, QWEN15, prompt_tokens=256, device_index=index).parts["reward_models"]

    assert counted(1) == counted(0) == reward_model_weight_bytes(rm, 1, 2)
    on_cpu = estimate_peak(cfg, QWEN15, prompt_tokens=256, device_type="cpu").parts["reward_models"]
    assert on_cpu == (reward_model_weight_bytes(rm, 1, 4) if device == "auto" else 0)  # a CPU run: "auto" is its CPU


def test_training_and_eval_name_the_run_device_before_scoring(tmp_path, monkeypatch):
    """build_run and the eval command tell the rewards where the policy runs, so a reward model on
    "auto" / "cuda" loads beside it (they did not: it went to the scoring thread's GPU 0)."""
    import torch
    from helpers.runs import launch, run_config

    from minigrpo import build
    from minigrpo import eval as evaluation

    seen = []
    monkeypatch.setattr(build, "set_run_device", seen.append)
    monkeypatch.setattr(evaluation, "set_run_device", seen.append)
    cfg = run_config(tmp_path, train={"steps": 1}, checkpoint={"every": 0, "save_final": True})
    launch(tmp_path, cfg)
    evaluation.main(["--checkpoint", str(tmp_path / "runs" / "run"), "--split", "train", "--num", "2"])
    assert seen == [torch.device("cpu"), torch.device("cpu")]
