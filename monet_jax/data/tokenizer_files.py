"""A checkpoint's tokenizer: found beside its weights, written beside them, carried between directories.

A published model directory holds its tokenizer next to ``config.json`` (``tokenizer.json`` and/or
``tokenizer.model``, ``tokenizer_config.json``, ``special_tokens_map.json``, ``generation_config.json``), and
``transformers``, lm-eval and vLLM take it from there by default; our checkpoints hold the same files, so every
command reads a checkpoint's tokenizer without being told, and ``AutoTokenizer.from_pretrained`` loads an
exported directory. A checkpoint trained with the byte tokenizer holds a record of it (``tokenizer_config.json``
with ``"monet_tokenizer": "byte"``) and an equivalent byte-level ``tokenizer.json`` for transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from monet_jax.data.tokenizer import (
    BOS,
    BYTE_MARKER,
    BYTE_VOCAB,
    EOS,
    OFFSET,
    PAD,
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    find_tokenizer_file,
    load_tokenizer,
    read_json,
)

# Files that travel with a checkpoint's weights (whichever exist).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")
# Vocabularies a checkpoint without tokenizer files may be read with the byte tokenizer: its 259 ids, padded up
# to 512 as the embedded default model is (checkpoints written by train.py before it recorded its tokenizer).
BYTE_SIZED = range(BYTE_VOCAB, 513)
_BYTE_SPECIALS = ("<pad>", "<s>", "</s>")  # ids PAD, BOS, EOS


def has_tokenizer(directory: str | Path) -> bool:
    directory = Path(directory)
    return find_tokenizer_file(directory) is not None or read_json(
        directory / "tokenizer_config.json").get(BYTE_MARKER) is not None


def tokenizer_for_checkpoint(checkpoint: str | Path, tokenizer: str | None = None, *, vocab_size: int | None = None,
                             flag: str = "--tokenizer PATH") -> Tokenizer:
    """The tokenizer to read ``checkpoint`` with, found as ``AutoTokenizer.from_pretrained(checkpoint)`` finds
    it: ``tokenizer.json`` or ``tokenizer.model`` beside ``config.json``, with its special tokens and chat
    template.

    Args:
        checkpoint: Our checkpoint directory or a Hugging Face one.
        tokenizer: ``"byte"`` or a path, instead of the checkpoint's own files.
        vocab_size: The model's vocabulary (default: read from the checkpoint's ``config.json``).
        flag: How an error names the override to pass (a command's ``--tokenizer PATH``).

    Returns:
        The tokenizer; its ``source`` is the one line a command prints about it.

    Raises:
        ValueError: The checkpoint has no tokenizer files and its vocabulary is not byte-sized, or the
            tokenizer has more ids than the model's embedding (one line that says what to pass).
    """
    checkpoint = Path(checkpoint).expanduser()
    if vocab_size is None:
        if not checkpoint.is_dir():
            raise ValueError(f"checkpoint directory not found: {checkpoint}")
        if not (checkpoint / "config.json").is_file():
            raise ValueError(f"config.json not found: {checkpoint / 'config.json'}")
        vocab_size = read_json(checkpoint / "config.json").get("vocab_size")
        if not isinstance(vocab_size, int):
            raise ValueError(f"{checkpoint / 'config.json'}: no integer vocab_size")
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        tok.source = f"{tok.describe()}, as given"
    elif has_tokenizer(checkpoint):
        tok = load_tokenizer(checkpoint)
        tok.source = f"{tok.describe()}, the checkpoint's" + (
            f" ({checkpoint / 'tokenizer_config.json'})" if isinstance(tok, ByteTokenizer) else "")
    elif vocab_size in BYTE_SIZED:
        tok = ByteTokenizer()
        tok.source = (f"{tok.describe()}: {checkpoint} has no tokenizer files and its {vocab_size} ids fit the byte "
                      f"tokenizer (pass {flag} if it was trained with another)")
    else:
        raise ValueError(f"{checkpoint} has no tokenizer (tokenizer.json or tokenizer.model) and its {vocab_size:,} "
                         f"ids are not the byte tokenizer's: pass {flag} (the tokenizer.json or tokenizer.model it "
                         "was trained with)")
    if tok.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {tok.describe()} has more ids than the model's embedding ({vocab_size:,}): "
                         f"pass the tokenizer the model was trained with ({flag})")
    return tok


def generation_config(tok: Tokenizer) -> dict:
    """generation_config.json as transformers writes it: the ids generation starts, stops and pads with."""
    eos = list(getattr(tok, "eos_ids", (tok.eos_id,)))
    return {"bos_token_id": tok.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": tok.pad_id}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_tokenizer(tok: Tokenizer, out_dir: str | Path) -> list[str]:
    """Write ``tok`` into a checkpoint directory, so that our commands and ``AutoTokenizer`` read it from there:
    its vocabulary file, a ``tokenizer_config.json`` naming its class, special tokens and ``add_bos_token``, and
    ``generation_config.json``. Returns the names written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(tok, ByteTokenizer):
        config = dict(getattr(tok, "config", None) or {})
        (out / "tokenizer.json").write_text(byte_tokenizer_json(), encoding="utf-8")
        config.update({BYTE_MARKER: "byte", "tokenizer_class": "PreTrainedTokenizerFast",
                       "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": tok.add_bos,
                       "add_eos_token": False})
        specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    elif isinstance(tok, HFTokenizer | SentencePieceTokenizer):
        src = tok.path.parent
        config = read_json(src / "tokenizer_config.json")
        specials = dict(tok.special_tokens)
        if tok.pad_id == tok.eos_id and not config.get("pad_token"):
            specials.pop("pad_token", None)  # no pad token of its own: padding uses eos, as LLaMA's
        if isinstance(tok, HFTokenizer):
            _copy_tokenizer_json(tok, out / "tokenizer.json")
            config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        else:
            shutil.copyfile(tok.path, out / "tokenizer.model")
            config.setdefault("tokenizer_class", "LlamaTokenizer")
            config.setdefault("add_eos_token", False)
        config.update(specials, add_bos_token=tok.add_bos)
        for name in ("special_tokens_map.json", "added_tokens.json", "chat_template.jinja"):
            if (src / name).is_file() and src != out:
                shutil.copyfile(src / name, out / name)
    else:
        raise ValueError(f"cannot save a tokenizer of type {type(tok).__name__}")
    _write_json(out / "tokenizer_config.json", config)
    if not (out / "special_tokens_map.json").is_file():
        _write_json(out / "special_tokens_map.json", specials)
    _write_json(out / "generation_config.json", generation_config(tok))
    return sorted(p.name for p in out.iterdir() if p.name in TOKENIZER_FILES)


def _copy_tokenizer_json(tok: HFTokenizer, dest: Path) -> None:
    """Copy the file; one without a post-processor gets one that puts bos first when ``tok.add_bos``, so that
    transformers (which follows the post-processor) frames prompts as training did."""
    from tokenizers import Tokenizer, processors

    if tok._tok.post_processor is not None or not tok.add_bos:
        shutil.copyfile(tok.path, dest)
        return
    fixed = Tokenizer.from_file(str(tok.path))
    bos = fixed.id_to_token(tok.bos_id)
    fixed.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                         special_tokens=[(bos, tok.bos_id)])
    fixed.save(str(dest))


