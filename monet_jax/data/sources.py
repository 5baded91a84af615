"""Random-access document sources: every format becomes ``len()`` + ``[i] -> document``.

Random access is what lets Grain shuffle, shard by process and checkpoint by index without reading the data
in order. A document is a string, or a ``(prompt, response)`` pair when prompt/response keys are configured;
``None`` marks an empty record that the pipeline skips (only ArrayRecord, which cannot be filtered up front).

Text and JSONL are parsed eagerly (small corpora; errors surface at start-up with file and line). Parquet keeps
only the wanted columns as Arrow arrays. ArrayRecord is read lazily record by record, so a process only touches
the records of its own shard: use it for corpora larger than memory.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np

Document = str | tuple[str, str]

FORMATS = ("auto", "text", "jsonl", "parquet", "arrayrecord")
TEXT_SUFFIXES = (".txt", ".md", ".py")
_SUFFIXES = {"text": TEXT_SUFFIXES, "jsonl": (".jsonl", ".ndjson"), "parquet": (".parquet",),
             "arrayrecord": (".arrayrecord", ".array_record")}


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    for fmt, suffixes in _SUFFIXES.items():
        # also matches sharded names such as ``train.array_record-00000-of-00008``
        if any(name.endswith(s) or f"{s}-" in name for s in suffixes):
            return fmt
    return None


def resolve_files(path: str) -> tuple[list[Path], bool]:
    """The files ``path`` names (a file, a directory searched recursively, or a glob), and whether it was
    a single file (which changes how text is split into documents)."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p], True
    if p.is_dir():
        files = [f for f in sorted(p.rglob("*")) if f.is_file() and not any(s.startswith(".") for s in f.parts)]
    elif glob.has_magic(str(p)):
        files = [Path(f) for f in sorted(glob.glob(str(p), recursive=True)) if Path(f).is_file()]
    else:
        raise ValueError(f"data path not found: {path}")
    if not files:
        raise ValueError(f"no documents found in {path}: it names no files")
    return files, False


def detect_format(files: list[Path], fmt: str, path: str, single_file: bool) -> tuple[str, list[Path]]:
    """The format to read and the files of that format; ``auto`` goes by suffix."""
    if single_file:
        return (fmt if fmt != "auto" else _format_of(files[0]) or "text"), files
    if fmt == "auto":
        found = sorted({f for f in map(_format_of, files) if f is not None})
        if len(found) > 1:
            raise ValueError(f"{path} holds several data formats ({', '.join(found)}); set data.format "
                             "or point data.path at one kind of file")
        fmt = found[0] if found else "text"
    chosen = [f for f in files if _format_of(f) == fmt]
    if not chosen:
        raise ValueError(f"no documents found in {path}: no {fmt} files ({', '.join(_SUFFIXES[fmt])})")
    return fmt, chosen


class ListSource:
    """Documents already in memory."""

    def __init__(self, docs: list[Document]):
        self._docs = docs

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, i: int) -> Document:
        return self._docs[i]


def _nonblank(doc: Document) -> bool:
    return bool(doc.strip()) if isinstance(doc, str) else bool((doc[0] + doc[1]).strip())


