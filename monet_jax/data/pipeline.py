"""The training data pipeline on Grain: documents -> split -> process shard -> shuffle -> tokenize -> pack -> batch.

Each document becomes ``bos + tokens + eos`` and is turned into (input, target, mask) triples *before* packing,
so a target always comes from the same document as its input: no position ever predicts across a document
boundary (the eos -> next-bos transition is simply never a training pair) and nothing needs masking there.
Packing is Grain's ``ConcatThenSplitIterDataset``: rows are filled completely, a document that does not fit
continues in the next row as a new segment whose positions restart at 0 (attention is segment-masked, so the
continuation sees no left context). Only the end of a finite stream produces padding.

Resuming is exact because the whole pipeline is index-based (shuffle is ``index_shuffle`` with seed + epoch) and
its state is Grain's own iterator state, a small dict of counters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from monet_jax.config import ConfigError
from monet_jax.data.sources import FORMATS, open_documents
from monet_jax.data.tokenizer import Tokenizer, load_tokenizer

SPLITS = ("train", "validation")
_STATE_VERSION = 1


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
    worker_count: int = 0  # grain tokenization worker processes (0 = in-process threads)

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
    """The documents at ``indices`` of ``source``: one process's share of one split, as a Grain data source."""

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


class _PadBatch:
    """Fills the last batch of a finite stream with loss-free padding rows, so no document is dropped."""

    def __init__(self, rows: int, pad_id: int):
        self.rows, self.pad_id = rows, pad_id

    def __call__(self, batch: dict) -> dict:
        missing = self.rows - len(batch["input_ids"])
        if missing <= 0:
            return batch
        fill = {"input_ids": self.pad_id, "targets": self.pad_id}
        return {k: np.concatenate([v, np.full((missing, *v.shape[1:]), fill.get(k, 0), v.dtype)])
                for k, v in batch.items()}


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
    """Batches for one process: dicts of numpy arrays ``[rows, seq_len]``, with a checkpointable position.

    ``get_state()`` is JSON-serialisable; ``set_state`` on a freshly made iterator (same config, split, seed and
    process layout) continues exactly where the saved one was.
    """

    def __init__(self, dataset: grain.IterDataset, identity: dict[str, Any], num_documents: int):
        self._iterator = iter(dataset)
        self._identity = identity
        self.rows, self.seq_len = identity["rows"], identity["seq_len"]
        self.num_documents = num_documents  # in this process's shard of the split

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, **self._identity, "grain": _to_json(self._iterator.get_state())}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data iterator state has version {state.get('version')!r}, expected {_STATE_VERSION}")
        saved = {k: state.get(k) for k in self._identity}
        if saved != self._identity:
            diff = ", ".join(f"{k}={saved[k]!r} (now {v!r})" for k, v in self._identity.items() if saved[k] != v)
            raise ValueError(f"data iterator state belongs to a different pipeline: {diff}")
        self._iterator.set_state(_from_json(state["grain"]))

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def split_indices(n: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Document indices of each split, each in source order; the same seed always holds out the same documents."""
    n_val = 0 if val_fraction <= 0 else max(1, round(n * val_fraction))
    if n_val >= n:
        raise ValueError(f"only {n} documents: cannot hold out {n_val} for validation and keep any for training "
                         "(lower data.val_fraction or add data)")
    order = np.random.default_rng(seed).permutation(n)
    return {"validation": np.sort(order[:n_val]), "train": np.sort(order[n_val:])}


def _enable_grain_workers() -> None:
    """Grain's worker processes read absl flags, which a non-absl program never parses."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_iterator(cfg: DataConfig, tokenizer: Tokenizer | str | None, *, split: str, seed: int,
                  process_index: int = 0, process_count: int = 1, num_epochs: int | None = None) -> DataIterator:
    """Batches of this process's share of ``split``.

    ``train`` repeats forever (or ``num_epochs`` times), reshuffled every epoch with seed + epoch; ``validation``
    is one pass in order. Documents are sharded across processes before shuffling, so processes never share a
    document; a finite stream ends with a batch padded by rows whose loss_mask is 0. Pass the same ``seed`` to
    both splits: it also chooses which documents are held out.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process layout: process_index {process_index} of process_count {process_count}")
    if cfg.batch_size % process_count:
        raise ValueError(f"data.batch_size {cfg.batch_size} is not divisible by process_count {process_count}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    if tokenizer is None or isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer or cfg.tokenizer)
    where = cfg.path or "the embedded corpus"
    rows = cfg.batch_size // process_count

    source = open_documents(cfg.path, cfg.format, cfg.text_key, cfg.prompt_key, cfg.response_key)
    indices = split_indices(len(source), cfg.val_fraction, seed)[split]
    shard = indices[process_index::process_count]
    if len(shard) == 0:
        raise ValueError(f"no {split} documents for process {process_index} of {process_count}: the split has "
                         f"{len(indices)} of the {len(source)} documents in {where}")
    documents = _Documents(source, shard)
    tokenize = _Tokenize(tokenizer, cfg.packing, cfg.seq_len)
    if split == "train":
        _check_fills_a_batch(documents, tokenize, rows, cfg, where, process_index, process_count)

    ds = grain.MapDataset.source(documents)
    epochs = 1 if split == "validation" else num_epochs
    if split == "train" and cfg.shuffle:
        ds = ds.shuffle(seed=seed % 2**32)  # index_shuffle with seed + epoch once repeated
    if epochs != 1:
        ds = ds.repeat(epochs)
    ds = ds.map(tokenize)  # None (a blank ArrayRecord record) is dropped by to_iter_dataset
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=128))
    if cfg.worker_count:
        # Workers only tokenize; packing stays here, so batches do not depend on the worker count.
        _enable_grain_workers()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    if cfg.packing:
        it = ConcatThenSplitIterDataset(it, length_struct={"x": cfg.seq_len}).map(_Unpack(tokenizer.pad_id))
    it = it.batch(rows, drop_remainder=False).map(_PadBatch(rows, tokenizer.pad_id))
    identity = {"split": split, "seed": seed, "process_index": process_index, "process_count": process_count,
                "rows": rows, "seq_len": cfg.seq_len, "packing": cfg.packing, "documents": len(shard),
                "worker_count": cfg.worker_count}  # worker states hold one position per worker
    return DataIterator(it, identity, len(shard))


def _check_fills_a_batch(documents: _Documents, tokenize: _Tokenize, rows: int, cfg: DataConfig, where: str,
                         process_index: int, process_count: int) -> None:
    """Fail at start-up, not mid-run, when one epoch of this shard cannot fill one batch; stops reading as soon
    as it can, so a large corpus costs one batch of tokenization."""
    need = rows * cfg.seq_len if cfg.packing else rows
    have = 0
    for i in range(len(documents)):
        doc = documents[i]
        if doc is not None:
            have += len(tokenize.ids(doc)[0]) - 1 if cfg.packing else 1
        if have >= need:
            return
    unit = "tokens" if cfg.packing else "documents"
    needed = f"{rows} rows x {cfg.seq_len} = {need} tokens" if cfg.packing else f"{rows} rows"
    raise ValueError(f"dataset too short for one batch on process {process_index} of {process_count}: {have} {unit} "
                     f"in {len(documents)} training documents of {where}, need {needed}")

