"""The PPO critic: a Transformer body with a scalar head, giving a value per completion token.

    critic = build_critic(cfg, policy, device, dtype, total_steps)   # ValueModel + its optimizer and schedule
    with critic.model.active():                          # forward AND backward inside (see below)
        values = critic.model.values(ids, attn, Tc)      # (N, Tc) fp32

values[:, t] = head(h[Tp - 1 + t]): the final-norm hidden state at the column that predicts
completion token t, i.e. V of the state before action t (the same columns the log-probs use).

Two kinds (`ppo.value_model`):
    separate   its own Transformer, every weight trained: a copy of the policy's starting weights
               (its LoRA adapters stripped), or `ppo.value_path`: a *ForSequenceClassification
               checkpoint (a reward model, whose score head becomes the value head, as InstructGPT
               starts its critic from the reward model) or a causal LM checkpoint (fresh head). The
               LM head is dropped: a critic never computes logits.
    lora       no second body: the policy's frozen base with a second set of LoRA adapters (same
               targets, rank and alpha as lora.*) and the head. The LoRALinear layers hold one
               adapter pair each, so `active()` swaps the critic's pairs into them for the value
               pass and swaps the policy's back after. Gradient checkpointing recomputes a block's
               forward during backward, so the value loss's backward must run inside `active()` too;
               the policy's own forward and backward run outside it and never see the critic's pairs.

Under torchrun both kinds are replicated on every rank: built the same everywhere (and rank 0's
weights broadcast), their gradients all-reduced in step.optimizer_step; a separate body is built in
the compute dtype even where FSDP keeps the policy's parameters in fp32 (algorithms/ppo.py).

The head is (1, D) without bias, fp32, and starts at zero (a reward model's score head excepted):
the first values are exactly 0, so the first step's advantages are those of the rewards alone, and
no random head adds noise to them. The body then gets its first gradient once the head has moved.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minigrpo import lora
from minigrpo.errors import UserError
from minigrpo.grad_scale import GradScale
from minigrpo.logprobs import predicting_columns
from minigrpo.models.args import ModelArgs

# ================================================================================================
# the two kinds of critic


class ValueModel(nn.Module):
    """The interface both kinds share: values(), active(), and the trainable parameters.

    A ValueModel's own parameters (`named_parameters()`, `state_dict()`) are exactly what it trains
    and checkpoints: the policy a LoRA critic works through is not one of its children.
    """

    head: nn.Linear

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def active(self) -> contextlib.AbstractContextManager:
        """The context the value forward and its backward must run in (a no-op for `separate`)."""
        return contextlib.nullcontext()

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int) -> torch.Tensor:
        """input_ids, attention_mask (N, Tp + Tc) -> values (N, Tc) fp32 of the states before each
        completion token."""
        N, T = input_ids.shape
        Tc = completion_len
        assert attention_mask.shape == (N, T) and 0 < Tc < T
        hidden = self.hidden(input_ids, attention_mask)  # (N, T, D)
        columns = predicting_columns(attention_mask, Tc)  # (N, Tc): the last real token before token t
        states = hidden[torch.arange(N, device=hidden.device)[:, None], columns]  # (N, Tc, D)
        return F.linear(states.float(), self.head.weight.float())[..., 0]  # (N, Tc) fp32

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def _zero_head(dim: int, device: torch.device) -> nn.Linear:
    head = nn.Linear(dim, 1, bias=False, device=device, dtype=torch.float32)  # (1, D)
    nn.init.zeros_(head.weight)
    return head


class SeparateValueModel(ValueModel):
    """A Transformer of its own (`body`, every weight trained) and the head."""

    def __init__(self, body: nn.Module, head: nn.Linear | None = None) -> None:
        super().__init__()
        body.lm_head = None  # no logits: a tied model keeps its embedding, an untied one frees its head
        self.body = body.requires_grad_(True)
        self.head = head if head is not None else _zero_head(body.args.dim, body.device)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.body.hidden(input_ids, attention_mask=attention_mask)  # (N, T, D)


class _AdapterPair(nn.Module):
    """One adapted layer's A (r, in) and B (out, r), shaped and initialised as LoRALinear's own."""

    def __init__(self, layer: lora.LoRALinear) -> None:
        super().__init__()
        a, b = layer.lora_A.weight, layer.lora_B.weight
        self.lora_A = nn.Linear(a.shape[1], a.shape[0], bias=False, device=a.device, dtype=a.dtype)
        self.lora_B = nn.Linear(b.shape[1], b.shape[0], bias=False, device=b.device, dtype=b.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)


class LoRAValueModel(ValueModel):
    """The policy's frozen base with the critic's own adapter pairs (swapped in by `active()`) and the head."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        layers = lora.lora_layers(policy)
        if not layers:
            raise UserError("ppo.value_model=lora needs a LoRA policy (lora.enabled=true); use value_model: separate")
        object.__setattr__(self, "policy", policy)  # not a child: its weights are not the critic's
        self.names = list(layers)
        self.adapters = nn.ModuleDict({_key(name): _AdapterPair(layer) for name, layer in layers.items()})
        self.head = _zero_head(policy.args.dim, policy.device)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self._swapped_in():  # nested: the outer context swaps back
            yield
            return
        layers = lora.lora_layers(self.policy)
        own = {name: (layer.lora_A, layer.lora_B) for name, layer in layers.items()}
        try:
            for name in self.names:
                pair = self.adapters[_key(name)]
                layers[name].lora_A, layers[name].lora_B = pair.lora_A, pair.lora_B
            yield
        finally:
            for name, (a, b) in own.items():
                layers[name].lora_A, layers[name].lora_B = a, b

    def _swapped_in(self) -> bool:
        first = lora.lora_layers(self.policy)[self.names[0]]
        return first.lora_A is self.adapters[_key(self.names[0])].lora_A

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if not self._swapped_in():
            raise RuntimeError("a LoRA critic's forward runs inside `with critic.active():`")
        return self.policy.hidden(input_ids, attention_mask=attention_mask)  # (N, T, D)

    def train(self, mode: bool = True) -> LoRAValueModel:
        self.policy.train(mode)  # the shared body's dropout follows the critic in its pass
        return super().train(mode)


