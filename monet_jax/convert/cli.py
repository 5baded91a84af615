"""``monet-convert``: Hugging Face checkpoints <-> monet-jax checkpoints.

    monet-convert hf-to-jax  HF_DIR    JAX_DIR  [--param-dtype float32]
    monet-convert jax-to-hf  JAX_DIR   HF_DIR   [--dtype bfloat16] [--max-shard-size 5GB]

HF_DIR is a Hugging Face checkpoint directory (config.json + safetensors or .bin); JAX_DIR is one of ours
(config.json + an Orbax state, as train.py writes to out_dir/checkpoint).

Both directions carry the tokenizer files beside the weights (tokenizer.json / tokenizer.model,
tokenizer_config.json, special_tokens_map.json, chat_template.jinja, generation_config.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from monet_jax.config import DTYPES, ConfigError
from monet_jax.convert.readers import ConvertError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="monet-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-jax", help="HF checkpoint (safetensors or .bin, any sharding) -> Orbax")
    a.add_argument("src", metavar="HF_DIR", help="the Hugging Face checkpoint directory to read")
    a.add_argument("out", metavar="JAX_DIR", help="the directory to write (ours: config.json + Orbax state)")
    a.add_argument("--param-dtype", choices=DTYPES, default=None,
                   help="dtype of the stored parameters (default: the checkpoint's torch_dtype)")
    b = sub.add_parser("jax-to-hf", help="Orbax checkpoint -> HF layout (config.json + safetensors)")
    b.add_argument("src", metavar="JAX_DIR", help="our checkpoint directory to read (config.json + Orbax state)")
    b.add_argument("out", metavar="HF_DIR", help="the Hugging Face directory to write (config.json + safetensors)")
    b.add_argument("--dtype", choices=DTYPES, default=None, help="tensor dtype (default: config torch_dtype)")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default: %(default)s)")
    for s in (a, b):
        s.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    return p


def main(argv: list[str] | None = None) -> int:
    """``monet-convert``: ``hf-to-jax`` or ``jax-to-hf``, bit-exact on every tensor, with the tokenizer files
    carried; the output directory appears only once it is complete.

    Args:
        argv: The command line without the program name (``None``: ``sys.argv[1:]``), e.g.
            ``["jax-to-hf", "runs/default/checkpoint", "runs/default/hf"]``.

    Returns:
        The exit status, 0 or 2 for an unreadable source, a config it cannot convert or an output that
            exists without ``--overwrite``, after one line on stderr.
    """
    args = build_parser().parse_args(argv)
    from monet_jax.convert import hf

    start = time.perf_counter()
    try:
        if args.command == "hf-to-jax":
            cfg = hf.convert_hf_to_orbax(args.src, args.out, param_dtype=args.param_dtype, overwrite=args.overwrite)
        else:
            cfg = hf.convert_orbax_to_hf(args.src, args.out, torch_dtype=args.dtype,
                                         max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except (ConvertError, ConfigError) as e:
        print(f"monet-convert: error: {e}", file=sys.stderr)
        return 2
    from monet_jax.config import count_params
    from monet_jax.data.tokenizer_files import TOKENIZER_FILES

    print(f"wrote {args.out}: {cfg.moe_decompose if cfg.is_moe else 'dense'} model, "
          f"{count_params(cfg) / 1e6:.1f}M parameters, {time.perf_counter() - start:.1f}s")
    carried = [name for name in TOKENIZER_FILES if (Path(args.out) / name).is_file()]
    print("tokenizer: " + (", ".join(carried) if carried else
                           f"none in {args.src} (eval.py then needs --tokenizer unless the vocabulary is bytes)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
