"""The tokenizer of a GGUF file, rebuilt from its metadata (`tokenizer.ggml.*`) with `tokenizers`.

    tok = build_tokenizer(GGUFCheckpoint(path))      # what GGUFCheckpoint.tokenizer() returns

* `tokenizer.ggml.model == "gpt2"`: byte-level BPE (tokens, merges, token types); `tokenizer.ggml.pre`
  names llama.cpp's pre-tokenizer regex set, rebuilt here as the models' own tokenizer.json has it.
* `"llama"`: a SentencePiece vocabulary (Llama 2, Mistral, Phi-3: pieces with scores, `<0xNN>` byte
  tokens for byte fallback), rebuilt as transformers rebuilds it (see `_sentencepiece_backend`).
* Token types: CONTROL and UNKNOWN tokens are special, USER_DEFINED ones plain added tokens; the
  special ids, add_bos/add_eos flags and chat templates come from the metadata too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from minigrpo.tokenizer import Tokenizer

from .gguf_header import GGUFError

if TYPE_CHECKING:
    from .gguf import GGUFCheckpoint

# Pre-tokenizer regexes (as in the models' own tokenizer.json) for tokenizer.ggml.pre values; "gpt2"
# and "smollm" use ByteLevel's built-in GPT-2 regex.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's names of each regex set (its converter names a tokenizer by hashing what it makes of a test text;
# its runtime reads these names alike): "gpt-2" is what it writes for GPT-2's own regex ("gpt2" is read too),
# DeepSeek-R1's Qwen distills use Qwen2's regex, Falcon3 Llama 3's.
_GPT2_PRES = ("default", "gpt2", "gpt-2", "phi-2")
_LLAMA3_PRES = ("llama-bpe", "llama3", "llama-v3", "falcon3")
_QWEN2_PRES = ("qwen2", "deepseek-r1-qwen")
# End-of-text / end-of-turn control tokens of common chat formats: generation stops on any of them
# (llama.cpp does the same), on top of the eos/eot/eom ids in the metadata.
_END_TOKENS = (
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
)
_SPACE = "\u2581"  # SentencePiece's visible space
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 2, 3, 4


def build_tokenizer(ckpt: GGUFCheckpoint) -> Tokenizer:
    """Rebuild the tokenizer from metadata: the vocabulary model (see `_byte_level_backend` and
    `_sentencepiece_backend`), then token types, special ids, add_bos/add_eos and chat templates."""
    kind = ckpt.require("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise GGUFError(
            f"{ckpt.path}: tokenizer.ggml.model {kind!r} is not supported "
            "(only 'gpt2' byte-level BPE and 'llama' SentencePiece)"
        )
    tokens: list[str] = ckpt.require("tokenizer.ggml.tokens")
    vocab = _token_ids(ckpt, tokens)
    if kind == "gpt2":
        tk = _byte_level_backend(ckpt, vocab)
        add_bos_default = ckpt.get("tokenizer.ggml.pre", "default") in _LLAMA3_PRES
    else:
        tk = _sentencepiece_backend(ckpt, tokens, vocab)
        add_bos_default = True  # llama.cpp and transformers add BOS unless the file says otherwise
    return _wrap_tokenizer(ckpt, tk, tokens, add_bos_default)


def _token_ids(ckpt: GGUFCheckpoint, tokens: list[str]) -> dict[str, int]:
    """token -> id; a token listed twice is an error (one of its ids could never be produced)."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        seen: set[str] = set()
        dup = next(tok for tok in tokens if tok in seen or seen.add(tok))
        raise GGUFError(f"{ckpt.path}: token {dup!r} appears twice in the vocabulary")
    return vocab


def _listed_merges(ckpt: GGUFCheckpoint) -> list[tuple[str, str]] | None:
    """`tokenizer.ggml.merges` as pairs, or None when the file lists none."""
    merges = ckpt.get("tokenizer.ggml.merges")
    if merges is None:
        return None
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bad = next((i for i, pair in enumerate(pairs) if len(pair) != 2 or not all(pair)), None)
    if bad is not None:  # tokenizers would fail on it with a many-line message naming no file
        raise GGUFError(f"{ckpt.path}: tokenizer.ggml.merges[{bad}] = {merges[bad]!r} is not two tokens and a space")
    return pairs


def _bpe(ckpt: GGUFCheckpoint, vocab: dict[str, int], merges: list[tuple[str, str]], **options: Any) -> Any:
    """A `tokenizers` BPE model; merges naming tokens outside the vocabulary are a GGUFError."""
    from tokenizers import models

    try:
        return models.BPE(vocab=vocab, merges=merges, **options)
    except Exception as e:  # tokenizers raises a bare Exception for merges outside the vocab
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GGUFError(f"{ckpt.path}: inconsistent tokenizer vocab/merges: {reason}") from e


