"""A thin wrapper over a HF fast tokenizer, and a byte-level BPE trainer for the embedded default.

The wrapper works on the Rust ``tokenizers.Tokenizer`` directly (batch encoding runs in parallel
and releases the GIL, which the loader's prefetch thread relies on). Local directories holding a
``tokenizer.json`` load without ``transformers``; hub names and slow-only tokenizers go through
``transformers.AutoTokenizer`` (imported lazily), from which the fast backend is taken.

Nothing is added implicitly: ``encode`` returns the tokens of the text only, unless ``add_bos`` /
``add_eos`` are asked for. Packing adds BOS/EOS itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer as _RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ct_data.chat import (
    BOS,
    EOM,
    EOS,
    EOT,
    LLAMA3_CHAT_TEMPLATE,
    LLAMA3_SPECIAL_TOKENS,
    PAD,
    render_chat,
    validate_messages,
)

# The LLaMA-3 pre-tokenisation split (numbers in groups of up to 3 digits, contractions, words
# with one leading non-letter, punctuation runs, newlines): what the real tokenizer does before BPE.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Tokenizer with the ids the data path needs and the LLaMA-3 chat format."""

    def __init__(
        self,
        backend: _RustTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        name: str = "",
    ):
        self.backend = backend
        self.name = name
        self.chat_template = chat_template or LLAMA3_CHAT_TEMPLATE
        vocab = backend.get_vocab(with_added_tokens=True)

        def pick(*candidates: str | None) -> str | None:
            for c in candidates:
                if c is not None and c in vocab:
                    return c
            return None

        self.bos_token = pick(bos_token, BOS, "<s>")
        self.eos_token = pick(eos_token, EOS, "</s>")
        if self.bos_token is None or self.eos_token is None:
            raise ValueError(f"tokenizer {name!r}: no BOS/EOS token found (bos={bos_token!r}, eos={eos_token!r})")
        self.eot_token = pick(EOT, self.eos_token)
        self.pad_token = pick(pad_token, PAD, self.eos_token)
        self.bos_id: int = vocab[self.bos_token]
        self.eos_id: int = vocab[self.eos_token]
        self.eot_id: int = vocab[self.eot_token]
        self.pad_id: int = vocab[self.pad_token]
        # Generation stops on any of these (LLaMA-3 instruct models end turns with eot or eom).
        self.stop_ids: tuple[int, ...] = tuple(
            sorted({vocab[t] for t in (self.eos_token, self.eot_token, EOM) if t in vocab})
        )
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """Encode many texts at once (parallel in Rust)."""
        # encode_batch_fast skips computing character offsets (tokenizers >= 0.21).
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        encs = encode(list(texts), add_special_tokens=False)
        pre = [self.bos_id] if add_bos else []
        post = [self.eos_id] if add_eos else []
        return [pre + e.ids + post for e in encs]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    def __len__(self) -> int:
        return self.vocab_size

    # ---------------------------------------------------------------- chat
    def render_chat(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
        """The LLaMA-3 chat string (what ``apply_chat_template(..., tokenize=False)`` gives)."""
        return render_chat(validate_messages(messages, require_assistant=False),
                           add_generation_prompt=add_generation_prompt)[0]

    def encode_chat(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False) -> list[int]:
        """Token ids of a conversation, e.g. a prompt for generation (``add_generation_prompt=True``)."""
        return self.backend.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt),
                                   add_special_tokens=False).ids

    def encode_chat_with_mask(self, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation and, per token, whether it belongs to an assistant turn."""
        ids, mask = self.encode_chats_with_mask([messages])[0]
        return ids, mask

    def encode_chats_with_mask(
        self, conversations: Sequence[Sequence[dict[str, str]]]
    ) -> list[tuple[list[int], list[bool]]]:
        """Batch form of encode_chat_with_mask; conversations must already be validated."""
        rendered = [render_chat(c) for c in conversations]
        encs = self.backend.encode_batch([r[0] for r in rendered], add_special_tokens=False)
        return [(e.ids, spans_to_token_mask(e.offsets, spans)) for e, (_, spans) in zip(encs, rendered)]

    # ---------------------------------------------------------------- persistence
    def save(self, out_dir: str | os.PathLike) -> None:
        """Write tokenizer.json + tokenizer_config.json (loadable by load_tokenizer and AutoTokenizer)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
            "chat_template": self.chat_template,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, eot={self.eot_id}, pad={self.pad_id})")


