"""The training data pipeline on Grain: documents -> split -> shuffle -> row streams -> tokenize -> pack -> batch.

The global batch of step ``s`` is a function of (data, seed, step) alone, whatever the number of processes
(Levanter's rule): the split's documents are shuffled once per epoch (``index_shuffle`` with seed + epoch) into
one global order, and row ``r`` of every global batch of ``B`` rows is its own *row stream*, packed from the
documents at positions ``r, r + B, r + 2B, ...`` of that order. A process reads only the row streams of the rows
its devices hold (``rows=``), so it tokenizes only its own documents, and the iterator state is one small dict per
row stream: a checkpoint restores onto any process count.

Each document becomes ``bos + tokens + eos`` and is turned into (input, target, mask) triples *before* packing,
so a target always comes from the same document as its input: no position ever predicts across a document
boundary (the eos -> next-bos transition is simply never a training pair) and nothing needs masking there.
Packing is Grain's ``ConcatThenSplitIterDataset`` per row stream: rows are filled completely, a document that
does not fit continues in the stream's next row as a new segment whose positions restart at 0 (attention is
segment-masked, so the continuation sees no left context). Only the end of a finite stream produces padding.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from monet_jax.config import ConfigError
from monet_jax.data.sources import FORMATS, open_documents
from monet_jax.data.tokenizer import Tokenizer, load_tokenizer

SPLITS = ("train", "validation")
_STATE_VERSION = 2


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str | None = None  # None = the embedded corpus; else a file, a directory or a glob
    format: str = "auto"  # auto | text | jsonl | parquet | arrayrecord (auto: by file suffix)
    text_key: str = "text"  # field holding the document in jsonl/parquet/arrayrecord(JSON) records
    prompt_key: str | None = None  # with response_key: prompt/response data, prompt tokens masked out of the loss
    response_key: str | None = None
    tokenizer: str = "byte"  # "byte", or a tokenizer.json / tokenizer.model file or a directory holding one
    seq_len: int = 128
    batch_size: int = 16  # GLOBAL rows per step, over all processes
    val_fraction: float = 0.05  # share of documents held out for validation, chosen by the seed
    shuffle: bool = True
    packing: bool = True  # False: one document per row, truncated or padded
    worker_count: int = 1  # tokenization threads per row stream (0: tokenize in the training loop's thread)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"data.format: unknown format {self.format!r} for {self.path or 'the embedded corpus'}"
                              f" (expected one of {', '.join(FORMATS)})")
        if self.seq_len < 1:
            raise ConfigError(f"data.seq_len must be positive, got {self.seq_len}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be positive, got {self.batch_size}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if (self.prompt_key is None) != (self.response_key is None):
            raise ConfigError("data.prompt_key and data.response_key must be set together")
        if self.worker_count < 0:
            raise ConfigError(f"data.worker_count must not be negative, got {self.worker_count}")


class _Documents:
    """The documents at ``indices`` of ``source``: one split, as a Grain data source."""

    def __init__(self, source, indices: np.ndarray):
        self._source, self._indices = source, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int):
        return self._source[int(self._indices[i])]


class _Tokenize:
    """Document -> per-token (input, target, loss mask); packed rows are built from these, never from raw ids."""

    def __init__(self, tokenizer: Tokenizer, packing: bool, seq_len: int):
        self.tokenizer, self.packing, self.seq_len = tokenizer, packing, seq_len

    def ids(self, doc) -> tuple[np.ndarray, int]:
        """``bos + tokens + eos`` and how many leading ids are prompt (the first target after them counts)."""
        tok = self.tokenizer
        if isinstance(doc, tuple):
            prompt = np.asarray(tok.encode(doc[0]), np.int32).reshape(-1)
            response = np.asarray(tok.encode(doc[1]), np.int32).reshape(-1)
            body, n_prompt = np.concatenate([prompt, response]), 1 + len(prompt)
        else:
            body, n_prompt = np.asarray(tok.encode(doc), np.int32).reshape(-1), 1
        return np.concatenate([[tok.bos_id], body, [tok.eos_id]]).astype(np.int32), n_prompt

    def __call__(self, doc):
        if doc is None:
            return None
        ids, n_prompt = self.ids(doc)
        mask = (np.arange(1, len(ids)) >= n_prompt).astype(np.int32)  # target j is ids[j + 1]
        triples = np.stack([ids[:-1], ids[1:], mask], axis=1)
        if self.packing:
            return {"x": triples}
        triples = triples[:self.seq_len]
        n = len(triples)
        return _finish(np.pad(triples, ((0, self.seq_len - n), (0, 0))),
                       (np.arange(self.seq_len) < n).astype(np.int32), np.arange(self.seq_len, dtype=np.int32),
                       self.tokenizer.pad_id)


def _finish(triples: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray, pad_id: int) -> dict:
    pad = segment_ids == 0
    return {"input_ids": np.where(pad, pad_id, triples[:, 0]).astype(np.int32),
            "targets": np.where(pad, pad_id, triples[:, 1]).astype(np.int32),
            "loss_mask": np.where(pad, 0, triples[:, 2]).astype(np.float32),
            "segment_ids": np.where(pad, 0, segment_ids).astype(np.int32),
            "positions": np.where(pad, 0, positions).astype(np.int32)}


class _Unpack:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, row: dict) -> dict:
        return _finish(row["x"], row["x_segment_ids"], row["x_positions"], self.pad_id)


def _to_json(state: Any) -> Any:
    if isinstance(state, dict):
        return {str(k): _to_json(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_to_json(v) for v in state]
    if isinstance(state, np.generic):
        return state.item()
    return state


def _from_json(state: Any) -> Any:
    """Undo what JSON did to Grain's state: ConcatThenSplit compares its slices to tuples."""
    if isinstance(state, dict):
        return {k: ({sk: tuple(sv) for sk, sv in v.items()} if k == "remainder_slices" else _from_json(v))
                for k, v in state.items()}
    if isinstance(state, list):
        return [_from_json(v) for v in state]
    return state


