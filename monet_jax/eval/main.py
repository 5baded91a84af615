"""``eval.py`` / ``monet-eval``: evaluate a checkpoint (ours or a Hugging Face directory).

    python eval.py perplexity runs/default/checkpoint [--data FILE_OR_DIR]
    python eval.py generate runs/default/checkpoint --prompt "def main(" [--temperature 0.8 --top-p 0.95]
    python eval.py experts tokens runs/default/checkpoint --text "def main():"
    python eval.py tasks runs/default/checkpoint arc_easy.jsonl piqa.jsonl [--shots 5] [--tokenizer PATH]

Text is tokenized with the byte-level tokenizer of the embedded default run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from monet_jax.config import ConfigError
from monet_jax.convert.readers import ConvertError
from monet_jax.data import text
from monet_jax.model.loss import batch_loss


def perplexity(model, tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None = None) -> dict:
    """Mean next-token loss over non-overlapping windows of ``seq_len`` (the last partial one dropped)."""
    sampler = text.WindowSampler(tokens, seq_len, batch_size, seed=0)
    batches = list(sampler.sequential(max_batches or 10**9))
    total, count = 0.0, 0
    for batch in tqdm(batches, desc="perplexity", unit="batch"):
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += float(batch_loss(model, jnp.asarray(batch))) * n
        count += n
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="monet-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser("perplexity", help="loss and perplexity over local text")
    ppl.add_argument("checkpoint")
    ppl.add_argument("--data", default=None, help="text file or directory (default: the embedded corpus)")
    ppl.add_argument("--seq-len", type=int, default=128)
    ppl.add_argument("--batch-size", type=int, default=8)
    ppl.add_argument("--max-batches", type=int, default=None)
    tsk = sub.add_parser("tasks", help="multiple choice by log-likelihood on local JSONL files (acc, acc_norm)")
    tsk.add_argument("checkpoint")
    tsk.add_argument("files", nargs="+", help="JSONL: {\"context\": ..., \"choices\": [...], \"answer\": i}")
    tsk.add_argument("--shots", type=int, default=0)
    tsk.add_argument("--fewshot-file", default=None, help="examples for the shots (default: the same file)")
    tsk.add_argument("--tokenizer", default="byte", help="byte, a tokenizer.json or a tokenizer.model")
    tsk.add_argument("--batch-size", type=int, default=8)
    gen = sub.add_parser("generate", help="continue prompts (KV cache; greedy, temperature, top-k, top-p)")
    gen.add_argument("checkpoint")
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--tokenizer", default="byte", help="byte, a tokenizer.json or a tokenizer.model")
    exp = sub.add_parser("experts", help="expert microscope").add_subparsers(dest="experts_command", required=True)
    tok = exp.add_parser("tokens", help="each token's active composed experts (id i*E+j, score) per routing group")
    tok.add_argument("checkpoint")
    tok.add_argument("--text", required=True)
    tok.add_argument("--top", type=int, default=3, help="experts shown per token and group")
    tok.add_argument("--tokenizer", default="byte", help="byte, a tokenizer.json or a tokenizer.model")
    args = p.parse_args(argv)

    from monet_jax import MonetForCausalLM

    if args.command == "tasks":
        return _tasks(args)
    if args.command == "generate":
        return _generate(args)
    if args.command == "experts":
        return _expert_tokens(args)
    try:
        model = MonetForCausalLM.from_pretrained(args.checkpoint)
        docs = text.embedded_corpus() if args.data is None else text.read_documents(args.data)
        tokens = text.pack(docs)
        if tokens.size and tokens.max() >= model.config.vocab_size:
            raise ValueError(f"the byte tokenizer needs vocab_size >= {text.BYTE_VOCAB}")
        start = time.perf_counter()
        result = perplexity(model, tokens, args.seq_len, args.batch_size, args.max_batches)
    except (ConfigError, ConvertError, ValueError) as e:
        print(f"monet-eval: error: {e}", file=sys.stderr)
        return 2
    print(f"loss {result['loss']:.4f}  ppl {result['perplexity']:.3f}  tokens {result['tokens']:,}  "
          f"({time.perf_counter() - start:.1f}s)")
    return 0


def _model_and_tokenizer(args):
    from monet_jax import MonetForCausalLM
    from monet_jax.data.tokenizer import load_tokenizer

    model = MonetForCausalLM.from_pretrained(args.checkpoint)
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids, the model {model.config.vocab_size}")
    return model, tokenizer


def _generate(args) -> int:
    from monet_jax.eval.generate import Sampling, generate

    try:
        model, tokenizer = _model_and_tokenizer(args)
        prompts = [[tokenizer.bos_id, *map(int, tokenizer.encode(p))] for p in args.prompt]
        res = generate(model, prompts, max_new_tokens=args.max_new_tokens, eos_id=tokenizer.eos_id,
                       pad_id=tokenizer.pad_id, seed=args.seed,
                       sampling=Sampling(args.temperature, args.top_k, args.top_p))
    except (ConfigError, ConvertError, ValueError) as e:
        print(f"monet-eval: error: {e}", file=sys.stderr)
        return 2
    for i, (prompt, new) in enumerate(zip(args.prompt, res["tokens"], strict=True), 1):
        print(f"--- prompt {i}: {prompt!r}")
        print(prompt + tokenizer.decode(new))
    rate = res["decode_tokens_per_second"]
    print(f"prefill {res['prefill_seconds']:.2f}s (with compile); decode "
          + (f"{rate:,.1f} tokens/s" if rate else "n/a tokens/s") + f" at batch {len(prompts)}")
    return 0


def _expert_tokens(args) -> int:
    from monet_jax.experts.microscope import token_routing

    try:
        model, tokenizer = _model_and_tokenizer(args)
        ids = [tokenizer.bos_id, *map(int, tokenizer.encode(args.text))]
        routing = token_routing(model, np.array(ids))
    except (ConfigError, ConvertError, ValueError) as e:
        print(f"monet-eval: error: {e}", file=sys.stderr)
        return 2
    e = model.config.moe_experts
    print(f"composed expert id = i * {e} + j; score = sum over heads of g1[h, i] * g2[h, j]")
    for t, groups in zip(ids, routing, strict=True):
        cells = []
        for g, r in enumerate(groups):
            top = ", ".join(f"{i}:{s:.3f}" for i, s in zip(r.expert_ids[:args.top], r.scores[:args.top], strict=True))
            cells.append(f"group {g}: {len(r.expert_ids):4d} active, top {top}")
        print(f"{tokenizer.decode([t]) or '<bos>'!r:>10}  " + " | ".join(cells))
    return 0


def _tasks(args) -> int:
    from monet_jax.eval import tasks

    try:
        model, tokenizer = _model_and_tokenizer(args)
        pool = tasks.read_examples(args.fewshot_file) if args.fewshot_file else None
        results = {}
        for path in args.files:
            results[path] = tasks.evaluate(model, tokenizer, tasks.read_examples(path), shots=args.shots,
                                           shot_pool=pool, batch_size=args.batch_size)
    except (ConfigError, ConvertError, ValueError) as e:
        print(f"monet-eval: error: {e}", file=sys.stderr)
        return 2
    for path, r in results.items():
        print(f"{path}: acc {r['acc']:.4f}  acc_norm {r['acc_norm']:.4f}  ({r['examples']} examples, "
              f"{r['shots']}-shot)")
    if len(results) > 1:
        print(f"average: acc {np.mean([r['acc'] for r in results.values()]):.4f}  "
              f"acc_norm {np.mean([r['acc_norm'] for r in results.values()]):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
