"""Greedy decoding and the forward pass of monet-jax against the upstream PyTorch model on the same weights.

    python benchmarks/decode_vs_torch.py                                   # monet-jax only
    python benchmarks/decode_vs_torch.py --reference-code /tmp/modeling_monet.py   # and upstream PyTorch

Builds random weights with the published proportions shrunk to 2 layers (d 1024, 8 attention heads,
E 512, m 16, H 8, vocab 8192, float32; the routers' BatchNorm running variance set to the variance of
their logits, so about ``moe_topk`` experts pass per head as in a trained model), then times, after
compilation: greedy decoding at batch 1 and 8 (prompt 32, 48 new tokens; tokens/s of whole ``generate``
calls, prefill included) and the forward pass of 2 x 256 tokens. ``--reference-code`` is a local copy of
upstream's ``modeling_monet.py`` (dmis-lab/Monet, Hugging Face remote code; it needs ``transformers``
4.46, whose LLaMA module it imports): the same weights are saved in the Hugging Face layout, loaded by
that code and timed with ``generate`` (its key/value cache) and a plain forward; the greedy tokens of
both are compared.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from monet_jax import MonetForCausalLM
from monet_jax.config import MonetConfig
from monet_jax.eval.generate import generate
from monet_jax.model.pure import PureModel

SHAPE = dict(vocab_size=8192, hidden_size=1024, num_hidden_layers=2, num_attention_heads=8,
             max_position_embeddings=2048, moe_dim=16, moe_heads=8, moe_experts=512, moe_topk=8, moe_groups=4,
             torch_dtype="float32")


def build(decompose: str, moe_impl: str) -> MonetForCausalLM:
    cfg = MonetConfig(**SHAPE, moe_decompose=decompose, moe_impl=moe_impl)
    model = MonetForCausalLM(cfg, rngs=nnx.Rngs(0))
    # RMS-normalized inputs (unit scale) times N(0, std^2) weights: router logits of variance d * std^2.
    for layer in model.model.layers:
        if layer.router is not None:
            for norm in (layer.router.norm1, layer.router.norm2):
                norm.running_var[...] = norm.running_var[...] * cfg.hidden_size * cfg.initializer_range**2
    return model


def _logits(model, ids_bt):
    return model(ids_bt).logits


def best_of(fns: dict, reps: int) -> dict:
    """Shortest wall time of each function over ``reps`` rounds (after a warm-up call), the functions taking
    turns within a round: the least disturbed by a shared machine, and disturbed alike."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def jax_work(model, prompts: dict[int, np.ndarray], fwd_ids: np.ndarray, new: int,
             cpu_dot: str = "onednn") -> tuple[dict, dict]:
    """(functions to time, their outputs): decoding per batch size and the forward pass, with the CPU matrix
    products of ``cpu_dot`` (``MONET_JAX_CPU_DOT``: ``auto``, the default, ``onednn`` or ``xla``)."""
    pure = PureModel(model, expert_rows=True)  # what generate() splits for batch-1 decoding (sparse u rows)
    fns, outs = {}, {}

    def with_dot(fn):
        def call():
            os.environ["MONET_JAX_CPU_DOT"] = cpu_dot
            return fn()
        return call

    for b, ids in prompts.items():
        def run(ids=ids, b=b):
            outs[f"decode_b{b}"] = generate(model, ids.tolist(), max_new_tokens=new, eos_id=None, pure=pure)["tokens"]
        fns[f"decode_b{b}"] = with_dot(run)
    fwd = with_dot(lambda: pure.jit(_logits))()
    fns["forward"] = lambda: jax.block_until_ready(fwd(fwd_ids))
    return fns, outs


def load_reference(path: str, model: MonetForCausalLM, directory: str):
    """The upstream PyTorch model (``modeling_monet.py`` at ``path``) on ``model``'s weights."""
    import torch

    spec = importlib.util.spec_from_file_location("modeling_monet", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    model.save_pretrained(directory)
    ref = module.MonetForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None  # decode every requested token, as monet-jax does with eos_id=None
    return ref


def torch_work(ref, prompts: dict[int, np.ndarray], fwd_ids: np.ndarray, new: int) -> tuple[dict, dict]:
    import torch

    fns, outs = {}, {}
    for b, ids in prompts.items():
        x = torch.from_numpy(ids.astype(np.int64))

        @torch.inference_mode()
        def run(x=x, b=b):
            out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, use_cache=True, pad_token_id=0)
            outs[f"decode_b{b}"] = out[:, x.shape[1]:].tolist()
        fns[f"decode_b{b}"] = run
    x = torch.from_numpy(fwd_ids.astype(np.int64))
    fns["forward"] = torch.inference_mode()(lambda: ref(x, use_cache=False).logits)
    return fns, outs


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    same = sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    total = sum(len(r) for r in a)
    return "all agree" if same == total else f"{same}/{total} agree"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-code", default=None, help="local copy of upstream's modeling_monet.py")
    p.add_argument("--decompose", default="vertical,horizontal")
    p.add_argument("--moe-impl", default="auto", help="monet-jax moe_impl (auto: sparse at small token counts)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--forward", default="2x256", help="BATCHxTOKENS of the forward pass")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cpu-dot", default="auto,onednn,xla",
                   help="monet-jax CPU matrix products to time, comma-separated: auto (the default), onednn "
                        "(every forward over many tokens) and xla")
    args = p.parse_args(argv)
    dots = args.cpu_dot.split(",")
    rng = np.random.default_rng(0)
    prompts = {int(b): rng.integers(3, SHAPE["vocab_size"], (int(b), args.prompt)) for b in args.batches.split(",")}
    fb, ft = map(int, args.forward.split("x"))
    fwd_ids = rng.integers(3, SHAPE["vocab_size"], (fb, ft)).astype(np.int32)
    print(f"shape {SHAPE} | prompt {args.prompt}, {args.new_tokens} new tokens | forward {fb}x{ft} | "
          f"best of {args.reps}, interleaved | {jax.devices()[0].device_kind}")
    for dec in args.decompose.split(","):
        model = build(dec, args.moe_impl)
        fns, outs = {}, {}
        for dot in dots:
            f, o = jax_work(model, prompts, fwd_ids, args.new_tokens, dot)
            fns.update({(dot, k): fn for k, fn in f.items()})
            outs[dot] = o  # filled in when the functions run
        with tempfile.TemporaryDirectory() as d:
            if args.reference_code:
                ref_fns, ref_outs = torch_work(load_reference(args.reference_code, model, d), prompts, fwd_ids,
                                               args.new_tokens)
                fns.update({("torch", k): f for k, f in ref_fns.items()})
            best = best_of(fns, args.reps)
        name = f"{dec[0].upper()}D"
        for dot in dots:
            for b in prompts:
                k = f"decode_b{b}"
                rate = b * args.new_tokens / best[dot, k]
                line = f"{name} decode batch {b}: monet-jax ({dot} dots) {rate:7.1f} tok/s"
                if args.reference_code:
                    ref_rate = b * args.new_tokens / best["torch", k]
                    line += (f" | PyTorch {ref_rate:7.1f} tok/s | {rate / ref_rate:.2f}x | greedy tokens "
                             f"{agreement(outs[dot][k], ref_outs[k])}")
                print(line, flush=True)
            line = f"{name} forward {fb}x{ft}: monet-jax ({dot} dots) {1e3 * best[dot, 'forward']:7.1f} ms"
            if args.reference_code:
                line += (f" | PyTorch {1e3 * best['torch', 'forward']:7.1f} ms | "
                         f"{best['torch', 'forward'] / best[dot, 'forward']:.2f}x")
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