def _byte_level_backend(ckpt: GGUFCheckpoint, vocab: dict[str, int]) -> Any:
    """`gpt2` vocabulary: byte-level BPE split by the regex set `tokenizer.ggml.pre` names."""
    import tokenizers
    from tokenizers import Regex, decoders, normalizers, processors
    from tokenizers import pre_tokenizers as pt

    pre = ckpt.get("tokenizer.ggml.pre", "default")
    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    normalizer = None
    if pre in _GPT2_PRES:  # the GPT-2 regex (files without a pre type predate it)
        pre_tok = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre == "smollm":  # every numeric char alone first, then the GPT-2 regex
        pre_tok = pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)])
    elif pre in _LLAMA3_PRES or pre in _QWEN2_PRES:
        regex = _QWEN2_REGEX if pre in _QWEN2_PRES else _LLAMA3_REGEX
        pre_tok = pt.Sequence([pt.Split(Regex(regex), behavior="isolated"), byte_level])
        normalizer = normalizers.NFC() if pre == "qwen2" else None  # Qwen2's tokenizer.json has NFC, llama.cpp none
    else:
        raise GGUFError(f"{ckpt.path}: tokenizer.ggml.pre {pre!r} is not supported")
    merges = _listed_merges(ckpt) or []
    tk = tokenizers.Tokenizer(_bpe(ckpt, vocab, merges, ignore_merges=pre in _LLAMA3_PRES))
    tk.normalizer = normalizer
    tk.pre_tokenizer = pre_tok
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return tk


def _sentencepiece_backend(ckpt: GGUFCheckpoint, tokens: list[str], vocab: dict[str, int]) -> Any:
    """`llama` vocabulary (SentencePiece: Llama 2, Mistral, Phi-3) as transformers rebuilds it.

    * Model: BPE with byte fallback (a character no piece covers becomes its UTF-8 bytes as the
      `<0xNN>` BYTE tokens) and no unknown token. The merges are the file's `tokenizer.ggml.merges`
      if it has them, else they are derived from `tokenizer.ggml.scores` (`_merges_from_scores`).
    * Spaces become "▁" and one "▁" goes in front of the text: for `llama` files by a
      Metaspace pre-tokenizer that prepends only to the start of the text; for `phi3` by a
      normalizer that prepends to every stretch of text between added tokens (Phi-3's own
      tokenizer.json does so; "  hi" is "▁▁▁hi" there, "▁▁hi" with Metaspace).
    * Decoding turns "▁" back into spaces, joins byte tokens into characters and drops the one
      leading space that the prefix added.

    Differences from llama.cpp, where this follows transformers:
    * `tokenizer.ggml.add_space_prefix = false` is ignored (transformers always prefixes);
      llama.cpp then adds no prefix.
    * llama.cpp always puts a space in front, so " hi" is "▁▁hi" there; Metaspace adds "▁" only
      when the text does not start with a space already (" hi" is "▁hi", and decodes to "hi").
    * llama.cpp prefixes a space again to text that follows a special token it parsed; the
      Metaspace of `llama` files does not.
    * llama.cpp merges pieces by score at run time (SentencePiece's algorithm); the merge list
      derived from scores usually agrees, but pieces of equal score may be merged in another order.
    """
    import tokenizers
    from tokenizers import decoders, normalizers
    from tokenizers import pre_tokenizers as pt

    merges = _listed_merges(ckpt)
    if merges is None:
        merges = _merges_from_scores(tokens, vocab, _scores(ckpt, len(tokens)))
    tk = tokenizers.Tokenizer(_bpe(ckpt, vocab, merges, byte_fallback=True, fuse_unk=True))
    if ckpt.architecture == "phi3":
        tk.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)])
    else:
        tk.pre_tokenizer = pt.Metaspace(replacement=_SPACE, prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tk


def _scores(ckpt: GGUFCheckpoint, n_tokens: int) -> list[float]:
    """`tokenizer.ggml.scores`, one per token (required to derive merges for a SentencePiece vocab)."""
    scores = ckpt.require("tokenizer.ggml.scores")
    if len(scores) != n_tokens:
        raise GGUFError(f"{ckpt.path}: tokenizer.ggml.scores has {len(scores)} entries for {n_tokens} tokens")
    return [float(s) for s in scores]


def _wrap_tokenizer(ckpt: GGUFCheckpoint, tk: Any, tokens: list[str], add_bos_default: bool) -> Tokenizer:
    """The Tokenizer of backend `tk`: tokens typed CONTROL/UNKNOWN become special added tokens,
    USER_DEFINED ones plain added tokens (both matched whole in text), plus the special ids,
    stop ids, add_bos/add_eos flags and chat templates of the metadata."""
    from tokenizers import AddedToken

    types: list[int] = ckpt.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError(f"{ckpt.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    special = [i for i, ty in enumerate(types) if ty in (_TOKEN_CONTROL, _TOKEN_UNKNOWN)]
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    user = [i for i, ty in enumerate(types) if ty == _TOKEN_USER_DEFINED]
    tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])

    ids = {key: _token_id(ckpt, key, len(tokens)) for key in _ID_KEYS}
    names = {key: None if tid is None else tokens[tid] for key, tid in ids.items()}
    stop_ids = [ids["eot_token_id"], ids["eom_token_id"]] + [i for i in special if tokens[i] in _END_TOKENS]
    templates = {"default": ckpt.get("tokenizer.chat_template")}
    named = ckpt.get("tokenizer.chat_templates") or []
    if isinstance(named, str) or not all(isinstance(name, str) for name in named):  # not read letter by letter
        raise GGUFError(f"{ckpt.path}: tokenizer.chat_templates must be an array of template names, got {named!r:.80}")
    for name in named:
        templates[name] = ckpt.get(f"tokenizer.chat_template.{name}")
    templates = {k: v for k, v in templates.items() if v is not None}
    _compile_chat_templates(ckpt, templates)
    return Tokenizer(
        tk,
        bos_token=names["bos_token_id"],
        eos_token=names["eos_token_id"],
        pad_token=names["padding_token_id"],
        unk_token=names["unknown_token_id"],
        chat_template=templates or None,
        chat_template_files=dict.fromkeys(templates, ckpt.path),  # a template failing to render names the file
        add_bos_token=_add_flag(ckpt, "bos", ids["bos_token_id"], add_bos_default),
        add_eos_token=_add_flag(ckpt, "eos", ids["eos_token_id"], False),
        extra_stop_ids=[i for i in stop_ids if i is not None],
        model_max_length=ckpt.get(f"{ckpt.architecture}.context_length"),
    )