def spans_to_token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """True for tokens whose first character lies inside one of the (sorted) character spans."""
    mask = [False] * len(offsets)
    if not spans:
        return mask
    si = 0
    for i, (start, end) in enumerate(offsets):
        if end <= start:  # zero-width tokens (none in byte-level BPE) follow their neighbour
            mask[i] = mask[i - 1] if i else False
            continue
        while si < len(spans) and spans[si][1] <= start:
            si += 1
        if si == len(spans):
            break
        mask[i] = spans[si][0] <= start < spans[si][1]
    return mask


def load_tokenizer(path_or_name: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a local directory (or tokenizer.json file) or a HF hub name."""
    path = Path(path_or_name)
    if path.is_file() and path.suffix == ".json":
        path = path.parent
    if (path / "tokenizer.json").is_file():
        backend = _RustTokenizer.from_file(str(path / "tokenizer.json"))
        cfg: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        template = cfg.get("chat_template")
        if isinstance(template, list):  # multiple named templates: take the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return Tokenizer(
            backend,
            bos_token=_token_str(cfg.get("bos_token")),
            eos_token=_token_str(cfg.get("eos_token")),
            pad_token=_token_str(cfg.get("pad_token")),
            chat_template=template,
            name=str(path_or_name),
        )
    if path.exists():
        raise FileNotFoundError(f"tokenizer {str(path_or_name)!r}: no tokenizer.json in {path}")
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path_or_name))
    except Exception as e:  # noqa: BLE001 - re-raised with the name
        raise OSError(f"tokenizer {str(path_or_name)!r}: not a local directory and could not be loaded "
                      f"from the hub ({type(e).__name__}: {e})") from e
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"tokenizer {str(path_or_name)!r} has no fast (Rust) backend")
    template = hf.chat_template if isinstance(getattr(hf, "chat_template", None), str) else None
    return Tokenizer(hf.backend_tokenizer, bos_token=hf.bos_token, eos_token=hf.eos_token,
                     pad_token=hf.pad_token, chat_template=template, name=str(path_or_name))


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike | None = None,
    *,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = LLAMA3_SPECIAL_TOKENS,
    split_digits: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE (LLaMA-3 split pattern, LLaMA-3 special tokens, LLaMA-3 chat template).

    ``vocab_size`` counts everything: the 256 byte symbols, the merges and the special tokens, so the
    result fits an embedding of that size. Saved to ``out_dir`` when given. ``split_digits`` makes
    every digit its own token (as Llama-1/2 do) instead of LLaMA-3's groups of up to three: a tiny
    model learns digit-wise arithmetic far faster than a table of 1,000 number tokens.
    """
    n_special = len(special_tokens)
    if vocab_size < 256 + n_special + 1:
        raise ValueError(f"vocab_size={vocab_size}: must be at least {256 + n_special + 1} "
                         f"(256 bytes + {n_special} special tokens + 1 merge)")
    backend = _RustTokenizer(models.BPE())
    splits = [pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False)]
    if split_digits:
        splits.append(pre_tokenizers.Digits(individual_digits=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        *splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator((t for t in texts if isinstance(t, str) and t), trainer)
    bos = special_tokens[0]
    # As the LLaMA-3 tokenizer.json does: HF callers asking for special tokens get BOS prepended.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    tok = Tokenizer(backend, bos_token=bos, eos_token=special_tokens[1] if n_special > 1 else None,
                    name=str(out_dir or "trained-bpe"))
    if out_dir is not None:
        tok.save(out_dir)
    return tok
