"""Tokenizers behind one small protocol, so the pipeline and the trainer never care which kind is in use.

``load_tokenizer("byte")`` is the dependency-free default; a path loads a Hugging Face ``tokenizer.json`` or a
SentencePiece ``tokenizer.model`` (or a directory holding one), with what transformers reads beside it:
``tokenizer_config.json`` and ``special_tokens_map.json`` (special tokens, ``add_bos_token``, ``chat_template``),
``chat_template.jinja`` and ``generation_config.json`` (the ids generation stops at). ``encode`` never adds
bos/eos: the pipeline frames documents itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

# Byte ids are shifted by 3 so that 0, 1, 2 stay pad, bos and eos as in the LLaMA vocabulary.
PAD, BOS, EOS, OFFSET = 0, 1, 2, 3
BYTE_VOCAB = 256 + OFFSET
# tokenizer_config.json's field that marks a checkpoint trained with the byte tokenizer (no vocabulary file).
BYTE_MARKER = "monet_tokenizer"


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + OFFSET


def decode(ids) -> str:
    data = bytes(int(i) - OFFSET for i in ids if int(i) >= OFFSET)
    return data.decode("utf-8", errors="replace")


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int] | np.ndarray: ...

    def decode(self, ids) -> str: ...


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, ``{}`` when the file is absent; a bad file is a one-line error."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"cannot read {path}: expected a JSON object")
    return data


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


class _Configured:
    """What transformers reads beside the vocabulary file, shared by every tokenizer kind.

    ``add_bos``: whether a prompt starts with bos (``add_bos_token``); ``eos_ids``: the ids generation stops
    at (``generation_config.json``'s ``eos_token_id``, an int or a list, else the tokenizer's eos);
    ``chat_template``: the Jinja template of a chat model; ``special_tokens``: the spellings a template
    sees (``bos_token``, ``eos_token``, ...)."""

    add_bos: bool = True
    chat_template: str | None = None
    source: str = ""  # set by the loaders: where the tokenizer came from, for the one line a command prints

    def _configure(self, directory: Path, config: dict) -> None:
        self.config_dir = directory
        self.special_tokens = {k: v for k, v in self.special_tokens.items() if v is not None}
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: the "default" one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja = directory / "chat_template.jinja"
        if not isinstance(template, str) and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        self.chat_template = template if isinstance(template, str) else None
        gen = read_json(directory / "generation_config.json")
        eos = gen.get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
        bad = [e for e in eos if not isinstance(e, int) or not 0 <= e < self.vocab_size]
        if bad:
            raise ValueError(f"{directory / 'generation_config.json'}: eos_token_id {bad[0]!r} is not an id of "
                             f"the tokenizer ({self.vocab_size} ids)")
        self.eos_ids = tuple(dict.fromkeys(eos)) or (self.eos_id,)

    def encode_with_specials(self, text: str) -> list[int]:
        """``encode``, except that special tokens written in the text (as a chat template writes
        ``bos_token``) become their ids, as transformers encodes a rendered chat."""
        return [int(t) for t in self.encode(text)]

    def describe(self) -> str:
        return f"{self.kind} ({self.vocab_size:,} ids)"


class ByteTokenizer(_Configured):
    """UTF-8 bytes; needs no files, so the default run works offline."""

    vocab_size, bos_id, eos_id, pad_id = BYTE_VOCAB, BOS, EOS, PAD
    eos_ids = (EOS,)
    kind = "byte"
    special_tokens: dict = {}

    def __init__(self, directory: Path | None = None, config: dict | None = None):
        self.path, self.config = None, config
        if directory is not None:
            self._configure(directory, config or {})
            self.add_bos = bool(config.get("add_bos_token", True)) if config else True

    def encode(self, text: str) -> np.ndarray:
        return encode(text)

    def decode(self, ids) -> str:
        return decode(ids)

    def describe(self) -> str:
        return f"byte ({self.vocab_size} ids)"

    def __repr__(self) -> str:
        return "ByteTokenizer()"


# Special-token spellings tried, in order, when no tokenizer_config.json names them.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|endoftext|>", "[CLS]")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>", "<|im_end|>", "[SEP]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


def _sibling_config(path: Path) -> dict:
    """tokenizer_config.json beside ``path``, its missing special tokens filled from special_tokens_map.json
    (transformers merges the two the same way)."""
    config = read_json(path.parent / "tokenizer_config.json")
    if config.get(BYTE_MARKER) is not None:
        raise ValueError(f"{path.parent / 'tokenizer_config.json'} marks the byte tokenizer, not {path.name}")
    for key, value in read_json(path.parent / "special_tokens_map.json").items():
        if config.get(key) is None:
            config[key] = value
    return config


class HFTokenizer(_Configured):
    """A Hugging Face ``tokenizers`` file; special ids come from a sibling tokenizer_config.json when present."""

    kind = "tokenizer.json"

    def __init__(self, path: str | Path):
        import tokenizers

        self.path = Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise ValueError(f"cannot read tokenizer {self.path}: {_one_line(e)}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = _sibling_config(self.path)
        named = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.bos_id = self._special("bos", named["bos_token"], _BOS_NAMES)
        self.eos_id = self._special("eos", named["eos_token"], _EOS_NAMES)
        pad = self._special("pad", named["pad_token"], _PAD_NAMES, required=False)
        self.pad_id = self.eos_id if pad is None else pad
        self.special_tokens = {"bos_token": self._tok.id_to_token(self.bos_id),
                               "eos_token": self._tok.id_to_token(self.eos_id),
                               "pad_token": self._tok.id_to_token(self.pad_id), "unk_token": named["unk_token"]}
        self._configure(self.path.parent, config)
        # As AutoTokenizer does, the file's post-processor decides whether bos is added; without one,
        # add_bos_token (default true: training frames every document with bos).
        if self._tok.post_processor is not None:
            self.add_bos = self._tok.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]
        else:
            self.add_bos = bool(config.get("add_bos_token", True))

    def _special(self, what: str, configured: str | None, candidates, required: bool = True) -> int | None:
        for name in ((configured,) if configured else ()) + candidates:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        if required:
            raise ValueError(f"tokenizer {self.path} has no {what} token (tried {', '.join(candidates)}; "
                             f"name it as {what}_token in tokenizer_config.json)")
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_specials(self, text: str) -> list[int]:
        return self.encode(text)  # the tokenizers library already matches added special tokens in text

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def describe(self) -> str:
        return f"{self.path} (tokenizer.json, {self.vocab_size:,} ids)"

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(_Configured):
    """A SentencePiece model (LLaMA/Mistral style); a model without a pad piece pads with eos."""

    kind = "SentencePiece"

    def __init__(self, path: str | Path):
        import sentencepiece

        self.path = Path(path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except Exception as e:  # sentencepiece raises OSError or RuntimeError depending on the failure
            raise ValueError(f"cannot read tokenizer {self.path}: {_one_line(e)}") from None
        self.vocab_size = int(self._sp.get_piece_size())
        config = _sibling_config(self.path)
        named = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.bos_id = self._piece(named["bos_token"], int(self._sp.bos_id()))
        self.eos_id = self._piece(named["eos_token"], int(self._sp.eos_id()))
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"tokenizer {self.path} has no bos or eos piece (bos_id={self.bos_id}, "
                             f"eos_id={self.eos_id})")
        pad = self._piece(named["pad_token"], int(self._sp.pad_id()))
        self.pad_id = pad if pad >= 0 else self.eos_id
        piece = self._sp.id_to_piece
        unk = int(self._sp.unk_id())
        self.special_tokens = {"bos_token": piece(self.bos_id), "eos_token": piece(self.eos_id),
                               "pad_token": piece(self.pad_id), "unk_token": piece(unk) if unk >= 0 else None}
        self._configure(self.path.parent, config)
        self.add_bos = bool(config.get("add_bos_token", True))  # LLaMA's default
        # Text spellings of the control pieces (and tokens added in tokenizer_config.json), longest first.
        added = {int(k): _token_text(v) for k, v in (config.get("added_tokens_decoder") or {}).items()
                 if str(k).isdigit() and _token_text(v)}
        specials = {piece(i): i for i in range(self.vocab_size) if self._sp.is_control(i) or self._sp.is_unknown(i)}
        specials.update({text: i for i, text in added.items() if i < self.vocab_size})
        self._specials = specials
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")

    def _piece(self, name: str | None, default: int) -> int:
        """The id of a piece tokenizer_config.json names, else the model's own choice."""
        if name:
            i = int(self._sp.piece_to_id(name))
            if self._sp.id_to_piece(i) == name:
                return i
        return default

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_with_specials(self, text: str) -> list[int]:
        ids = []
        for part in self._split.split(text) if self._specials else [text]:
            if part in self._specials:
                ids.append(self._specials[part])
            elif part:
                ids.extend(self.encode(part))
        return ids

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def describe(self) -> str:
        return f"{self.path} (SentencePiece, {self.vocab_size:,} ids)"

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def find_tokenizer_file(directory: Path) -> Path | None:
    """The vocabulary file of a directory, as transformers prefers it: tokenizer.json, then tokenizer.model."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if (directory / name).is_file():
            return directory / name
    return None


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """Load a tokenizer by name or path, without a checkpoint (``tokenizer_for_checkpoint`` reads a
    checkpoint's own).

    Args:
        spec: ``"byte"`` (one id per UTF-8 byte, the default runs'), or a ``tokenizer.json`` /
            ``tokenizer.model`` file or a directory holding one (or holding the byte tokenizer's record, a
            ``tokenizer_config.json`` with ``"monet_tokenizer": "byte"``).

    Returns:
        The tokenizer.

    Raises:
        ValueError: No tokenizer at ``spec``.
    """
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        config = read_json(path / "tokenizer_config.json")
        if config.get(BYTE_MARKER) is not None:
            if config[BYTE_MARKER] != "byte":
                raise ValueError(f"{path / 'tokenizer_config.json'}: unknown {BYTE_MARKER} "
                                 f"{config[BYTE_MARKER]!r} (expected 'byte')")
            return ByteTokenizer(path, config)
        found = find_tokenizer_file(path)
        if found is None:
            raise ValueError(f"no tokenizer.json or tokenizer.model in directory {path}")
        path = found
    if not path.is_file():
        raise ValueError(f"tokenizer not found: {path} (expected 'byte', a tokenizer.json, a tokenizer.model "
                         "or a directory holding one)")
    if path.suffix == ".json":
        return HFTokenizer(path)
    if path.suffix == ".model" or ".model." in path.name:  # e.g. mistral's tokenizer.model.v1
        return SentencePieceTokenizer(path)
    try:  # an unusual name: whichever reader accepts it
        return SentencePieceTokenizer(path)
    except ValueError:
        return HFTokenizer(path)
