"""A published checkpoint's whole pipeline at the published size, step by step: time and peak memory of each.

    python benchmarks/published_size_pipeline.py --tokenizer /tmp/tokenizer.model [--work /tmp/pipeline] \\
        [--reference-code /tmp/modeling_monet.py --reference-path /tmp/tfenv] [--config configs/monet-vd-1.4b.yaml]

What a user with a published model directory does, on random weights (no download): the model of
``--config`` with random bfloat16 weights (routers' BatchNorm running variance set to their logits'
variance, so about ``moe_topk`` experts pass per head as in a trained model), written in the Hugging Face
layout (sharded safetensors) by ``save_pretrained``, the tokenizer beside it; then ``monet-convert
hf-to-jax``, ``eval.py perplexity``, ``eval.py generate`` at batch 1 from the HF directory and from the
converted checkpoint (the same command), ``experts select-domain`` over MMLU-style domains at two corpus
sizes (peak memory must not grow with the corpus), ``tasks`` without and with each domain's mask,
``experts select-correlated`` and ``experts atlas``. With ``--reference-code`` (a local copy of upstream's
``modeling_monet.py``, with ``transformers`` 4.46 importable, e.g. ``PYTHONPATH=/tmp/tfenv``), upstream
PyTorch's forward and greedy ``generate`` on the same weights beside ours (float32 both, the same ids).

Every step is its own process, so its wall time includes loading the model and compiling, and its peak
resident memory (``os.wait4``'s ``ru_maxrss``) is that step's alone. The domains' text is generated here
from per-domain word lists (seeded), so every run sees the same corpus. Prints a Markdown table and writes
``results.json`` in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EVAL = str(ROOT / "eval.py")
PROMPT = "The key to life is"

# MMLU subjects and words that belong to them; the shared words make sentences of either.
DOMAINS = {
    "biology": "cell protein enzyme membrane gene chromosome mitochondria photosynthesis ribosome organism species "
               "evolution mutation tissue neuron hormone bacteria virus nucleus metabolism".split(),
    "history": "empire dynasty revolution treaty monarchy war colony parliament republic crusade pharaoh senate "
               "medieval century battle king queen constitution rebellion archive".split(),
    "chemistry": "molecule atom reaction acid base electron bond catalyst solution oxidation ion compound "
                 "element isotope polymer solvent equilibrium titration molar enthalpy".split(),
    "economics": "market price inflation demand supply tax trade interest bank currency labor capital profit "
                 "tariff budget debt recession monopoly wage investment".split(),
}
SHARED = "the a of in is was by and which with for that this from to its".split()


def sentence(rng, words: list[str]) -> str:
    pick = lambda k: [words[i] for i in rng.integers(0, len(words), k)]
    w, s = pick(4), [SHARED[i] for i in rng.integers(0, len(SHARED), 4)]
    return f"{s[0].capitalize()} {w[0]} {s[1]} {w[1]} {s[2]} {w[2]} {s[3]} {w[3]}."


def write_domain_data(out: Path, names: list[str], *, docs: int, examples: int, seed: int = 0) -> dict:
    """Per domain a corpus JSONL (``{"text"}``) and an MMLU-format task JSONL (the prompt of
    ``tools/tasks_to_jsonl.py mmlu``, choices `` A``..`` D``); a scored JSONL for select-correlated (score 1
    on the first domain's documents, 0 elsewhere) and a mixed text for perplexity."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    files = {"corpus": {}, "tasks": {}}
    scored, mixed = [], []
    for d, name in enumerate(names):
        words = DOMAINS[name]
        rows = [" ".join(sentence(rng, words) for _ in range(8)) for _ in range(docs)]
        (out / f"{name}.corpus.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
        files["corpus"][name] = str(out / f"{name}.corpus.jsonl")
        scored += [{"text": r, "score": float(d == 0)} for r in rows[:max(2, docs // 4)]]
        mixed += rows[:2]
        lines = []
        for _ in range(examples):
            options = [w for w in rng.choice(words, 4, replace=False)]
            question = sentence(rng, words)[:-1] + "? Which term fits?"
            body = "\n".join(f"{letter}. {o}" for letter, o in zip("ABCD", options, strict=True))
            context = (f"The following are multiple choice questions (with answers) about {name}.\n\n"
                       f"{question}\n{body}\nAnswer:")
            lines.append({"context": context, "choices": [" A", " B", " C", " D"], "answer": int(rng.integers(4))})
        (out / f"{name}.tasks.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        files["tasks"][name] = str(out / f"{name}.tasks.jsonl")
    (out / "scored.jsonl").write_text("".join(json.dumps(x) + "\n" for x in scored))
    (out / "text.txt").write_text("\n\n".join(mixed) + "\n")
    files["scored"], files["text"] = str(out / "scored.jsonl"), str(out / "text.txt")
    return files


# -- steps run in their own process (``python THIS _write|_jax|_torch ...``) ----------------------------------------

def _write(config: str, out: str, tokenizer: str, overrides: str = "") -> None:
    """Random weights in the published dtype and layout, with the tokenizer beside them."""
    from flax import nnx

    from monet_jax import MonetForCausalLM
    from monet_jax.config import MonetConfig

    cfg = MonetConfig.from_yaml(config, ["param_dtype=bfloat16", "compute_dtype=bfloat16", "torch_dtype=bfloat16",
                                         *filter(None, overrides.split(","))])
    model = MonetForCausalLM(cfg, rngs=nnx.Rngs(0))
    for layer in model.model.layers:  # RMS-normalized inputs times N(0, std^2) weights: logits of variance d std^2
        if layer.router is not None:
            for norm in (layer.router.norm1, layer.router.norm2):
                norm.running_var[...] = norm.running_var[...] * cfg.hidden_size * cfg.initializer_range**2
    model.save_pretrained(out, max_shard_size="1GB")
    if tokenizer != "byte":
        shutil.copy(tokenizer, Path(out) / Path(tokenizer).name)


def _prompt_ids(tokenizer: str) -> list[int]:
    from monet_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    return [tok.bos_id, *map(int, tok.encode(PROMPT))]


def _forward_ids(vocab: int, tokens: int) -> np.ndarray:
    return np.random.default_rng(1).integers(3, vocab, (1, tokens)).astype(np.int32)


def _jax(checkpoint: str, tokenizer: str, new: int, tokens: int, reps: int, out: str) -> None:
    """Our forward pass (after compiling; best of ``reps``) and greedy decoding at batch 1, float32."""
    import jax

    from monet_jax import MonetForCausalLM
    from monet_jax.eval.generate import generate
    from monet_jax.model.pure import PureModel

    model = MonetForCausalLM.from_pretrained(checkpoint)
    ids = _forward_ids(model.config.vocab_size, tokens)
    fwd = PureModel(model).jit(lambda m, x: m(x).logits)
    jax.block_until_ready(fwd(ids))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(ids))
        best = min(best, time.perf_counter() - t0)
    generate(model, [_prompt_ids(tokenizer)], max_new_tokens=new, eos_id=None)  # compile
    res = generate(model, [_prompt_ids(tokenizer)], max_new_tokens=new, eos_id=None)
    Path(out).write_text(json.dumps({"forward_s": best, "tokens": [int(t) for t in res["tokens"][0]],
                                     "decode_tokens_per_s": res["decode_tokens_per_second"],
                                     "prefill_s": res["prefill_seconds"], "dtype": model.config.compute_dtype}))


def _torch(code: str, checkpoint: str, tokenizer: str, new: int, tokens: int, reps: int, out: str) -> None:
    """Upstream's PyTorch model on the HF directory (float32): forward (best of ``reps``) and greedy ``generate``."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("modeling_monet", code)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    ref = module.MonetForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None  # every requested token, as ours with eos_id=None
    x = torch.from_numpy(_forward_ids(ref.config.vocab_size, tokens).astype(np.int64))
    with torch.inference_mode():
        ref(x, use_cache=False)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            ref(x, use_cache=False)
            best = min(best, time.perf_counter() - t0)
        p = torch.tensor([_prompt_ids(tokenizer)])
        kw = dict(attention_mask=torch.ones_like(p), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                  use_cache=True, pad_token_id=0)
        ref.generate(p, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        t0 = time.perf_counter()
        got = ref.generate(p, **kw)
        took = time.perf_counter() - t0
    Path(out).write_text(json.dumps({"forward_s": best, "tokens": got[0, p.shape[1]:].tolist(),
                                     "generate_tokens_per_s": new / took, "dtype": "float32"}))


# -- the driver ------------------------------------------------------------------------------------------------------

def run_step(name: str, cmd: list[str], log_dir: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` as a child process; its wall time, its own peak RSS (``wait4``) and its output."""
    log = log_dir / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    text = log.read_text()
    step = {"step": name, "seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            "rc": proc.returncode, "log": str(log), "command": " ".join(cmd)}
    print(f"{name}: {seconds:.1f}s, peak RSS {step['peak_rss_gib']:.2f} GiB, rc {proc.returncode}", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"step {name} failed (rc {proc.returncode}); see {log}:\n{text[-3000:]}")
    progress = re.compile(r"^\s*\S*:?\s*\d+%\|")  # tqdm bars
    step["output"] = "\n".join(line for line in text.splitlines()[1:] if not progress.match(line))[-2000:]
    return step


def figure(pattern: str, text: str, cast=float):
    m = re.search(pattern, text)
    return cast(m.group(1).replace(",", "")) if m else None


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] in ("_write", "_jax", "_torch"):
        fn = {"_write": _write, "_jax": _jax, "_torch": _torch}[sys.argv[1]]
        args = [int(a) if a.isdigit() else a for a in sys.argv[2:]]
        fn(*args)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "monet-vd-1.4b.yaml"))
    p.add_argument("--work", default="/tmp/pipeline", help="scratch directory (replaced)")
    p.add_argument("--tokenizer", default="byte", help="a tokenizer.model / tokenizer.json, or byte")
    p.add_argument("--set", default="", metavar="KEY=VALUE,...", help="config overrides (e.g. vocab_size=259)")
    p.add_argument("--reference-code", default=None, help="local copy of upstream's modeling_monet.py")
    p.add_argument("--reference-path", default=None,
                   help="prepended to PYTHONPATH for upstream's step only (where transformers 4.46 is installed)")
    p.add_argument("--domains", default="biology,history,chemistry", help=f"of {', '.join(DOMAINS)}")
    p.add_argument("--domain-tokens", type=int, default=1000,
                   help="tokens per domain for select-domain; it runs again with 4x as many")
    p.add_argument("--examples", type=int, default=5, help="task examples per domain")
    p.add_argument("--corpus-tokens", type=int, default=2000, help="tokens for select-correlated and the atlas")
    p.add_argument("--ppl-tokens", type=int, default=1000)
    p.add_argument("--new-tokens", type=int, default=32, help="generated at batch 1")
    p.add_argument("--forward-tokens", type=int, default=128, help="the forward pass timed against upstream")
    p.add_argument("--atlas-experts", type=int, default=1024, help="experts kept per group by the atlas")
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args(argv)

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    hf_dir, ours = work / "hf", work / "ours"
    names = args.domains.split(",")
    docs = max(4, args.domain_tokens * 4 // 60)  # a document is about 100 tokens of the 32k vocabulary
    data = write_domain_data(work / "data", names, docs=docs, examples=args.examples)
    tok = str(Path(args.tokenizer).resolve()) if args.tokenizer != "byte" else "byte"
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    py, me, logs = sys.executable, str(Path(__file__).resolve()), work / "logs"
    common = ["--tokenizer", tok]
    steps = []

    def step(name, cmd, **kw):
        steps.append(run_step(name, cmd, logs, **kw))
        return steps[-1]

    step("write HF dir (random bf16)", [py, me, "_write", args.config, str(hf_dir), tok, args.set], env=env)
    step("convert hf-to-jax", [py, "-m", "monet_jax.convert.cli", "hf-to-jax", str(hf_dir), str(ours)], env=env)
    step("perplexity", [py, EVAL, "perplexity", str(ours), "--data", data["text"], "--max-tokens",
                        str(args.ppl_tokens), *common], env=env)
    for label, src in (("HF dir", hf_dir), ("converted", ours)):
        step(f"generate b1 ({label})", [py, EVAL, "generate", str(src), "--prompt", PROMPT, "--max-new-tokens",
                                        str(args.new_tokens), *common], env=env)
    domain_args = [a for n in names for a in ("--domain", f"{n}={data['corpus'][n]}")]
    for mult in (1, 4):
        step(f"select-domain {mult}x", [py, EVAL, "experts", "select-domain", str(ours), *domain_args, "--out",
                                        str(work / f"masks{mult}"), "--max-tokens", str(args.domain_tokens * mult),
                                        *common], env=env)
    task_files = [data["tasks"][n] for n in names]
    step("tasks (no mask)", [py, EVAL, "tasks", str(ours), *task_files, *common], env=env)
    for n in names:
        step(f"tasks --mask {n}", [py, EVAL, "tasks", str(ours), *task_files, "--mask",
                                   str(work / "masks4" / f"{n}.json"), *common], env=env)
    step("select-correlated", [py, EVAL, "experts", "select-correlated", str(ours), "--data", data["scored"],
                               "--threshold", "0.05", "--out", str(work / "correlated.json"), "--max-tokens",
                               str(args.corpus_tokens), *common], env=env)
    step("atlas", [py, EVAL, "experts", "atlas", str(ours), "--data", data["corpus"][names[0]], "--max-tokens",
                   str(args.corpus_tokens), "--experts", str(args.atlas_experts), "--out", str(work / "atlas"),
                   *common], env=env)
    ours_fwd = step("monet-jax forward + generate", [py, me, "_jax", str(ours), tok, str(args.new_tokens),
                                                     str(args.forward_tokens), str(args.reps), str(work / "jax.json")],
                    env=env)
    ours_fwd["result"] = json.loads((work / "jax.json").read_text())
    if args.reference_code:
        torch_env = dict(env)
        if args.reference_path:
            torch_env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.reference_path, env.get("PYTHONPATH")]))
        ref = step("upstream PyTorch forward + generate",
                   [py, me, "_torch", str(Path(args.reference_code).resolve()), str(hf_dir), tok,
                    str(args.new_tokens), str(args.forward_tokens), str(args.reps), str(work / "torch.json")],
                   env=torch_env)
        ref["result"] = json.loads((work / "torch.json").read_text())

    summary = summarize(steps, args)
    (work / "results.json").write_text(json.dumps({"args": vars(args), "steps": steps, "summary": summary}, indent=1))
    print(table(steps))
    print(json.dumps(summary, indent=1))
    return 0


def summarize(steps: list[dict], args) -> dict:
    by = {s["step"]: s for s in steps}
    out = {"cpu_threads": os.cpu_count()}
    for label in ("HF dir", "converted"):
        text = by[f"generate b1 ({label})"]["output"]
        out[f"decode tokens/s ({label})"] = figure(r"decode ([\d.,]+) tokens/s", text)
        out[f"prefill s ({label})"] = figure(r"prefill ([\d.]+)s", text)
    small, large = by["select-domain 1x"], by["select-domain 4x"]
    out["select-domain peak RSS GiB (1x, 4x corpus)"] = [small["peak_rss_gib"], large["peak_rss_gib"]]
    jax_res = by["monet-jax forward + generate"]["result"]
    out["monet-jax forward s"] = round(jax_res["forward_s"], 3)
    out["monet-jax decode tokens/s"] = round(jax_res["decode_tokens_per_s"] or 0, 2)
    ref = by.get("upstream PyTorch forward + generate")
    if ref:
        r = ref["result"]
        out["upstream forward s"] = round(r["forward_s"], 3)
        out["upstream generate tokens/s"] = round(r["generate_tokens_per_s"], 2)
        out["forward speed ours/upstream"] = round(r["forward_s"] / jax_res["forward_s"], 2)
        same = sum(a == b for a, b in zip(jax_res["tokens"], r["tokens"], strict=False))
        out["greedy tokens agree"] = f"{same}/{len(r['tokens'])}"
    return out


def table(steps: list[dict]) -> str:
    lines = ["| step | wall s | peak RSS GiB | result |", "|---|---:|---:|---|"]
    for s in steps:
        last = [line.strip() for line in s["output"].splitlines() if line.strip()]
        result = "; ".join(last[-2:])[:160].replace("|", "/")
        lines.append(f"| {s['step']} | {s['seconds']:.1f} | {s['peak_rss_gib']:.2f} | {result} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
