"""Names that configs of other training tools use, each with the key of ours that means the same, or why none does.

A YAML copied from TRL's GRPOConfig, PEFT's LoraConfig or transformers' TrainingArguments holds their names
(`num_generations: 8`, `learning_rate: 1e-6`). An unknown key that is one of them gets a one-line error naming
our dotted key, and saying so where the meaning differs (TRL's per_device_train_batch_size counts completions
per pass; a step here is set by prompts) or where nothing here matches:

    unknown config key 'num_generations': this is grpo.group_size here (completions sampled per prompt)

`Config.foreign_name` is `foreign_name`, which `configio` asks for every unknown key (configio knows no schema).
Every key named here is a real config key (tests/test_config_names.py walks the tables).
"""

from __future__ import annotations

# name -> (our dotted key or None, what differs or what to write instead; "" when the meaning is the same).
# `rewards.N.weight`: the weight of each entry of the rewards list.
NAMES: dict[str, tuple[str | None, str]] = {
    # TRL GRPOConfig: the objective and the rollout
    "num_generations": ("grpo.group_size", "completions sampled per prompt"),
    "beta": ("grpo.beta", "the KL coefficient; online DPO's beta is dpo.beta, PPO's KL weight ppo.kl_coef"),
    "epsilon": ("grpo.epsilon", "the lower clip: ratio >= 1 - epsilon"),
    "epsilon_high": ("grpo.epsilon_high", "the upper clip; null follows grpo.epsilon"),
    "loss_type": ("grpo.loss_type", "grpo, bnpo, dr_grpo or dapo; online DPO's is dpo.loss"),
    "num_iterations": ("grpo.num_iterations", "optimizer passes over each step's completions"),
    "scale_rewards": ("grpo.scale_rewards", "group, batch or none; TRL's older true/false are group/none"),
    "mask_truncated_completions": ("grpo.mask_truncated_completions", ""),
    "reward_weights": ("rewards.N.weight", "not a list: each entry of rewards has its weight, {name: ..., weight: 2}"),
    "reward_funcs": ("rewards", "a list of {name: ..., weight: ...}: registry names or package.module:function"),
    "max_completion_length": ("sampler.max_new_tokens", "eval.max_new_tokens when evaluating"),
    "max_prompt_length": ("data.max_prompt_tokens", "not the same: a longer prompt is dropped, not truncated"),
    "temperature": ("sampler.temperature", "also divides the logits in training; eval.temperature when evaluating"),
    "top_p": ("sampler.top_p", "1 = off"),
    "top_k": ("sampler.top_k", "0 = off"),
    "min_p": ("sampler.min_p", "0 = off"),
    "repetition_penalty": (None, "the samplers apply no repetition penalty"),
    "generation_batch_size": (None, "a step samples grpo.prompts_per_step * grpo.group_size completions"),
    "steps_per_generation": (None, "a step's completions make grpo.num_iterations updates, each on all of them"),
    "use_vllm": ("sampler.kind", "not the same: write sampler.kind: vllm (colocated; there is no vLLM server mode)"),
    "vllm_mode": ("sampler.kind", "not the same: sampler.kind: vllm is TRL's colocate mode; there is no server mode"),
    "vllm_gpu_memory_utilization": ("sampler.gpu_memory_utilization", "the share of GPU memory vLLM takes"),
    "vllm_enable_sleep_mode": ("sampler.vllm_sleep", ""),
    "vllm_importance_sampling_correction": (
        "grpo.is_correction",
        "not the same: a mode (token_truncate, token_mask, sequence_truncate, sequence_mask) or null, not true/false",
    ),
    "vllm_importance_sampling_mode": ("grpo.is_correction", "the same mode names; null = off"),
    "vllm_importance_sampling_cap": ("grpo.is_cap", ""),
    "log_completions": ("log.sample_every", "not the same: print a completion every this many steps (0 = never)"),
    # TRL PPOConfig
    "cliprange": ("ppo.clip_eps", ""),
    "cliprange_value": ("ppo.value_clip", ""),
    "num_ppo_epochs": ("ppo.epochs", ""),
    "num_mini_batches": ("ppo.mini_batches", ""),
    # TRL ModelConfig / ScriptArguments, SFTConfig
    "model_name_or_path": ("model.name_or_path", ""),
    "model_revision": ("model.revision", ""),
    "torch_dtype": ("run.dtype", "auto, float32, bfloat16 or float16"),
    "use_peft": ("lora.enabled", ""),
    "load_in_4bit": ("lora.quantize_base", "not the same: write lora.quantize_base: nf4, with lora.enabled: true"),
    "lora_r": ("lora.r", "the adapter rank"),
    "lora_target_modules": ("lora.targets", "not the same: short names q, k, v, o, gate, up, down, not q_proj ..."),
    "dataset_name": ("data.path", "a dataset repo id with data.source: hub (or gsm8k)"),
    "dataset_config": ("data.subset", ""),
    "dataset_train_split": ("data.split", ""),
    "dataset_test_split": ("data.eval_split", ""),
    "max_seq_length": ("sft.max_seq_len", "SFT only; GRPO's limits are data.max_prompt_tokens, sampler.max_new_tokens"),
    "max_length": ("sft.max_seq_len", "SFT only; GRPO's limits are data.max_prompt_tokens, sampler.max_new_tokens"),
    # PEFT LoraConfig
    "r": ("lora.r", "the adapter rank"),
    "lora_alpha": ("lora.alpha", "scaling alpha / r (alpha / sqrt(r) with lora.rslora)"),
    "lora_dropout": ("lora.dropout", ""),
    "target_modules": ("lora.targets", "not the same: short names q, k, v, o, gate, up, down, not q_proj ..."),
    "use_rslora": ("lora.rslora", ""),
    "use_dora": (None, "adapters are plain LoRA (lora.rslora for rank-stabilised scaling)"),
    # transformers TrainingArguments (TRL's configs inherit them)
    "per_device_train_batch_size": (
        "train.micro_batch_size",
        "the nearest: completions per forward/backward pass on each process, as TRL's counts completions, not "
        "prompts; but a step here trains on all grpo.prompts_per_step * grpo.group_size completions",
    ),
    "gradient_accumulation_steps": (
        None,
        "a step accumulates its grpo.prompts_per_step * grpo.group_size completions in passes of "
        "train.micro_batch_size, so the passes follow from those",
    ),
    "learning_rate": ("train.lr", "the peak learning rate"),
    "max_steps": (
        "train.steps",
        "not the same: a step here samples a batch and makes grpo.num_iterations optimizer updates on it; "
        "TRL's max_steps counts the updates",
    ),
    "num_train_epochs": (None, "a run lasts train.steps steps of grpo.prompts_per_step prompts each"),
    "warmup_ratio": (None, "train.warmup_steps counts steps: write ratio * train.steps"),
    "lr_scheduler_type": (
        "train.schedule",
        "constant, linear or cosine, ending at train.min_lr_ratio * train.lr; constant_with_warmup is constant "
        "with train.warmup_steps",
    ),
    "adam_beta1": ("train.betas", "not the same: the first of the pair train.betas: [0.9, 0.99]"),
    "adam_beta2": ("train.betas", "not the same: the second of the pair train.betas: [0.9, 0.99]"),
    "adam_epsilon": ("train.eps", ""),
    "optim": ("train.optimizer", "adamw, adamw8bit or paged_adamw8bit"),
    "bf16": (
        "run.dtype",
        "not the same: write run.dtype: bfloat16, the dtype of weights and activations (no autocast); "
        "auto picks it on CUDA",
    ),
    "fp16": ("run.dtype", "not the same: write run.dtype: float16, the dtype of weights and activations (no autocast)"),
    "gradient_checkpointing": ("model.gradient_checkpointing", ""),
    "logging_steps": ("log.every", "a table row every this many steps; metrics.jsonl gets every step"),
    "report_to": ("log.wandb", "not the same: log.wandb and log.tensorboard are true/false"),
    "save_steps": ("checkpoint.every", "0 = only the final checkpoint"),
    "save_total_limit": ("checkpoint.keep_last", ""),
    "output_dir": (
        "run.output_dir",
        "not the same: it is the parent folder; the run writes to run.output_dir/run.name",
    ),
    "run_name": ("run.name", "the run's folder under run.output_dir"),
    "seed": ("run.seed", "data.synthetic.seed seeds the synthetic task"),
    "resume_from_checkpoint": (
        "run.resume",
        "not the same: true continues from the latest checkpoint in the run folder; it takes no path",
    ),
}

# (section, name) -> as NAMES, where a section reads the name otherwise (SFT counts conversations)
IN_SECTION: dict[tuple[str, str], tuple[str | None, str]] = {
    ("sft", "per_device_train_batch_size"): (
        "sft.micro_batch_size",
        "conversations per forward/backward pass; sft.batch_size counts a step's",
    ),
    ("sft", "gradient_accumulation_steps"): (
        None,
        "a step trains on sft.batch_size conversations in passes of sft.micro_batch_size",
    ),
    ("sft", "max_steps"): ("train.steps", "the optimizer steps of the SFT run"),
    ("dpo", "loss_type"): ("dpo.loss", "sigmoid or ipo"),
    ("eval", "max_completion_length"): ("eval.max_new_tokens", ""),
}


def foreign_name(section: str, name: str) -> str | None:
    """How an unknown key `name` of `section` ("" at the top level, "grpo", "rewards.0") reads here when another
    tool's config uses it ("this is grpo.group_size here (...)"), or None when it is no such name."""
    found = IN_SECTION.get((section, name)) or NAMES.get(name)
    if found is None:
        return None
    target, note = found
    if target is None:
        return f"no equivalent here: {note}"
    return f"this is {target} here" + (f" ({note})" if note else "")
