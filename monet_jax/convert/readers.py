"""Read Hugging Face checkpoint directories tensor by tensor, in every layout that exists:
``model.safetensors``, sharded safetensors with an index, ``pytorch_model.bin`` and sharded ``.bin``
with an index. Tensors come back as NumPy arrays in their stored dtype (bfloat16 via ml_dtypes).

``.bin`` files are read with ``torch.load(weights_only=True)``: pickled code is refused, never run.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np


class ConvertError(ValueError):
    """A checkpoint that cannot be read or written; the message is one line and names the problem."""


SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}

LAYOUTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
           "pytorch_model.bin")


class CheckpointReader:
    """Lazy view of one checkpoint: ``keys()``, ``shape(k)``, ``dtype(k)``, ``get(k)``."""

    def __init__(self, directory: Path, files: dict[str, str]):
        self.directory = directory
        self._file_of = files  # key -> file name

    def keys(self) -> list[str]:
        """All tensor names, grouped by file so that a streaming pass opens each shard once."""
        return sorted(self._file_of, key=self._file_of.__getitem__)

    def file_of(self, key: str) -> str:
        return self._file_of[key]

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> np.dtype:
        raise NotImplementedError

    def get(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsReader(CheckpointReader):
    """The header is validated by the safetensors library; tensor bytes are then read with plain file
    reads rather than through a memory map, so that pages of tensors already converted do not stay
    resident (a map of the whole file would add the checkpoint's size to the process's memory)."""

    def __init__(self, directory: Path, files: dict[str, str] | None, single: str | None = None):
        from safetensors import safe_open

        self._entries: dict[str, tuple[str, str, tuple[int, ...], int, int]] = {}
        names = sorted(set(files.values())) if files else [single]
        for name in names:
            path = directory / name
            if not path.is_file():
                raise ConvertError(f"{path}: shard named in the index is missing")
            try:
                with safe_open(str(path), framework="numpy"):
                    pass  # validates the header and that the data covers the file exactly
                header, data_start = _safetensors_header(path)
            except Exception as e:  # SafetensorError: truncated, corrupted, not a safetensors file
                raise ConvertError(f"{path}: corrupted or truncated safetensors file ({_first_line(e)})") from None
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                self._entries[key] = (name, info["dtype"], tuple(info["shape"]), data_start + begin, end - begin)
        present = {k: e[0] for k, e in self._entries.items()}
        if files:
            for key, name in files.items():
                if present.get(key) != name:
                    raise ConvertError(f"{directory / name}: key {key} listed in the index is not in this shard")
        super().__init__(directory, files or present)

    def shape(self, key):
        return self._entries[key][2]

    def dtype(self, key):
        name = self._entries[key][1]
        if name not in SAFETENSORS_DTYPES:
            raise ConvertError(f"{key}: unsupported dtype {name}")
        return np.dtype(SAFETENSORS_DTYPES[name])

    def get(self, key):
        name, _, shape, offset, nbytes = self._entries[key]
        dtype = self.dtype(key)
        if int(np.prod(shape)) * dtype.itemsize != nbytes:
            raise ConvertError(f"{self.directory / name}: {key} has {nbytes} bytes for shape {list(shape)}")
        raw = np.empty(nbytes, dtype=np.uint8)
        with open(self.directory / name, "rb") as f:
            f.seek(offset)
            if f.readinto(memoryview(raw)) != nbytes:
                raise ConvertError(f"{self.directory / name}: truncated while reading {key}")
        return raw.view(dtype).reshape(shape)


def _safetensors_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


class TorchBinReader(CheckpointReader):
    """``pytorch_model.bin`` shards, loaded one shard at a time (memory-mapped where possible)."""

    def __init__(self, directory: Path, files: dict[str, str] | None, single: str | None = None):
        try:
            import torch
        except ImportError:
            raise ConvertError("reading pytorch_model.bin needs PyTorch: pip install 'monet-jax[torch]'") from None
        self._torch = torch
        self.directory = directory
        self._loaded_name, self._loaded = None, None
        if files is None:
            files = {k: single for k in self._load(single)}
        for name in sorted(set(files.values())):
            if not (directory / name).is_file():
                raise ConvertError(f"{directory / name}: shard named in the index is missing")
        super().__init__(directory, files)

    def _load(self, name: str) -> dict:
        if self._loaded_name == name:
            return self._loaded
        torch = self._torch
        path = self.directory / name
        self._loaded, self._loaded_name = None, None
        try:
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            if "weights_only" in str(e) or "Unsupported global" in str(e) or "Unsupported operand" in str(e):
                raise ConvertError(f"{path}: refusing to load: the pickle holds code or objects other than "
                                   "tensors (only weights_only loading is allowed)") from None
            raise ConvertError(f"{path}: corrupted or truncated PyTorch file ({_first_line(e)})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConvertError(f"{path}: expected a state dict of tensors")
        self._loaded, self._loaded_name = state, name
        return state

    def _tensor(self, key):
        state = self._load(self.file_of(key))
        if key not in state:
            where = self.directory / self.file_of(key)
            raise ConvertError(f"{where}: key {key} listed in the index is not in this shard")
        return state[key]

    def shape(self, key):
        return tuple(self._tensor(key).shape)

    def dtype(self, key):
        t = self._tensor(key)
        return np.dtype(ml_dtypes.bfloat16) if t.dtype == self._torch.bfloat16 else t.numpy().dtype

    def get(self, key):
        t = self._tensor(key).contiguous()
        if t.dtype == self._torch.bfloat16:
            return t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return t.numpy().copy()

    def close(self):
        self._loaded, self._loaded_name = None, None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_bytes())["weight_map"]
    except (ValueError, KeyError, TypeError):  # ValueError: bad JSON or bytes that are not UTF-8
        raise ConvertError(f"{path}: not a valid index file (expected a JSON object with 'weight_map')") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConvertError(f"{path}: 'weight_map' must map tensor names to file names")
    return weight_map


def open_checkpoint(directory: str | Path) -> CheckpointReader:
    """Open whichever weight layout ``directory`` holds (safetensors preferred over .bin)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConvertError(f"checkpoint directory not found: {directory}")
    for layout in LAYOUTS:
        path = directory / layout
        if not path.is_file():
            continue
        if layout == "model.safetensors.index.json":
            return SafetensorsReader(directory, _read_index(path))
        if layout == "model.safetensors":
            return SafetensorsReader(directory, None, single=layout)
        if layout == "pytorch_model.bin.index.json":
            return TorchBinReader(directory, _read_index(path))
        return TorchBinReader(directory, None, single=layout)
    raise ConvertError(f"{directory}: no weights found (expected one of {', '.join(LAYOUTS)})")
