"""Rebuild a `tokenizers.Tokenizer` from the vocabulary a GGUF file stores in its metadata.

A GGUF has no `tokenizer.json`: llama.cpp keeps the tokens, merges, token types and special ids under
`tokenizer.ggml.*`, and names the pre-tokenizer (the regex that splits text into words before BPE) with
`tokenizer.ggml.pre`. The regexes below are the ones llama.cpp uses for each name (`llama-vocab.cpp`), written as the
`tokenizers` pre-tokenizers that the models' own `tokenizer.json` files use, so ids match llama.cpp and the original
tokenizer. They also match `transformers.AutoTokenizer.from_pretrained(..., gguf_file=...)`, except that transformers
ignores SmolLM's digit split (it gives " ½" one token "Ġ½" where SmolLM's tokenizer.json and llama.cpp give two).

SentencePiece vocabularies (`tokenizer.ggml.model` "llama": Llama 2, Mistral, TinyLlama) are rebuilt the way
transformers does it: a byte-fallback BPE whose merges come from the token scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from alignkit.errors import CheckpointError

# GGUF token types (llama.cpp `llama_token_type`): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# GPT-2's split: contractions, letters, digits, other symbols, whitespace. `tokenizers`' ByteLevel(use_regex=True)
# is exactly this regex (plus a final `\s+` that only catches what llama.cpp leaves as its own piece anyway).
# Llama 3's split (tiktoken cl100k): case-insensitive contractions, numbers in groups of up to 3 digits, newlines kept
# apart from other whitespace. Written with `(?i:...)` as in Meta's tokenizer.json; llama.cpp spells it `'[sS]|...`.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's split: Llama 3's with single digits.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre_tokenizer() -> Any:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm_pre_tokenizer() -> Any:
    # llama.cpp: `\p{N}` first (every digit its own word), then GPT-2's regex; SmolLM's tokenizer.json says the same
    # with Digits(individual_digits=True) before ByteLevel.
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )


def split_pre_tokenizer(pattern: str) -> Any:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


@dataclass(frozen=True)
class _PreTokenizerSpec:
    build: Any
    # llama.cpp looks a whole pre-token up in the vocabulary before applying merges for Llama 3 (`ignore_merges`);
    # Meta's tokenizer.json sets the same flag on its BPE model.
    ignore_merges: bool = False


PRE_TOKENIZERS: dict[str, _PreTokenizerSpec] = {
    "gpt2": _PreTokenizerSpec(_gpt2_pre_tokenizer),
    "smollm": _PreTokenizerSpec(_smollm_pre_tokenizer),
    "starcoder": _PreTokenizerSpec(_smollm_pre_tokenizer),
    "llama-bpe": _PreTokenizerSpec(lambda: split_pre_tokenizer(LLAMA3_SPLIT), ignore_merges=True),
    "llama3": _PreTokenizerSpec(lambda: split_pre_tokenizer(LLAMA3_SPLIT), ignore_merges=True),
    "llama-v3": _PreTokenizerSpec(lambda: split_pre_tokenizer(LLAMA3_SPLIT), ignore_merges=True),
    "qwen2": _PreTokenizerSpec(lambda: split_pre_tokenizer(QWEN2_SPLIT)),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: the alphabet every byte-level BPE token is spelled in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class GGUFMetadata:
    """Typed access to a `gguf.GGUFReader`'s key/value fields, with errors that name the file and key."""

    def __init__(self, reader: Any, source: str) -> None:
        self.fields = reader.fields
        self.source = source

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default: Any = None) -> Any:
        import gguf

        field = self.fields.get(key)
        if field is None:
            return default
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            if field.types[-1] == gguf.GGUFValueType.STRING:
                return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
            return [part.tolist()[0] for part in (field.parts[i] for i in field.data)]
        if kind == gguf.GGUFValueType.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
        return field.parts[field.data[0]].tolist()[0]

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CheckpointError(f"GGUF file {self.source} has no `{key}` metadata, so its tokenizer cannot be built.")
        return value


@dataclass
class GGUFTokenizerParts:
    backend: BackendTokenizer
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None
    add_bos_token: bool