def _from_record(record, keys: tuple[str, ...], where: str) -> Document:
    """A document from one JSON object; ``keys`` is (text_key,) or (prompt_key, response_key)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    values = []
    for key in keys:
        if key not in record:
            raise ValueError(f"{where}: no key {key!r} (keys: {', '.join(map(str, record)) or 'none'})")
        if not isinstance(record[key], str):
            raise ValueError(f"{where}: {key!r} is a {type(record[key]).__name__}, expected a string")
        values.append(record[key])
    return values[0] if len(values) == 1 else (values[0], values[1])


def read_text(files: list[Path], single_file: bool) -> list[Document]:
    if single_file:  # one file: documents are separated by blank lines
        docs = files[0].read_text(errors="replace").split("\n\n")
    else:  # a directory or glob: one document per file
        docs = [f.read_text(errors="replace") for f in files]
    return [d for d in docs if d.strip()]


def read_jsonl(files: list[Path], keys: tuple[str, ...]) -> list[Document]:
    docs = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{lineno}: not valid JSON ({e.msg})") from None
                doc = _from_record(record, keys, f"{f}:{lineno}")
                if _nonblank(doc):
                    docs.append(doc)
    return docs


class ParquetSource:
    """The wanted string columns of Parquet files, concatenated and kept as Arrow arrays (no Python strings)."""

    def __init__(self, files: list[Path], keys: tuple[str, ...]):
        self._files, self._keys = files, keys
        self._columns = self._load()

    def _load(self):
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        tables = []
        for f in self._files:
            try:
                schema = pq.read_schema(f)
            except (OSError, pa.ArrowException) as e:
                raise ValueError(f"cannot read parquet file {f}: {str(e).splitlines()[0]}") from None
            for key in self._keys:
                if key not in schema.names:
                    raise ValueError(f"{f}: no column {key!r} (columns: {', '.join(schema.names)})")
                if not pa.types.is_string(schema.field(key).type) and not pa.types.is_large_string(
                        schema.field(key).type):
                    raise ValueError(f"{f}: column {key!r} has type {schema.field(key).type}, expected string")
            table = pq.read_table(f, columns=list(self._keys), memory_map=True)
            tables.append(table.cast(pa.schema([(k, pa.large_string()) for k in self._keys])))
        table = pa.concat_tables(tables)
        # Drop null and blank documents here, so indices count real documents.
        empty = pa.scalar("", pa.large_string())
        text = pc.binary_join_element_wise(*[pc.fill_null(table[k], empty) for k in self._keys], empty)
        keep = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0)
        table = table.filter(keep)
        return [table[k].combine_chunks() for k in self._keys]

    def __len__(self) -> int:
        return len(self._columns[0])

    def __getitem__(self, i: int) -> Document:
        values = [c[i].as_py() or "" for c in self._columns]
        return values[0] if len(values) == 1 else (values[0], values[1])

    def __getstate__(self):  # grain workers reopen the files instead of pickling the arrays
        return {"_files": self._files, "_keys": self._keys}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._columns = self._load()


class ArrayRecordSource:
    """ArrayRecord files whose records are JSON objects (holding ``keys``) or raw UTF-8 text.

    Which of the two is decided per file from its first record, so that a text document that happens to look
    like JSON is not misread, and JSON and text shards can share a directory.
    """

    def __init__(self, files: list[Path], keys: tuple[str, ...], paired: bool):
        try:
            from grain.sources import ArrayRecordDataSource
        except ImportError as e:
            raise ValueError(f"reading ArrayRecord needs the array-record package ({e})") from None
        self._files, self._keys, self._readers, self._json = files, keys, [], []
        for f in files:
            try:
                reader = ArrayRecordDataSource([str(f)])
                is_json = len(reader) > 0 and self._is_json(reader[0])
            except Exception as e:  # the C++ reader raises bare RuntimeError/ValueError with long messages
                raise ValueError(f"cannot read ArrayRecord file {f}: {(str(e).splitlines() or ['?'])[0]}") from None
            if paired and len(reader) and not is_json:
                raise ValueError(f"{f}: prompt/response keys need JSON records, but records are raw text")
            self._readers.append(reader)
            self._json.append(is_json)
        self._ends = np.cumsum([len(r) for r in self._readers])

    @staticmethod
    def _is_json(record: bytes) -> bool:
        try:
            return isinstance(json.loads(record), dict)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, i: int) -> Document | None:
        f = int(np.searchsorted(self._ends, i, side="right"))
        j = i - (int(self._ends[f - 1]) if f else 0)
        record = self._readers[f][j]
        if self._json[f]:
            where = f"{self._files[f]} record {j}"
            try:
                doc = _from_record(json.loads(record), self._keys, where)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        else:
            doc = record.decode("utf-8", errors="replace")
        return doc if _nonblank(doc) else None


def open_documents(path: str | None, fmt: str = "auto", text_key: str = "text", prompt_key: str | None = None,
                   response_key: str | None = None):
    """A random-access source of documents; ``path=None`` is the embedded corpus."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r} for {path or 'the embedded corpus'} "
                         f"(expected one of {', '.join(FORMATS)})")
    if path is None:
        from monet_jax.data.text import embedded_corpus

        return ListSource(embedded_corpus())
    paired = prompt_key is not None and response_key is not None
    keys = (prompt_key, response_key) if paired else (text_key,)
    files, single_file = resolve_files(path)
    fmt, files = detect_format(files, fmt, path, single_file)
    if paired and fmt == "text":
        raise ValueError(f"{path}: prompt/response keys need jsonl, parquet or arrayrecord data, not text")
    # The trainer opens a fresh validation iterator at every evaluation: reuse the parsed files unless they changed.
    key = (fmt, keys, single_file, tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files))
    if key in _OPENED:
        return _OPENED[key]
    if fmt == "text":
        source = ListSource(read_text(files, single_file))
    elif fmt == "jsonl":
        source = ListSource(read_jsonl(files, keys))
    elif fmt == "parquet":
        source = ParquetSource(files, keys)
    else:
        source = ArrayRecordSource(files, keys, paired)
    if len(source) == 0:
        raise ValueError(f"no documents found in {path}")
    while len(_OPENED) >= 4:
        _OPENED.pop(next(iter(_OPENED)))
    _OPENED[key] = source
    return source


_OPENED: dict = {}