def _compile_chat_templates(ckpt: GGUFCheckpoint, templates: dict[str, Any]) -> None:
    """Compile every chat template now: a broken one is an error naming the file and its key before any
    weight is read, not a message naming nothing at the first prompt."""
    from minigrpo.chat_template import compile_named_templates

    compile_named_templates(
        templates, lambda name: f"{ckpt.path}: tokenizer.chat_template" + ("" if name == "default" else f".{name}")
    )


_ID_KEYS = ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id", "eot_token_id", "eom_token_id")


def _token_id(ckpt: GGUFCheckpoint, key: str, n_tokens: int) -> int | None:
    """`tokenizer.ggml.{key}`, an id inside the vocabulary, or None when the file has none."""
    tid = ckpt.get(f"tokenizer.ggml.{key}")
    if tid is None:
        return None
    if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < n_tokens:
        raise GGUFError(f"{ckpt.path}: tokenizer.ggml.{key} = {tid!r} is outside the vocabulary of {n_tokens} tokens")
    return tid


def _add_flag(ckpt: GGUFCheckpoint, which: str, token_id: int | None, default: bool) -> bool:
    """`tokenizer.ggml.add_{which}_token` (else `default`); a file that asks for a BOS/EOS token it does not
    name is an error, a default with no such token is off."""
    key = f"tokenizer.ggml.add_{which}_token"
    flag = ckpt.get(key)
    if flag is None:
        return default and token_id is not None
    if flag and token_id is None:
        raise GGUFError(f"{ckpt.path}: {key} is true but the file has no tokenizer.ggml.{which}_token_id")
    return bool(flag)


def _merges_from_scores(tokens: list[str], vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary (which stores pieces and scores, no merges).

    Every way to cut a piece into two pieces of the vocabulary is a merge that makes it. Merges are
    ranked as transformers ranks them, so both tokenizers agree: by the made piece's score, best
    first, then by the longer left part, then the longer right part; remaining ties keep vocabulary
    order (pieces by id, and a piece's cuts by the ids of their left, then right parts).
    """
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, score in zip(tokens, scores):
        cuts = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        cuts = sorted((c for c in cuts if c[0] in vocab and c[1] in vocab), key=lambda c: (vocab[c[0]], vocab[c[1]]))
        ranked += [(-score, -len(left), -len(right), left, right) for left, right in cuts]
    ranked.sort(key=lambda m: m[:3])  # stable: equal keys keep the order built above
    return [(left, right) for *_, left, right in ranked]
