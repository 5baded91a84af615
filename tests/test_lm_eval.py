"""The lm-evaluation-harness adapter (monet_jax/eval/harness.py) on a local task, offline, against plain forwards."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from monet_jax import MonetForCausalLM
from monet_jax.config import MonetConfig
from monet_jax.data.tokenizer import load_tokenizer

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before lm_eval imports datasets: local JSON only, never the Hub
os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from monet_jax.eval.harness import MonetLM  # noqa: E402

MAX_LEN = 32
EXAMPLES = [
    {"context": "Q: what is 2+2?\nA:", "choices": ["4", "five", "x"], "answer": 0},
    {"context": "The sky is", "choices": ["blue", "green"], "answer": 0},
    {"context": "import numpy as", "choices": ["np", "q#"], "answer": 0},
    {"context": "def f(x):\n    return", "choices": ["x", "None", ")("], "answer": 1},
    {"context": "", "choices": ["hello", "zz"], "answer": 1},
    {"context": "for i in", "choices": ["range(n):", "]]"], "answer": 0},
]
TASK_YAML = """task: monet_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random byte-level Monet-VD (short positions, so documents need several windows) and a local task."""
    root = tmp_path_factory.mktemp("lm_eval")
    cfg = MonetConfig(vocab_size=259, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=MAX_LEN, moe_dim=4, moe_heads=2, moe_experts=8, moe_topk=2,
                      moe_groups=2, torch_dtype="float32")
    model = MonetForCausalLM(cfg, rngs=nnx.Rngs(1))
    model.save_checkpoint(root / "ckpt")
    data = root / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in EXAMPLES))
    (root / "tasks").mkdir()
    (root / "tasks" / "toy.yaml").write_text(TASK_YAML.format(data=data, cache=root / "hf_cache"))
    return root, MonetForCausalLM.from_pretrained(root / "ckpt"), load_tokenizer("byte")


def logprobs(model, ids) -> np.ndarray:
    """``[len(ids), V]`` float64 log-softmax of one sequence's forward pass. The row is filled up to MAX_LEN
    only so every call has one shape (eager JAX compiles each new shape); causal attention keeps the
    positions before the filler exact."""
    assert len(ids) <= MAX_LEN
    row = np.full((1, MAX_LEN), 7, np.int32)
    row[0, :len(ids)] = ids
    logits = np.asarray(model(row).logits, np.float64)[0, :len(ids)]
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def reference_choice_scores(model, tok, example) -> list[float]:
    scores = []
    for choice in example["choices"]:
        ctx = [tok.bos_id, *map(int, tok.encode(example["context"]))]
        cont = [int(t) for t in tok.encode(" " + choice)]
        lp = logprobs(model, (ctx + cont)[:-1])
        scores.append(sum(lp[len(ctx) - 1 + k, t] for k, t in enumerate(cont)))
    return scores


def test_multiple_choice_acc_equals_plain_forward(setup):
    root, model, tok = setup
    out = simple_evaluate(model="monet_jax", model_args=f"pretrained={root / 'ckpt'},batch_size=4",
                          tasks=["monet_toy_mc"], task_manager=TaskManager(include_path=str(root / "tasks")),
                          log_samples=True)
    want = [reference_choice_scores(model, tok, ex) for ex in EXAMPLES]
    samples = sorted(out["samples"]["monet_toy_mc"], key=lambda s: s["doc_id"])
    for sample, scores in zip(samples, want, strict=True):  # every choice's score, not only the winner
        np.testing.assert_allclose([r[0][0] for r in sample["resps"]], scores, rtol=1e-5, atol=1e-4)
    acc = np.mean([int(np.argmax(s)) == ex["answer"] for s, ex in zip(want, EXAMPLES, strict=True)])
    assert out["results"]["monet_toy_mc"]["acc,none"] == pytest.approx(acc)


def test_loglikelihood_is_greedy_and_rolling_windows(setup):
    root, model, tok = setup
    lm = MonetLM(pretrained=str(root / "ckpt"), batch_size=2)
    # A greedy printable-ASCII continuation (one byte token per character) is flagged greedy, and its score
    # is the plain forward's; the same text with its last character changed is not greedy.
    for context in ("abc", "The ", "x = ", "def ", "1, 2, "):
        ctx, new = [tok.bos_id, *map(int, tok.encode(context))], []
        while len(new) < 3 and 3 + 32 <= (t := int(np.argmax(logprobs(model, ctx + new)[-1]))) < 3 + 127:
            new.append(t)
        if new:
            break
    assert new, "no context with a printable greedy continuation"
    text = tok.decode(new)
    other = text[:-1] + ("a" if text[-1] != "a" else "b")
    lp = logprobs(model, ctx + new[:-1])
    want = [sum(lp[len(ctx) - 1 + k, int(t)] for k, t in enumerate(tok.encode(c))) for c in (text, other)]
    res = lm.loglikelihood([Instance("loglikelihood", {}, (context, c), i) for i, c in enumerate((text, other))])
    assert [g for _, g in res] == [True, False]
    np.testing.assert_allclose([s for s, _ in res], want, rtol=1e-5, atol=1e-4)

    short = "def main():\n    pass"  # fits one window: the sum of per-token log-probs after bos
    ids = [int(t) for t in tok.encode(short)]
    lp = logprobs(model, [tok.bos_id, *ids[:-1]])
    want_short = sum(lp[k, t] for k, t in enumerate(ids))
    # Longer than MAX_LEN: the first MAX_LEN tokens after bos, then each next chunk of up to MAX_LEN tokens
    # given the MAX_LEN tokens before its last one (lm-eval's rolling windows).
    long = "The quick brown fox jumps over the lazy dog; " * 2 + "and then it sleeps."
    ids_l = [int(t) for t in tok.encode(long)]
    want_long = sum(logprobs(model, [tok.bos_id, *ids_l[:MAX_LEN - 1]])[k, t] for k, t in enumerate(ids_l[:MAX_LEN]))
    for start in range(MAX_LEN, len(ids_l), MAX_LEN):
        end = min(start + MAX_LEN, len(ids_l))
        window = ids_l[end - MAX_LEN - 1:end - 1]
        lp = logprobs(model, window)
        want_long += sum(lp[len(window) - (end - start) + k, t] for k, t in enumerate(ids_l[start:end]))
    assert len(ids_l) > 2 * MAX_LEN
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d,), i)
                                    for i, d in enumerate([short, long])])
    np.testing.assert_allclose(got, [want_short, want_long], rtol=1e-5, atol=1e-4)


def greedy_reference(model, tok, prompt: str, steps: int) -> list[int]:
    """Greedy tokens by a full forward pass over the whole sequence at every step (no cache)."""
    ids, new = [tok.bos_id, *map(int, tok.encode(prompt))], []
    for _ in range(steps):
        t = int(np.argmax(logprobs(model, ids + new)[-1]))
        new.append(t)
        if t == tok.eos_id:
            break
    return new


def test_generate_until_is_greedy_and_stops_at_the_stop_string(setup):
    root, model, tok = setup
    lm = MonetLM(pretrained=str(root / "ckpt"), batch_size=2)
    prompts = ["Once upon a time", "x = "]
    refs = [tok.decode(greedy_reference(model, tok, p, 6)) for p in prompts]
    assert all(len(r) >= 3 for r in refs), refs
    stops = [r[2] for r in refs]  # a character the greedy text reaches
    got = lm.generate_until([Instance("generate_until", {}, (p, {"until": [s, "never"], "max_gen_toks": 6}), i)
                             for i, (p, s) in enumerate(zip(prompts, stops, strict=True))]
                            + [Instance("generate_until", {}, (prompts[0], {"until": [], "max_gen_toks": 6}), 2)])
    assert got == [refs[0][:refs[0].index(stops[0])], refs[1][:refs[1].index(stops[1])], refs[0]]
    assert all(len(g) <= 2 for g in got[:2])


def test_model_args_errors(setup):
    root, _, _ = setup
    with pytest.raises(ValueError, match="expert mask file not found: .*missing.json"):
        MonetLM.create_from_arg_string(f"pretrained={root / 'ckpt'},mask={root / 'missing.json'}")
    with pytest.raises(ValueError, match="unknown model_args"):
        MonetLM.create_from_arg_string(f"pretrained={root / 'ckpt'},temperature=1")
    # model_args' batch_size wins over the CLI's --batch_size instead of colliding with it.
    lm = MonetLM.create_from_arg_string(f"pretrained={root / 'ckpt'},batch_size=3", {"batch_size": 1, "device": "x"})
    assert lm.batch_size == 3


def test_command_line(setup):
    root, model, tok = setup
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "monet_jax.eval.harness", "--model", "monet_jax", "--model_args",
           f"pretrained={root / 'ckpt'},batch_size=8", "--tasks", "monet_toy_mc", "--include_path", str(root / "tasks")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("|monet_toy_mc"))
    cells = [c.strip() for c in row.split("|")]
    want = [reference_choice_scores(model, tok, ex) for ex in EXAMPLES]
    acc = np.mean([int(np.argmax(s)) == ex["answer"] for s, ex in zip(want, EXAMPLES, strict=True)])
    assert cells[5] == "acc" and float(cells[7]) == pytest.approx(acc, abs=1e-4)


def test_mask_model_arg_deletes_experts(setup):
    """``mask=`` gives the log-likelihoods of the model with those experts deleted."""
    from monet_jax.experts.mask import ExpertMask, apply_mask

    root, _, tok = setup
    ExpertMask(8, [np.arange(0, 64, 3)]).save(root / "mask.json")  # 2 layers, moe_groups 2: one group
    masked_lm = MonetLM.create_from_arg_string(f"pretrained={root / 'ckpt'},mask={root / 'mask.json'}")
    plain_lm = MonetLM.create_from_arg_string(f"pretrained={root / 'ckpt'}")
    req = [Instance("loglikelihood", {}, ("The cat", " sat"), 0)]
    masked, plain = masked_lm.loglikelihood(req)[0][0], plain_lm.loglikelihood(req)[0][0]
    reference = apply_mask(MonetForCausalLM.from_pretrained(root / "ckpt"), ExpertMask.load(root / "mask.json"))
    ctx = [tok.bos_id, *map(int, tok.encode("The cat"))]
    cont = [int(t) for t in tok.encode(" sat")]
    lp = logprobs(reference, (ctx + cont)[:-1])
    np.testing.assert_allclose(masked, sum(lp[len(ctx) - 1 + k, t] for k, t in enumerate(cont)), rtol=1e-5)
    assert abs(masked - plain) > 1e-4