class DataIterator:
    """Batches of the rows ``rows`` of the global batch: dicts of numpy arrays ``[len(rows), seq_len]``.

    Each row is read from its own row stream; a finite stream that has ended gives loss-free padding rows until
    every stream of this iterator has ended. ``get_state()`` is JSON-serialisable, one entry per row stream;
    ``set_state`` accepts any state holding this iterator's streams (for example the states of all processes
    merged), so a run resumes with another number of processes.
    """

    def __init__(self, streams: dict[int, Any], identity: dict[str, Any], pad_id: int):
        self._streams = streams
        self._iterators = {r: iter(ds) for r, ds in streams.items()}
        self._ended: set[int] = set()
        self._identity = identity
        self._pad_id = pad_id
        self.rows, self.seq_len = len(streams), identity["seq_len"]

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        out = []
        for r, it in self._iterators.items():
            row = None
            if r not in self._ended:
                row = next(it, None)
                if row is None:
                    self._ended.add(r)
            out.append(row)
        if all(row is None for row in out):
            raise StopIteration
        pad = next(row for row in out if row is not None)
        filler = {k: np.full_like(v, self._pad_id if k in ("input_ids", "targets") else 0) for k, v in pad.items()}
        return {k: np.stack([(row or filler)[k] for row in out]) for k in pad}

    def get_state(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, **self._identity,
                "streams": {str(r): None if r in self._ended else _to_json(it.get_state())
                            for r, it in self._iterators.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data iterator state has version {state.get('version')!r}, expected {_STATE_VERSION}")
        saved = {k: state.get(k) for k in self._identity}
        if saved != self._identity:
            diff = ", ".join(f"{k}={saved[k]!r} (now {v!r})" for k, v in self._identity.items() if saved[k] != v)
            raise ValueError(f"data iterator state belongs to a different pipeline: {diff}")
        streams = state.get("streams", {})
        missing = [r for r in self._iterators if str(r) not in streams]
        if missing:
            raise ValueError(f"data iterator state has no position for row {missing[0]} of {self._identity['rows']}")
        self._ended = set()
        for r in self._iterators:
            if streams[str(r)] is None:  # an ended finite stream
                self._iterators[r] = iter(())
                self._ended.add(r)
            else:
                self._iterators[r] = iter(self._streams[r])
                self._iterators[r].set_state(_from_json(streams[str(r)]))

    def close(self) -> None:
        for it in self._iterators.values():
            close = getattr(it, "close", None)
            if close is not None:
                close()


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One state holding the row streams of several iterators of the same pipeline (e.g. every process's)."""
    for st in states:
        if not isinstance(st, dict) or st.get("version") != _STATE_VERSION or not isinstance(st.get("streams"), dict):
            version = st.get("version") if isinstance(st, dict) else None
            raise ValueError(f"data iterator state has version {version!r}, expected {_STATE_VERSION}")
    merged = dict(states[0], streams={})
    for st in states:
        merged["streams"].update(st["streams"])
    return merged


def split_indices(n: int, val_fraction: float, seed: int, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Document indices of each split, each in source order; the same seed always holds out the same documents.

    Without ``keys``, ``round(n * val_fraction)`` documents drawn by the seed (a fixed dataset). With ``keys`` (one
    stable name per document, for a corpus whose documents come and go: the embedded one), each document on its
    own, held out when a hash of the seed and its key falls below ``val_fraction`` (at least one is), so adding or
    removing documents never moves another between the splits."""
    if keys is not None:
        if len(keys) != n:
            raise ValueError(f"{len(keys)} keys for {n} documents")
        u = np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest(), "big")
                      for k in keys], np.float64) / 2.0**64
        held = u < val_fraction
        if val_fraction > 0 and n and not held.any():
            held[np.argmin(u)] = True
        if n and held.all():
            raise ValueError(f"only {n} documents, all held out for validation (lower data.val_fraction)")
        return {"validation": np.flatnonzero(held), "train": np.flatnonzero(~held)}
    n_val = 0 if val_fraction <= 0 else max(1, round(n * val_fraction))
    if n_val >= n:
        raise ValueError(f"only {n} documents: cannot hold out {n_val} for validation and keep any for training "
                         "(lower data.val_fraction or add data)")
    order = np.random.default_rng(seed).permutation(n)
    return {"validation": np.sort(order[:n_val]), "train": np.sort(order[n_val:])}


def document_keys(path: str | None) -> list[str] | None:
    """The stable keys that choose the held-out documents of ``data.path`` (the embedded corpus's; None for a
    dataset on disk, whose documents are fixed)."""
    if path is not None:
        return None
    from monet_jax.data.text import embedded_documents

    return [k for k, _ in embedded_documents()]


def process_rows(batch_size: int, process_index: int, process_count: int) -> range:
    """The contiguous block of global rows of one process, when every process holds its own rows."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process layout: process_index {process_index} of process_count {process_count}")
    if batch_size % process_count:
        raise ValueError(f"data.batch_size {batch_size} is not divisible by process_count {process_count}")
    n = batch_size // process_count
    return range(process_index * n, (process_index + 1) * n)


def make_iterator(cfg: DataConfig, tokenizer: Tokenizer | str | None, *, split: str, seed: int,
                  rows: Sequence[int] | None = None, process_index: int = 0, process_count: int = 1,
                  num_epochs: int | None = None) -> DataIterator:
    """Batches of the global rows ``rows`` (default: this process's block of ``process_rows``) of ``split``.

    ``train`` repeats forever (or ``num_epochs`` times), reshuffled every epoch with seed + epoch; ``validation``
    is one pass in source order, and ends with rows whose loss_mask is 0 once a row stream has no documents left.
    Pass the same ``seed`` to both splits: it also chooses which documents are held out.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    if rows is None:
        rows = process_rows(cfg.batch_size, process_index, process_count)
    rows = sorted(set(int(r) for r in rows))
    if not rows or rows[0] < 0 or rows[-1] >= cfg.batch_size:
        raise ValueError(f"rows must be a non-empty subset of the {cfg.batch_size} rows of data.batch_size")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    if tokenizer is None or isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer or cfg.tokenizer)
    where = cfg.path or "the embedded corpus"

    source = open_documents(cfg.path, cfg.format, cfg.text_key, cfg.prompt_key, cfg.response_key)
    indices = split_indices(len(source), cfg.val_fraction, seed, document_keys(cfg.path))[split]
    if len(indices) == 0:
        raise ValueError(f"no {split} documents: the split has none of the {len(source)} documents in {where}")
    documents = _Documents(source, indices)
    tokenize = _Tokenize(tokenizer, cfg.packing, cfg.seq_len)
    if split == "train":
        _check_fills_a_batch(documents, tokenize, cfg, where)

    ds = grain.MapDataset.source(documents)
    epochs = 1 if split == "validation" else num_epochs
    if split == "train" and cfg.shuffle:
        ds = ds.shuffle(seed=seed % 2**32)  # index_shuffle with seed + epoch once repeated
    if epochs != 1:
        ds = ds.repeat(epochs)
    read = grain.ReadOptions(num_threads=cfg.worker_count, prefetch_buffer_size=8 if cfg.worker_count else 0)
    streams = {}
    for r in rows:
        # None (a blank ArrayRecord record) is dropped by to_iter_dataset.
        stream = ds[r::cfg.batch_size].map(tokenize).to_iter_dataset(read)
        if cfg.packing:
            stream = ConcatThenSplitIterDataset(stream, length_struct={"x": cfg.seq_len}).map(_Unpack(tokenizer.pad_id))
        streams[r] = stream
    identity = {"split": split, "seed": seed, "rows": cfg.batch_size, "seq_len": cfg.seq_len,
                "packing": cfg.packing, "documents": len(indices), "shuffle": cfg.shuffle}
    return DataIterator(streams, identity, tokenizer.pad_id)


def _check_fills_a_batch(documents: _Documents, tokenize: _Tokenize, cfg: DataConfig, where: str) -> None:
    """Fail at start-up, not mid-run, when one epoch cannot fill one global batch; stops reading as soon as it
    can, so a large corpus costs one batch of tokenization."""
    need = cfg.batch_size * cfg.seq_len if cfg.packing else cfg.batch_size
    have = 0
    for i in range(len(documents)):
        doc = documents[i]
        if doc is not None:
            have += len(tokenize.ids(doc)[0]) - 1 if cfg.packing else 1
        if have >= need:
            return
    unit = "tokens" if cfg.packing else "documents"
    needed = f"{cfg.batch_size} rows x {cfg.seq_len} = {need} tokens" if cfg.packing else f"{cfg.batch_size} rows"
    raise ValueError(f"dataset too short for one batch: {have} {unit} in {len(documents)} training documents of "
                     f"{where}, need {needed}")