def build_from_gguf(reader: Any, *, source: str) -> GGUFTokenizerParts:
    meta = GGUFMetadata(reader, source)
    kind = meta.require("tokenizer.ggml.model")
    architecture = meta.get("general.architecture", "llama")
    if kind == "llama" and architecture not in SENTENCEPIECE_SPECIAL_CASES:
        backend, add_bos_default = _sentencepiece_backend(meta), True
    elif kind == "gpt2":
        backend, add_bos_default = _byte_level_backend(meta), False
    else:
        raise CheckpointError(
            f"GGUF file {source} has a {kind!r} tokenizer (`tokenizer.ggml.model`) for architecture {architecture!r}; "
            "alignkit rebuilds byte-level BPE ('gpt2': Llama 3, Qwen2, SmolLM, GPT-2) and Llama/Mistral "
            "SentencePiece ('llama') vocabularies only. Load the model from its Hugging Face directory, which has a "
            "tokenizer.json, instead."
        )
    tokens: list[str] = meta.require("tokenizer.ggml.tokens")

    def token_for(key: str) -> str | None:
        token_id = meta.get(key)
        if token_id is None:
            return None
        if not 0 <= token_id < len(tokens):
            raise CheckpointError(f"GGUF file {source}: `{key}` = {token_id} is outside the {len(tokens)}-token vocab.")
        return tokens[token_id]

    return GGUFTokenizerParts(
        backend=backend,
        bos_token=token_for("tokenizer.ggml.bos_token_id"),
        eos_token=token_for("tokenizer.ggml.eos_token_id"),
        pad_token=token_for("tokenizer.ggml.padding_token_id"),
        unk_token=token_for("tokenizer.ggml.unknown_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
    )


# SentencePiece files of these architectures need model-specific fixes (Gemma's space tokens, Phi-3's normalizer).
SENTENCEPIECE_SPECIAL_CASES = {"gemma", "gemma2", "gemma3", "phi3"}


def _sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece's score-ordered merging: every split of a token into two vocab pieces,
    best-scoring result first (the order transformers' `generate_merges` gives, ties broken the same way)."""
    vocab = {token: index for index, token in enumerate(tokens)}
    score_of = dict(zip(tokens, scores))
    candidates: list[tuple[str, str, float]] = []
    for piece, score in score_of.items():
        local = [
            (piece[:i], piece[i:], score)
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        candidates.extend(local)
    candidates.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _sentencepiece_backend(meta: GGUFMetadata) -> BackendTokenizer:
    """Llama 2 / Mistral style: "▁" marks spaces, unknown characters fall back to <0xNN> byte tokens."""
    tokens: list[str] = meta.require("tokenizer.ggml.tokens")
    token_types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]
    else:
        merges = _sentencepiece_merges(tokens, meta.require("tokenizer.ggml.scores"))
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = BackendTokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True))
    add_prefix_space = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_prefix_space else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    _add_control_tokens(backend, tokens, token_types, vocab, alphabet=None)
    return backend


def _add_control_tokens(
    backend: BackendTokenizer, tokens: list[str], token_types: list[int], vocab: dict[str, int],
    alphabet: set[str] | None,
) -> None:
    # Control tokens (<|im_start|>, <|eot_id|>, <s>, ...) must stay whole wherever they appear in text: add them as
    # special tokens. In a byte-level vocabulary a control token spelled outside the byte alphabet cannot be in the
    # BPE vocabulary as-is; llama.cpp mislabels some such tokens, and adding them would grow the vocabulary past the
    # model's embedding, so they are skipped (as transformers' GGUF converter does).
    control = [
        AddedToken(token, special=True, normalized=False)
        for token, kind in zip(tokens, token_types)
        if kind == TOKEN_TYPE_CONTROL and (alphabet is None or set(token) <= alphabet)
    ]
    backend.add_special_tokens(control)
    user_defined = [
        AddedToken(token, special=False, normalized=False)
        for token, kind in zip(tokens, token_types)
        if kind == TOKEN_TYPE_USER_DEFINED and token in vocab
    ]
    if user_defined:
        backend.add_tokens(user_defined)


def _byte_level_backend(meta: GGUFMetadata) -> BackendTokenizer:
    source = meta.source
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        raise CheckpointError(
            f"GGUF file {source} asks for pre-tokenizer {pre!r} (`tokenizer.ggml.pre`), which alignkit does not know; "
            f"supported: {sorted(PRE_TOKENIZERS)}. Load the model from its Hugging Face directory instead."
        )
    tokens: list[str] = meta.require("tokenizer.ggml.tokens")
    merges_raw: list[str] = meta.require("tokenizer.ggml.merges")
    token_types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)

    # Tokens are stored already spelled in GPT-2's byte alphabet ("Ġthe"); the odd one spelled in raw text (a
    # converter's mislabel) is respelled so the BPE model can reach it, as transformers' GGUF converter does.
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    merges = []
    for line, merge in enumerate(merges_raw):
        left, sep, right = merge.partition(" ")
        if not sep:
            raise CheckpointError(
                f"GGUF file {source}: merge {line} of `tokenizer.ggml.merges` is {merge!r}, not two tokens "
                "separated by a space."
            )
        merges.append((left, right))

    backend = BackendTokenizer(models.BPE(vocab, merges, ignore_merges=spec.ignore_merges))
    backend.pre_tokenizer = spec.build()
    backend.decoder = decoders.ByteLevel()

    _add_control_tokens(backend, tokens, token_types, vocab, alphabet)
    return backend
