"""``eval.py`` / ``monet-eval``: evaluate a checkpoint (ours or a Hugging Face directory).

    python eval.py perplexity runs/default/checkpoint [--data FILE_OR_DIR]
    python eval.py generate runs/default/checkpoint --prompt "def main(" [--temperature 0.8 --top-p 0.95] [--stream 8]
    python eval.py tasks runs/default/checkpoint arc_easy.jsonl piqa.jsonl [--shots 5] [--tokenizer PATH]
    python eval.py experts tokens runs/default/checkpoint --text "def main():"
    python eval.py experts stats runs/default/checkpoint [--data corpus.jsonl] --out runs/default/stats
    python eval.py experts view runs/default/checkpoint --expert 0:37 --text "..." --out expert.html [--png P]
    python eval.py experts atlas runs/default/checkpoint [--data corpus.jsonl] --out atlas/   # a static site
    python eval.py experts select-domain runs/default/checkpoint --domain code=a.jsonl --domain prose=b.txt --out m/
    python eval.py experts select-correlated runs/default/checkpoint --data scored.jsonl --score-key tox --out m.json
    python eval.py perplexity runs/default/checkpoint --mask m/code.json     # any subcommand: --mask FILE
    python eval.py perplexity CK --distributed     # on every host: each process scores its share, one result

Text is tokenized with the checkpoint's own tokenizer (tokenizer.json / tokenizer.model beside its config.json,
as transformers finds it) unless --tokenizer says otherwise; every command prints one line naming it first.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import jax
import numpy as np

from monet_jax import distributed as dist
from monet_jax.config import DTYPES, ConfigError
from monet_jax.convert.readers import ConvertError
from monet_jax.eval import experts_cli
from monet_jax.eval.experts_cli import TOKENIZER_HELP


def _parents():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("checkpoint", help="our checkpoint directory or a Hugging Face model directory")
    common.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    common.add_argument("--mask", default=None, help="expert mask file: run with those composed experts deleted")
    common.add_argument("--dtype", choices=DTYPES, default=None,
                        help="parameters and computation (default: float32 on a CPU, bfloat16 on TPU and GPU, "
                             "whatever dtype the checkpoint stores)")
    dist.add_launch_args(common)
    corpus = argparse.ArgumentParser(add_help=False)
    corpus.add_argument("--seq-len", type=int, default=128, help="tokens per window (one document per window)")
    corpus.add_argument("--batch-size", type=int, default=8)
    corpus.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens of the corpus")
    return common, corpus


def main(argv: list[str] | None = None) -> int:
    """``eval.py`` / ``monet-eval``: the evaluation commands (``perplexity``, ``tasks``, ``generate``,
    ``experts ...``) on our checkpoint or a Hugging Face directory, read with its own tokenizer.

    Args:
        argv: The command line without the program name (``None``: ``sys.argv[1:]``), e.g.
            ``["perplexity", "runs/default/checkpoint"]``.

    Returns:
        The exit status, 0 or 2 for a bad checkpoint, tokenizer, mask, corpus or argument, after one line
            on stderr.
    """
    args = parser().parse_args(argv)
    handler = {"perplexity": _perplexity, "tasks": _tasks, "generate": _generate}.get(args.command)
    return _run(args, handler)


def parser() -> argparse.ArgumentParser:
    """Every command's arguments (one parser, so a test can read their defaults)."""
    p = argparse.ArgumentParser(prog="monet-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common, corpus = _parents()
    sub = p.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser("perplexity", parents=[common, corpus], help="loss and perplexity over a local corpus")
    ppl.add_argument("--data", default=None, help="text file, directory, glob, JSONL, Parquet or ArrayRecord "
                                                  "(default: the embedded corpus's held-out documents)")
    ppl.add_argument("--format", default="auto")
    ppl.add_argument("--text-key", default="text")
    ppl.add_argument("--max-batches", type=int, default=None)
    tsk = sub.add_parser("tasks", parents=[common], help="multiple choice by log-likelihood on local JSONL files")
    tsk.add_argument("files", nargs="+", help="JSONL: {\"context\": ..., \"choices\": [...], \"answer\": i}")
    tsk.add_argument("--shots", type=int, default=0)
    tsk.add_argument("--fewshot-file", default=None, help="examples for the shots (default: the same file)")
    tsk.add_argument("--batch-size", type=int, default=8)
    gen = sub.add_parser("generate", parents=[common], help="continue prompts (KV cache; greedy, top-k, top-p)")
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    gen.add_argument("--chat", action="store_true",
                     help="send each prompt as a user message, rendered with the checkpoint's chat_template")
    gen.add_argument("--system", default=None, help="with --chat: a system message before the user's")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to add per prompt (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    gen.add_argument("--top-k", type=int, default=0,
                     help="sample among the k likeliest tokens; 0 = all (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = all (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    gen.add_argument("--stream", type=int, default=0, metavar="N",
                     help="print a single prompt's text as it is generated, N tokens per device call; 0 = at the end "
                          "(default: %(default)s)")
    exp = sub.add_parser("experts", help="expert microscope and scalpel")
    experts_cli.add_parsers(exp.add_subparsers(dest="experts_command", required=True), common, corpus)
    return p


def _run(args, handler) -> int:
    try:
        if args.command == "experts" and args.experts_command == "serve":  # loads its model in the background
            return experts_cli.serve(args)
        if dist.launch(args) and args.command not in ("perplexity", "tasks"):
            raise ValueError("--distributed splits the work of perplexity and tasks; run the other commands in "
                             "one process")
        model, tokenizer = model_and_tokenizer(args)
        if handler is not None:
            return handler(args, model, tokenizer)
        return experts_cli.run(args, model, tokenizer)
    except (ConfigError, ConvertError, ValueError, OSError, dist.DistributedError) as e:
        print(f"monet-eval: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if jax.process_count() == 1:
            raise
        dist.abandon("monet-eval", e)


def _share(items: list) -> list:
    """This process's share of ``items`` (every n-th, from its index); all of them in a single process."""
    return items[jax.process_index()::jax.process_count()]


def _perplexity(args, model, tokenizer) -> int:
    from monet_jax.eval.corpus import perplexity

    multi = jax.process_count() > 1
    if multi and (args.max_tokens is not None or args.max_batches is not None):
        raise ValueError("--max-tokens and --max-batches cut the corpus in order: not with --distributed")
    docs = _share(experts_cli.read_corpus(args.data, args.format, args.text_key) if args.data
                  else held_out_documents())
    start = time.perf_counter()
    r = {"loss": 0.0, "tokens": 0}  # each document is scored on its own: the shares' sums add up
    if docs:
        r = perplexity(model, tokenizer, docs, seq_len=args.seq_len, batch_size=args.batch_size,
                       max_tokens=args.max_tokens, max_batches=args.max_batches, progress=not multi)
    nll, tokens = dist.sum_over_processes([r["loss"] * r["tokens"], r["tokens"]])
    if tokens == 0:
        raise ValueError("no tokens to evaluate")
    if jax.process_index() == 0:
        loss = nll / tokens
        print(f"loss {loss:.4f}  ppl {math.exp(loss):.3f}  tokens {int(tokens):,}  "
              f"({time.perf_counter() - start:.1f}s)")
    return 0


def held_out_documents() -> list:
    """The embedded corpus's validation documents: those the default training run (its seed and
    ``val_fraction``) held out, so its perplexity is never measured on training text."""
    from monet_jax.data.pipeline import document_keys, split_indices
    from monet_jax.data.sources import open_documents
    from monet_jax.train.config import TrainConfig

    cfg = TrainConfig()
    src = open_documents(None, "auto", "text")
    held = split_indices(len(src), cfg.data.val_fraction, cfg.seed, document_keys(None))["validation"]
    return [src[int(i)] for i in held]


def model_and_tokenizer(args):
    """The checkpoint's model (with ``args.mask`` applied) and its tokenizer, as every eval command reads them."""
    from monet_jax import MonetForCausalLM
    from monet_jax.convert.hf import read_config
    from monet_jax.data.tokenizer_files import tokenizer_for_checkpoint
    from monet_jax.experts.mask import load_mask

    vocab = read_config(args.checkpoint).vocab_size
    tokenizer = tokenizer_for_checkpoint(args.checkpoint, args.tokenizer, vocab_size=vocab)  # before any compute
    if getattr(args, "chat", False) and not tokenizer.chat_template:
        raise ValueError(f"--chat: the tokenizer {tokenizer.describe()} has no chat_template (tokenizer_config.json "
                         "or chat_template.jinja): not a chat model")
    if jax.process_index() == 0:
        print(f"tokenizer: {tokenizer.source}", flush=True)
    model = MonetForCausalLM.from_pretrained(args.checkpoint, dtype=args.dtype)
    return load_mask(model, args.mask), tokenizer


def _generate(args, model, tokenizer) -> int:
    from monet_jax.eval.generate import Sampling, generate

    if args.stream and len(args.prompt) > 1:
        raise ValueError("--stream prints one prompt's text as it comes: give a single --prompt")
    from monet_jax.data.chat import chat_ids, chat_messages, prompt_ids

    if args.system and not args.chat:
        raise ValueError("--system is a chat message: add --chat")
    # Chat: the reply alone is printed after each prompt; otherwise the prompt and its continuation.
    prompts = [chat_ids(tokenizer, chat_messages(p, args.system)) if args.chat else prompt_ids(tokenizer, p)
               for p in args.prompt]
    shown = ["" if args.chat else p for p in args.prompt]
    stops = set(tokenizer.eos_ids)  # generation_config.json may list several
    printed = [""]

    def show(tokens_bn, final: bool = False):
        """Print the text new since the last chunk; all tokens so far are decoded, and an unfinished
        character (a replacement mark at the end) waits for the next chunk."""
        ids = list(tokens_bn[0])
        end = next((k for k, t in enumerate(ids) if t in stops), None)
        text = tokenizer.decode(ids if end is None else ids[:end + 1])
        text = text if final else text.rstrip("\ufffd")
        print(text[len(printed[0]):], end="", flush=True)
        printed[0] = text

    if args.stream:
        print(f"--- prompt 1: {args.prompt[0]!r}\n{shown[0]}", end="", flush=True)
    res = generate(model, prompts, max_new_tokens=args.max_new_tokens, eos_id=tokenizer.eos_ids,
                   pad_id=tokenizer.pad_id, seed=args.seed, sampling=Sampling(args.temperature, args.top_k, args.top_p),
                   chunk=args.stream or None, on_tokens=show if args.stream else None)
    if args.stream:
        show([res["tokens"][0]], final=True)
        print()
    else:
        for i, (prompt, start, new) in enumerate(zip(args.prompt, shown, res["tokens"], strict=True), 1):
            print(f"--- prompt {i}: {prompt!r}")
            print(start + tokenizer.decode(new))
    rate = res["decode_tokens_per_second"]
    print(f"prefill {res['prefill_seconds']:.2f}s (with compile); decode "
          + (f"{rate:,.1f} tokens/s" if rate else "n/a tokens/s") + f" at batch {len(prompts)}")
    return 0


def _tasks(args, model, tokenizer) -> int:
    from monet_jax.eval import tasks

    pool = tasks.read_examples(args.fewshot_file) if args.fewshot_file else None
    results = {}
    for path in args.files:
        examples = tasks.read_examples(path)
        share = _share(examples)  # shots still come from the whole file (or pool), as in one process
        r = (tasks.evaluate(model, tokenizer, share, shots=args.shots, shot_pool=pool or examples,
                            batch_size=args.batch_size, progress=jax.process_count() == 1)
             if share else {"acc": 0.0, "acc_norm": 0.0, "examples": 0})
        correct, correct_norm, n = dist.sum_over_processes(
            [r["acc"] * r["examples"], r["acc_norm"] * r["examples"], r["examples"]])
        results[path] = {"acc": correct / n, "acc_norm": correct_norm / n, "examples": int(n), "shots": args.shots}
    if jax.process_index() != 0:
        return 0
    for path, r in results.items():
        print(f"{path}: acc {r['acc']:.4f}  acc_norm {r['acc_norm']:.4f}  ({r['examples']} examples, "
              f"{r['shots']}-shot)")
    if len(results) > 1:
        print(f"average: acc {np.mean([r['acc'] for r in results.values()]):.4f}  "
              f"acc_norm {np.mean([r['acc_norm'] for r in results.values()]):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