def _byte_alphabet() -> list[str]:
    """The printable stand-in of each byte in byte-level BPE (GPT-2's table): the byte itself when printable,
    else the next free code point from 256 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def byte_tokenizer_json() -> str:
    """The byte tokenizer as a ``tokenizers`` file (byte-level, no merges: byte ``b`` is id ``b + 3``, with
    ``<pad>``, ``<s>``, ``</s>`` at 0, 1, 2), so that transformers reads our byte checkpoints too."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {name: i for i, name in zip((PAD, BOS, EOS), _BYTE_SPECIALS, strict=True)}
    vocab.update({ch: b + OFFSET for b, ch in enumerate(_byte_alphabet())})
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _BYTE_SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS)])
    return tok.to_str(pretty=True)


def copy_tokenizer_files(src: str | Path, out: str | Path) -> list[str]:
    """Carry a checkpoint's tokenizer files into another checkpoint directory (``monet-convert``, both ways);
    a generation_config.json is made from the tokenizer when the source has none. Returns the names copied."""
    src, out = Path(src), Path(out)
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    for name in names:
        shutil.copyfile(src / name, out / name)
    if names and has_tokenizer(out) and not (out / "generation_config.json").is_file():
        _write_json(out / "generation_config.json", generation_config(load_tokenizer(out)))
        names.append("generation_config.json")
    return names
