"""Tokenizers behind one small protocol, so the pipeline and the trainer never care which kind is in use.

``load_tokenizer("byte")`` is the dependency-free default; a path loads a Hugging Face ``tokenizer.json`` or a
SentencePiece ``tokenizer.model``. ``encode`` never adds bos/eos: the pipeline frames documents itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

# Byte ids are shifted by 3 so that 0, 1, 2 stay pad, bos and eos as in the LLaMA vocabulary.
PAD, BOS, EOS, OFFSET = 0, 1, 2, 3
BYTE_VOCAB = 256 + OFFSET


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


class ByteTokenizer:
    """UTF-8 bytes; needs no files, so the default run works offline."""

    vocab_size, bos_id, eos_id, pad_id = BYTE_VOCAB, BOS, EOS, PAD

    def encode(self, text: str) -> np.ndarray:
        return encode(text)

    def decode(self, ids) -> str:
        return decode(ids)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


# Special-token spellings tried, in order, when no tokenizer_config.json names them.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|endoftext|>", "[CLS]")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>", "<|im_end|>", "[SEP]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class HFTokenizer:
    """A Hugging Face ``tokenizers`` file; special ids come from a sibling tokenizer_config.json when present."""

    def __init__(self, path: str | Path):
        import tokenizers

        self.path = Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise ValueError(f"cannot read tokenizer {self.path}: {_one_line(e)}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        named = self._configured_specials()
        self.bos_id = self._special("bos", named.get("bos_token"), _BOS_NAMES)
        self.eos_id = self._special("eos", named.get("eos_token"), _EOS_NAMES)
        pad = self._special("pad", named.get("pad_token"), _PAD_NAMES, required=False)
        self.pad_id = self.eos_id if pad is None else pad

    def _configured_specials(self) -> dict[str, str]:
        cfg_path = self.path.parent / "tokenizer_config.json"
        if not cfg_path.is_file():
            return {}
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {cfg_path}: {_one_line(e)}") from None
        out = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            value = cfg.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                out[key] = value
        return out

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

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer:
    """A SentencePiece model (LLaMA/Mistral style); a model without a pad piece pads with eos."""

    def __init__(self, path: str | Path):
        import sentencepiece

        self.path = Path(path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except Exception as e:  # sentencepiece raises OSError or RuntimeError depending on the failure
            raise ValueError(f"cannot read tokenizer {self.path}: {_one_line(e)}") from None
        self.vocab_size = int(self._sp.get_piece_size())
        self.bos_id, self.eos_id = int(self._sp.bos_id()), int(self._sp.eos_id())
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"tokenizer {self.path} has no bos or eos piece (bos_id={self.bos_id}, "
                             f"eos_id={self.eos_id})")
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"``, or a path to a ``tokenizer.json`` / ``tokenizer.model`` file or a directory holding one."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        for name, cls in (("tokenizer.json", HFTokenizer), ("tokenizer.model", SentencePieceTokenizer)):
            if (path / name).is_file():
                return cls(path / name)
        raise ValueError(f"no tokenizer.json or tokenizer.model in directory {path}")
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