def _key(name: str) -> str:
    return name.replace(".", "__")  # module names cannot hold dots


def strip_lora(model: nn.Module) -> nn.Module:
    """Put every LoRALinear's base module back in its place (the adapters are dropped)."""
    for name, layer in lora.lora_layers(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    return model


# ================================================================================================
# building


def load_value_body(path: str, *, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, nn.Linear | None]:
    """(body, head) from `ppo.value_path`: a sequence-classification checkpoint gives its score head
    (num_labels must be 1), a causal LM (HF folder, GGUF file, hub id) none: a zero head is made."""
    from minigrpo.models import loading
    from minigrpo.models.reward_model import load_reward_model

    source = _value_source(path)
    if loading._is_gguf(source) or not is_classification(loading._read_config(source)):
        body, _ = loading.load_pretrained(str(source), dtype=dtype, device=device)
        return body, None
    body, _ = load_reward_model(str(source), dtype=dtype, device=device, load_tokenizer=False)
    _check_one_label(path, body.num_labels)
    head = _zero_head(body.args.dim, device)
    with torch.no_grad():
        head.weight.copy_(_stored_score_head(source))  # as stored: not rounded to a 16-bit body's dtype
    body.score = None  # the head holds it now
    return body, head


def _value_source(path: str) -> Path:
    """The local folder or file `ppo.value_path` names; a hub repo is fetched, its weights only once its
    config.json is one a critic can be built from (a classifier's with one label)."""
    from minigrpo.models import loading
    from minigrpo.models.hub import download
    from minigrpo.models.reward_model import meta_reward_model

    if path in loading.PACKAGED_MODELS or Path(path).expanduser().exists() or loading._looks_local(path):
        return loading._resolve(path, None)

    def weights_to_fetch(folder: Path) -> list[str]:
        config = loading._read_config(folder)
        if is_classification(config):
            _check_one_label(path, meta_reward_model(config, folder / "config.json").num_labels)
        else:
            loading._model_from_config(config, folder / "config.json")  # meta device: nothing allocated
        return loading._hub_weight_files(folder)

    return download(path, None, weights_to_fetch)


def _check_one_label(path: str, num_labels: int) -> None:
    if num_labels != 1:
        raise UserError(f"ppo.value_path={path!r} has num_labels={num_labels}: a value head gives one number")


def _stored_score_head(source: Path) -> torch.Tensor:
    """score.weight (1, D) of a classification checkpoint as its file stores it: an fp32 head stays
    exactly the reward model's, whatever dtype the body loads in (the value head is fp32)."""
    from minigrpo.models import loading
    from minigrpo.models.safetensors_io import iter_tensors

    where = loading._hf_tensor_source(source)[0]["score.weight"][1]  # load_reward_model checked it is there
    return dict(iter_tensors(where, ["score.weight"]))["score.weight"].float()  # (1, D) fp32


def check_value_path(path: str, policy: str | None = None) -> None:
    """What load_value_body will read, without reading a weight (before any weights load): a
    UserError naming ppo.value_path for a missing folder, a broken config or weights file, a
    classifier with num_labels != 1, a vocabulary smaller than that of the `policy` folder. A hub id
    that is not on disk is checked when fetched."""
    from minigrpo.models import loading

    folder = Path(path).expanduser()
    if not folder.exists() and loading._looks_local(path):
        raise UserError(f"ppo.value_path={path!r} does not exist")
    try:
        if not folder.is_dir() or not is_classification(loading._read_config(folder)):
            loading.check_model_source(path, require_tokenizer=False)  # a causal LM (or a hub id)
        else:
            _check_classifier(folder)
        policy_folder = None if policy is None else Path(policy).expanduser()
        if folder.is_dir() and policy_folder is not None and (policy_folder / "config.json").is_file():
            _check_vocabularies(folder, policy_folder)  # both configs are sound by now
    except UserError as e:
        raise UserError(f"ppo.value_path={path!r}: {e}") from e


def _check_classifier(folder: Path) -> None:
    """A score-head checkpoint: the score weight present with one row per label, one label, every
    tensor's shape right. The head is read first: a config.json that names no labels counts 2
    (transformers' default), so a one-row head then names the key to set, not a count it never had."""
    from minigrpo.models import loading
    from minigrpo.models.reward_model import RewardModel, check_score_head, read_reward_config

    config = loading._read_config(folder)
    num_labels, pad = read_reward_config(config, folder / "config.json")
    build = functools.partial(RewardModel, num_labels=1, pad_token_id=pad)
    model = loading._model_from_config(config, folder / "config.json", build)  # meta device: no memory
    shapes = loading._hf_tensor_source(folder)[0]
    check_score_head(folder, shapes, num_labels)  # a head that disagrees with the labels: say which to fix
    if num_labels != 1:
        raise UserError(f"num_labels={num_labels}: a value head gives one number (num_labels=1)")
    loading._check(model, shapes)


def _check_vocabularies(folder: Path, policy: Path) -> None:
    """The critic reads the policy's token ids: its vocabulary must hold all of them."""
    from minigrpo.models import loading

    ours = ModelArgs.from_hf_config(loading._read_config(folder)).vocab_size
    theirs = ModelArgs.from_hf_config(loading._read_config(policy)).vocab_size
    if ours < theirs:
        raise UserError(
            f"a vocabulary of {ours} tokens, the policy ({policy}) {theirs}: the critic reads the policy's token ids"
        )
    differ = _ids_that_differ(folder / "tokenizer.json", policy / "tokenizer.json")
    if differ:
        warnings.warn(
            f"{folder}'s tokenizer numbers {differ} of the policy's tokens otherwise than the policy's ({policy}): "
            "the critic reads the policy's ids, so its initial values come from other tokens",
            UserWarning,
            stacklevel=2,
        )


def _ids_that_differ(critic: Path, policy: Path) -> int:
    """How many of the policy tokenizer's tokens have another id (or none) in the critic's; 0 without both files."""
    if not (critic.is_file() and policy.is_file()):
        return 0
    from tokenizers import Tokenizer

    try:
        ours, theirs = (Tokenizer.from_file(str(f)).get_vocab(with_added_tokens=True) for f in (critic, policy))
    except Exception:  # a file the loader itself will judge: not this check's to refuse
        return 0
    return sum(ours.get(token) != i for token, i in theirs.items())


def is_classification(config: dict[str, Any]) -> bool:
    archs = config.get("architectures") or []
    return isinstance(archs, list) and any(str(a).endswith("ForSequenceClassification") for a in archs)


def build_value_model(cfg, policy: nn.Module, device: torch.device, dtype: torch.dtype) -> ValueModel:
    """The critic `ppo.value_model` names, on `device`; its body in `dtype`, its head fp32, and with
    train.fp32_norms a 16-bit body's RMSNorm gains fp32, as the policy's (Transformer.norms_in_fp32)."""
    p = cfg.ppo
    if p.value_model == "lora":
        return LoRAValueModel(policy)
    if p.value_path is not None:
        body, head = load_value_body(p.value_path, dtype=dtype, device=device)
        if body.args.vocab_size < policy.args.vocab_size:
            raise UserError(
                f"ppo.value_path={p.value_path!r} has a vocabulary of {body.args.vocab_size} tokens, the policy "
                f"{policy.args.vocab_size}: the critic reads the policy's token ids"
            )
    else:  # the policy's starting weights, without its adapters (FSDP's fp32 masters cast to dtype)
        body, head = strip_lora(copy.deepcopy(policy)).to(dtype), None
    if cfg.train.fp32_norms and dtype in (torch.bfloat16, torch.float16):
        body.norms_in_fp32()  # every weight trains: a 16-bit gain would not move at RL learning rates
    body.gradient_checkpointing = cfg.model.gradient_checkpointing
    body.activation_offload = cfg.model.activation_offload
    return SeparateValueModel(body, head).to(device)


@dataclass
class Critic:
    """The value model with its own optimizer and schedule (stepped with the policy's)."""

    model: ValueModel
    optimizer: torch.optim.Optimizer
    scheduler: Any
    grad_scale: GradScale = field(default_factory=GradScale)  # float16: its own loss scale


def build_critic(cfg, policy: nn.Module, device: torch.device, dtype: torch.dtype, total_steps: int) -> Critic:
    """The critic and an optimizer like the policy's (train.*) at ppo.value_lr (None: train.lr),
    with the same schedule over `total_steps` optimizer steps."""
    from minigrpo.algorithms import updates_per_step
    from minigrpo.optim import build_optimizer, build_scheduler

    model = build_value_model(cfg, policy, device, dtype)
    lr = cfg.train.lr if cfg.ppo.value_lr is None else cfg.ppo.value_lr
    train = dataclasses.replace(cfg.train, lr=lr)
    optimizer = build_optimizer(model.trainable_parameters(), train)
    scheduler = build_scheduler(optimizer, train, total_steps, updates_per_step(cfg))
    return Critic(model, optimizer, scheduler, GradScale.for_dtype(dtype))


def critic_state(critic: Critic) -> dict[str, Any]:
    """The critic's part of a checkpoint's trainer state: its weights (CPU), optimizer (by parameter
    name, with fp32 masters), schedule and loss scale."""
    from minigrpo.optim_state import optimizer_state

    return {
        "weights": {name: t.detach().cpu() for name, t in critic.model.state_dict().items()},
        "optimizer": optimizer_state(critic.model, critic.optimizer),
        "scheduler": critic.scheduler.state_dict(),
        "grad_scale": critic.grad_scale.state_dict(),
    }


def load_critic_state(critic: Critic, state: dict[str, Any] | None, where: Path | str) -> None:
    """Restore `critic_state` (a resumed run continues exactly); UserError naming the checkpoint when
    it holds no critic, CorruptCheckpointError naming its state.json when a part does not fit this critic
    (one line, not a traceback from inside torch)."""
    from minigrpo.checkpoint import restoring
    from minigrpo.optim_state import load_optimizer_state

    if not state:
        raise UserError(f"{where} holds no critic (it was not saved by an algorithm: ppo run)")
    with restoring(Path(where), "critic weights"):
        critic.model.load_state_dict(state["weights"])
    with restoring(Path(where), "critic optimizer state"):
        load_optimizer_state(critic.model, critic.optimizer, state["optimizer"])
    with restoring(Path(where), "critic learning-rate schedule"):
        critic.scheduler.load_state_dict(state["scheduler"])
    with restoring(Path(where), "critic loss scale"):
        critic.grad_scale.load_state_dict(state.get("grad_scale", {}))  # absent from older checkpoints


__all__ = [
    "Critic",
    "LoRAValueModel",
    "SeparateValueModel",
    "ValueModel",
    "build_critic",
    "build_value_model",
    "check_value_path",
    "critic_state",
    "is_classification",
    "load_critic_state",
    "load_value_body",
    "strip_lora",
]
