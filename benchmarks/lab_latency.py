"""The expert lab's latency at a published size, as a user sees it: HTTP requests to ``eval.py experts serve``'s
app over a model of ``--config``'s dimensions (random weights, no download).

    python benchmarks/lab_latency.py [--config configs/monet-vd-1.4b.yaml] [--max-tokens 4096] [--new-tokens 16]

The routers' BatchNorm running variance is set to their logits' variance, so about ``moe_topk`` experts pass per
head as in a trained model. The byte tokenizer stands for the checkpoint's (any vocabulary of 259 ids or more
takes it). Times each request twice, the first with its compilation: the lab's load (model, one pass over
``--max-tokens`` of the embedded corpus), your text (``--text-tokens`` tokens), an expert page, a search, and
one ablation (the text scored and continued by ``--new-tokens`` greedy tokens before and after deleting one
expert). Prints a Markdown table and, with ``--json``, writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

TEXT = ("The expert lab runs your text through the model and shows, for every token, the experts that fire, "
        "with their scores in context; delete some and see what changes in the loss and the continuation.")


def random_model(config: str, overrides: list[str]):
    from flax import nnx

    from monet_jax import MonetForCausalLM
    from monet_jax.config import MonetConfig

    cfg = MonetConfig.from_yaml(config, ["param_dtype=float32", "compute_dtype=float32", *overrides])
    model = MonetForCausalLM(cfg, rngs=nnx.Rngs(0))
    for layer in model.model.layers:  # RMS-normalized inputs times N(0, std^2) weights: logits of variance d std^2
        if layer.router is not None:
            for norm in (layer.router.norm1, layer.router.norm2):
                norm.running_var[...] = norm.running_var[...] * cfg.hidden_size * cfg.initializer_range**2
    model.eval()
    return model


def request(url: str, body=None) -> tuple[float, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=3600) as r:
        out = json.load(r)
    return time.perf_counter() - t0, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/monet-vd-1.4b.yaml")
    p.add_argument("--max-tokens", type=int, default=4096, help="corpus tokens read at load")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*", help="model key=value overrides")
    args = p.parse_args()

    import uvicorn

    from monet_jax.data.text import embedded_corpus
    from monet_jax.data.tokenizer import load_tokenizer
    from monet_jax.eval.lab.app import create_app
    from monet_jax.eval.lab.engine import Lab, LabOptions
    from monet_jax.eval.lab.service import LabService

    tok = load_tokenizer("byte")
    text = tok.decode(tok.encode(TEXT)[:args.text_tokens - 1])  # with bos: --text-tokens tokens
    loaded = {}

    def load(note):
        t0 = time.perf_counter()
        note("random weights")
        model = random_model(args.config, args.overrides)
        loaded["model"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        lab = Lab(model, tok, embedded_corpus(), LabOptions(max_tokens=args.max_tokens),
                  out_dir=tempfile.mkdtemp(prefix="lab-latency-"))
        loaded["corpus"] = time.perf_counter() - t1
        return lab

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    service = LabService(load)
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}/api/"
    t0 = time.perf_counter()
    service.wait_ready(timeout=7200)
    rows = [("load: random weights", loaded["model"], None),
            (f"load: corpus pass ({args.max_tokens:,} tokens)", loaded["corpus"], None)]
    cfg = service.lab.config
    first, r = request(url + "tokens", {"text": text, "top": 8})
    assert len(r["tokens"]) == args.text_tokens, len(r["tokens"])
    rows.append((f"your text ({args.text_tokens} tokens)", first, request(url + "tokens", {"text": text})[0]))
    expert = max(r["tokens"][-1]["groups"][0]["top"], key=lambda x: x["score"])["id"]  # fires on the last token
    jobs = [("expert page", f"expert?g=0&id={expert}", None),
            ("search (one word)", "search", {"text": " the", "top": 10}),
            (f"ablation (1 expert, {args.text_tokens} tokens, {args.new_tokens} new x 2)", "ablate",
             {"text": text, "experts": [[0, expert]], "new_tokens": args.new_tokens})]
    for name, path, body in jobs:
        first, _ = request(url + path, body)
        again, _ = request(url + path, body)
        rows.append((name, first, again))
    server.should_exit = True
    total = time.perf_counter() - t0
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"
    print(f"\n{args.config} ({cfg.num_hidden_layers} layers, d {cfg.hidden_size}, E {cfg.moe_experts}, "
          f"{cfg.moe_decompose}), float32 on {machine}\n")
    print("| request | first (with compile) | again |\n|---|---:|---:|")
    for name, first, again in rows:
        print(f"| {name} | {first:.1f} s | " + (f"{again:.1f} s |" if again is not None else "|"))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "machine": machine, "total_s": total,
                                               "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
