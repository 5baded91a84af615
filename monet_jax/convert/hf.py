"""Move weights between Hugging Face checkpoint directories, our Orbax checkpoints and flat
``{path: array}`` dicts. Works on config + key table alone, so it never imports the model."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from monet_jax.config import ConfigError, MonetConfig
from monet_jax.convert.keys import IGNORED_HF_KEYS, KeySpec, key_table
from monet_jax.convert.readers import SAFETENSORS_DTYPES, ConvertError, open_checkpoint
from monet_jax.data.tokenizer_files import copy_tokenizer_files
from monet_jax.distributed import barrier

NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
             "float16": np.dtype(np.float16)}
READABLE_FLOATS = set(NP_DTYPES.values())
_ST_NAMES = {np.dtype(t): name for name, t in SAFETENSORS_DTYPES.items()}
STATE_DIR = "state"


def is_orbax_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / STATE_DIR).is_dir()


def read_config(directory: str | Path, **policy: str) -> MonetConfig:
    directory = Path(directory)
    if not directory.is_dir():
        raise ConvertError(f"checkpoint directory not found: {directory}")
    try:
        return MonetConfig.from_json(directory / "config.json", **policy)
    except ConfigError as e:
        raise ConvertError(str(e)) from None


def _check_keys(directory: Path, present: list[str], table: list[KeySpec]) -> None:
    expected = {s.hf for s in table}
    have = {k for k in present if not IGNORED_HF_KEYS.match(k)}
    missing = [s.hf for s in table if s.hf not in have]
    unexpected = sorted(have - expected)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConvertError(f"{directory}: missing key {missing[0]}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConvertError(f"{directory}: unexpected key {unexpected[0]}{more} for this config.json")


def iter_hf_arrays(directory: str | Path, cfg: MonetConfig, param_dtype: str) -> Iterator[tuple[KeySpec, np.ndarray]]:
    """Yield ``(spec, array in our layout and dtype)`` one tensor at a time, after checking every key,
    shape and dtype up front so that a bad checkpoint fails before anything is built or written."""
    directory = Path(directory)
    table = key_table(cfg)
    with open_checkpoint(directory) as reader:
        _check_keys(directory, reader.keys(), table)
        by_key = {s.hf: s for s in table}
        for key in reader.keys():
            spec = by_key.get(key)
            if spec is None:
                continue
            shape, dtype = reader.shape(key), reader.dtype(key)
            if shape != spec.hf_shape:
                raise ConvertError(f"{directory}: {key} has shape {list(shape)} but config.json implies "
                                   f"{list(spec.hf_shape)}")
            if not spec.counter and dtype not in READABLE_FLOATS:
                raise ConvertError(f"{directory}: {key} has unsupported dtype {dtype} "
                                   "(expected float32, bfloat16 or float16)")
        target = NP_DTYPES[param_dtype]
        for key in reader.keys():
            spec = by_key.get(key)
            if spec is None:
                continue
            array = reader.get(key)
            if spec.counter:
                yield spec, np.asarray(array, dtype=np.int32)
                continue
            if spec.linear:
                array = array.T
            if spec.path[-2:-1] in (("norm1",), ("norm2",)):  # BatchNorm statistics stay float32
                yield spec, np.ascontiguousarray(array, dtype=np.float32)
            else:
                yield spec, np.ascontiguousarray(array, dtype=target)


def hf_dtype(spec: KeySpec, torch_dtype: str) -> np.dtype:
    return np.dtype(np.int64) if spec.counter else NP_DTYPES[torch_dtype]


def hf_nbytes(spec: KeySpec, torch_dtype: str) -> int:
    return int(np.prod(spec.hf_shape)) * hf_dtype(spec, torch_dtype).itemsize


def hf_tensor(spec: KeySpec, array, torch_dtype: str) -> np.ndarray:
    """One of our arrays in the HF layout and dtype."""
    array = np.asarray(array)
    if spec.linear:
        array = array.T
    return np.ascontiguousarray(array.astype(hf_dtype(spec, torch_dtype))).reshape(spec.hf_shape)


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Write into a temporary sibling and rename it into place only when everything succeeded.

    With several processes (a sharded model saved by all of them) every process writes into the same
    temporary directory, and process 0 renames it once all are done."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConvertError(f"{out}: output exists and is not empty "
                           "(replace it with --overwrite, or overwrite=True from Python)")
    multi, primary = jax.process_count() > 1, jax.process_index() == 0
    if multi:
        tmp = out.parent / f".{out.name}.tmp-multiprocess"
        if primary:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier(f"monet_atomic_begin:{out}")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(f"monet_atomic_written:{out}")
    if primary:
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    barrier(f"monet_atomic_done:{out}")


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                         ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * factor)
            except ValueError:
                break
    raise ConvertError(f"bad size {size!r} (expected e.g. 5GB or 500MB)")


def write_safetensors(path: Path, specs: list[KeySpec], get: Callable[[KeySpec], np.ndarray],
                      torch_dtype: str) -> int:
    """Write one safetensors file tensor by tensor (header first, then each tensor's bytes), so only
    one converted tensor is in memory at a time. Returns the bytes of tensor data written."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for spec in specs:
        nbytes = hf_nbytes(spec, torch_dtype)
        header[spec.hf] = {"dtype": _ST_NAMES[hf_dtype(spec, torch_dtype)], "shape": list(spec.hf_shape),
                           "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for spec in specs:
            tensor = hf_tensor(spec, get(spec), torch_dtype)
            expected = header[spec.hf]["data_offsets"]
            if tensor.shape != spec.hf_shape or tensor.nbytes != expected[1] - expected[0]:
                raise ConvertError(f"{spec.hf}: got shape {list(tensor.shape)}, expected {list(spec.hf_shape)}")
            f.write(tensor.tobytes())
            del tensor
    return offset


def write_hf(out: str | Path, cfg: MonetConfig, get: Callable[[KeySpec], np.ndarray], *,
             torch_dtype: str | None = None, max_shard_size: int | str = "5GB", overwrite: bool = False,
             extra: Callable[[Path], object] | None = None) -> Path:
    """Write ``config.json`` + safetensors (sharded with an index past ``max_shard_size``).
    ``get(spec)`` returns our array for one key; tensors are converted and written one at a time.
    ``extra(directory)`` adds files (a tokenizer) before the directory is renamed into place."""
    torch_dtype = torch_dtype or cfg.torch_dtype
    if torch_dtype not in NP_DTYPES:
        raise ConvertError(f"unsupported torch_dtype {torch_dtype!r} (expected {', '.join(NP_DTYPES)})")
    from safetensors import safe_open

    limit = parse_size(max_shard_size)
    shards: list[list[KeySpec]] = [[]]
    size = 0
    for spec in key_table(cfg):
        nbytes = hf_nbytes(spec, torch_dtype)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    hf_config = dataclasses.replace(cfg, torch_dtype=torch_dtype).to_hf_dict()
    with atomic_directory(out, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map, total = {}, 0
        for name, specs in zip(names, shards):
            total += write_safetensors(tmp / name, specs, get, torch_dtype)
            with safe_open(str(tmp / name), framework="numpy") as check:  # the library must accept it
                if set(check.keys()) != {s.hf for s in specs}:
                    raise ConvertError(f"{name}: written keys do not match")
            weight_map.update({s.hf: name for s in specs})
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if extra is not None:
            extra(tmp)
    return Path(out)


def _checkpointer():
    """Synchronous Orbax checkpointer that bounds the bytes in flight, so saving or restoring holds
    little more than one copy of the weights."""
    import orbax.checkpoint as ocp

    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, restore_concurrent_gb=1,
                                          save_device_host_concurrent_gb=1)
    return ocp.Checkpointer(handler)


def save_orbax(out: str | Path, cfg: MonetConfig, flat: dict[str, object], *, overwrite: bool = False,
               extra: Callable[[Path], object] | None = None) -> Path:
    """Our checkpoint: ``config.json`` (HF fields + dtype policy) and an Orbax ``state/`` of flat arrays;
    ``extra(directory)`` adds files beside them (the tokenizer), on the first process."""
    import orbax.checkpoint as ocp

    with atomic_directory(out, overwrite) as tmp:
        config = cfg.to_hf_dict() if cfg.is_moe or cfg.hidden_act == "silu" else _plain_config(cfg)
        config.update(param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype)
        if jax.process_index() == 0:
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            if extra is not None:
                extra(tmp)
        _checkpointer().save((tmp / STATE_DIR).absolute(), args=ocp.args.PyTreeSave(flat))
    return Path(out)


def _plain_config(cfg: MonetConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["model_type"] = "monet"
    return d


def load_orbax(directory: str | Path, abstract: dict[str, object] | None) -> dict[str, object]:
    """Restore the flat arrays, shaped like ``abstract`` (ShapeDtypeStructs) or as saved when None."""
    import orbax.checkpoint as ocp

    path = (Path(directory) / STATE_DIR).absolute()
    if abstract is None:
        args = ocp.args.PyTreeRestore()
    else:
        args = ocp.args.PyTreeRestore(item=abstract,
                                      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
    try:
        with warnings.catch_warnings():  # "sharding info not provided": single-host arrays, as saved
            warnings.simplefilter("ignore", UserWarning)
            return _checkpointer().restore(path, args=args)
    except Exception as e:
        raise ConvertError(f"{path}: cannot restore checkpoint ({_short(e)})") from None


def _short(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


def convert_hf_to_orbax(src: str | Path, out: str | Path, *, param_dtype: str | None = None,
                        overwrite: bool = False) -> MonetConfig:
    """HF directory -> our checkpoint. Parameters keep the checkpoint's dtype unless told otherwise,
    so the conversion holds about one copy of the weights in memory. Tokenizer files come along."""
    config = read_config(src)
    config = dataclasses.replace(config, param_dtype=param_dtype or config.torch_dtype)
    # Device arrays: Orbax then saves them without another host copy of the whole model.
    flat = {spec.path_str: jnp.asarray(array) for spec, array in iter_hf_arrays(src, config, config.param_dtype)}
    save_orbax(out, config, flat, overwrite=overwrite, extra=lambda d: copy_tokenizer_files(src, d))
    return config


def convert_orbax_to_hf(src: str | Path, out: str | Path, *, torch_dtype: str | None = None,
                        max_shard_size: int | str = "5GB", overwrite: bool = False) -> MonetConfig:
    """Our checkpoint -> HF directory (config.json + safetensors) for the upstream PyTorch code and vLLM, with
    the checkpoint's tokenizer files and a generation_config.json (``AutoTokenizer`` loads the directory)."""
    if not is_orbax_checkpoint(src):
        raise ConvertError(f"{src}: not a monet-jax checkpoint (no {STATE_DIR}/ directory)")
    config = read_config(src)
    flat = load_orbax(src, None)
    missing = [s.path_str for s in key_table(config) if s.path_str not in flat]
    if missing:
        raise ConvertError(f"{src}: checkpoint has no {missing[0]} for its config.json")
    write_hf(out, config, lambda spec: np.asarray(flat.pop(spec.path_str)), torch_dtype=torch_dtype,
             max_shard_size=max_shard_size, overwrite=overwrite, extra=lambda d: copy_tokenizer_files(src, d))
    return config
