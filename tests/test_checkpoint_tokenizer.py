"""A checkpoint's tokenizer travels with it: every command reads it without --tokenizer, train.py and
monet-convert write it, transformers' AutoTokenizer loads an exported directory, chat templates render as
transformers renders them, and the ways this can go wrong are one-line errors.

Expected values come from the tokenizer libraries themselves (sentencepiece, tokenizers, transformers) or
from plain forward passes, never from the code under test."""

import json
import random
import shutil

import numpy as np
import pytest
from flax import nnx

from monet_jax import MonetForCausalLM, tokenizer_for_checkpoint
from monet_jax.config import MonetConfig
from monet_jax.data.chat import chat_ids, chat_messages, prompt_ids, render_chat
from monet_jax.data.tokenizer import load_tokenizer
from monet_jax.eval.main import main as eval_main

WORDS = ("the model reads a short text and the experts of each layer score every token while a small dog "
         "runs after the red ball in the green park near the old river bank").split()
SP_VOCAB, TJ_VOCAB = 200, 300
CHATML = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
          "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Newlines after block tags and indentation before them vanish (trim_blocks, lstrip_blocks), as in transformers.
LLAMA2 = ("{{ bos_token }}{% for message in messages %}\n  {% if message['role'] == 'system' %}\n"
          "{{ '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}{% elif message['role'] == 'user' %}\n"
          "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}\n"
          "{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}\n{% endfor %}")


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(n)]


def tiny_model(vocab: int, seed: int = 0) -> MonetForCausalLM:
    cfg = MonetConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=64, moe_dim=4, moe_heads=2, moe_experts=8, moe_topk=2, moe_groups=2,
                      torch_dtype="float32")
    return MonetForCausalLM(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A LLaMA-style SentencePiece model and a byte-level BPE tokenizer.json (with a ChatML template and the
    ``<|im_start|>`` / ``<|im_end|>`` special tokens), both trained here on a small text."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("tok")
    text = sentences(400)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(root / "sp"), vocab_size=SP_VOCAB,
                                   model_type="bpe", minloglevel=2, pad_id=-1, unk_id=0, bos_id=1, eos_id=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    (root / "sp_src").mkdir()
    shutil.move(root / "sp.model", root / "sp_src" / "tokenizer.model")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=TJ_VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    (root / "tj_src").mkdir()
    tok.save(str(root / "tj_src" / "tokenizer.json"))
    (root / "tj_src" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": CHATML}))
    (root / "corpus.txt").write_text("\n\n".join(sentences(6, seed=1)) + "\n")
    ck = {}
    for name, src, vocab in (("sp", root / "sp_src", SP_VOCAB), ("tj", root / "tj_src", TJ_VOCAB)):
        tiny_model(vocab).save_checkpoint(root / f"ck_{name}", tokenizer=load_tokenizer(src))
        ck[name] = root / f"ck_{name}"
    for name, vocab in (("old", 259), ("big", 1000)):  # no tokenizer files, as train.py wrote checkpoints before
        tiny_model(vocab).save_checkpoint(root / f"ck_{name}")
        ck[name] = root / f"ck_{name}"
    return root, ck


def sp_ids(root, text: str) -> list[int]:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(root / "sp_src" / "tokenizer.model")).encode(text)


def tj_ids(root, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(root / "tj_src" / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def docs_of(root) -> list[str]:
    return [d for d in (root / "corpus.txt").read_text().split("\n\n") if d.strip()]  # as a text file is read


def first_line(out: str) -> str:
    return out.splitlines()[0]


@pytest.mark.parametrize("kind", ["sp", "tj"])
def test_perplexity_counts_the_checkpoint_tokenizers_tokens(files, kind, capsys):
    root, ck = files
    # text files split into documents at blank lines: one document per sentence here
    assert eval_main(["perplexity", str(ck[kind]), "--data", str(root / "corpus.txt"), "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    name, label = ("tokenizer.model", "SentencePiece") if kind == "sp" else ("tokenizer.json", "tokenizer.json")
    vocab = SP_VOCAB if kind == "sp" else TJ_VOCAB
    assert first_line(out) == f"tokenizer: {ck[kind] / name} ({label}, {vocab} ids), the checkpoint's"
    count = sp_ids if kind == "sp" else tj_ids
    want = sum(len(count(root, d)) for d in docs_of(root))
    assert int(out.split("tokens ")[1].split()[0].replace(",", "")) == want


def test_generate_stops_at_any_eos_of_generation_config(files, tmp_path, capsys):
    """The checkpoint's generation_config.json lists two eos ids: the greedy first token (found by a plain
    forward pass) is one of them, so generation ends after it."""
    root, ck = files
    ckpt = tmp_path / "ck"
    shutil.copytree(ck["sp"], ckpt)
    model = MonetForCausalLM.from_pretrained(ckpt)
    ids = [1, *sp_ids(root, "The model")]  # LLaMA SentencePiece: bos first
    first = int(np.argmax(np.asarray(model(np.array([ids], np.int32)).logits)[0, -1]))
    (ckpt / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, first]}))
    assert eval_main(["generate", str(ckpt), "--prompt", "The model", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"tokenizer: {ckpt / 'tokenizer.model'} (SentencePiece")
    import sentencepiece as spm

    piece = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model")).decode([first])
    assert out[1:3] == ["--- prompt 1: 'The model'", "The model" + piece]


def test_prompt_framing_follows_add_bos_token(files, tmp_path):
    root, _ = files
    shutil.copytree(root / "sp_src", tmp_path / "sp")
    assert prompt_ids(load_tokenizer(tmp_path / "sp"), "The dog") == [1, *sp_ids(root, "The dog")]
    (tmp_path / "sp" / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert prompt_ids(load_tokenizer(tmp_path / "sp"), "The dog") == sp_ids(root, "The dog")


def test_tasks_use_the_checkpoint_tokenizer(files, tmp_path, capsys):
    root, ck = files
    rows = [{"context": "The small dog runs after the", "choices": [" red ball", " old river"], "answer": 0},
            {"context": "The experts of each layer", "choices": [" score every token", " park"], "answer": 0}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert eval_main(["tasks", str(ck["tj"]), str(path)]) == 0
    default = capsys.readouterr().out.splitlines()
    assert default[0].startswith(f"tokenizer: {ck['tj'] / 'tokenizer.json'} (tokenizer.json, {TJ_VOCAB} ids)")
    assert eval_main(["tasks", str(ck["tj"]), str(path), "--tokenizer", str(root / "tj_src" / "tokenizer.json")]) == 0
    given = capsys.readouterr().out.splitlines()
    assert given[0].endswith(", as given") and given[1:] == default[1:]
    assert eval_main(["tasks", str(ck["tj"]), str(path), "--tokenizer", "byte"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "tokenizer: byte (259 ids), as given"


def test_atlas_indexes_the_checkpoint_tokenizers_tokens(files, tmp_path, capsys):
    root, ck = files
    assert eval_main(["experts", "atlas", str(ck["sp"]), "--data", str(root / "corpus.txt"), "--out",
                      str(tmp_path / "site"), "--experts", "4", "--contexts", "2", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"tokenizer: {ck['sp'] / 'tokenizer.model'} (SentencePiece")
    ids = [sp_ids(root, d) for d in docs_of(root)]
    distinct = len({t for doc in ids for t in doc})
    assert f"; {distinct:,} tokens indexed" in out[1]


def test_lm_eval_adapter_reads_the_checkpoint_tokenizer(files, capsys):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from monet_jax.eval.harness import MonetLM

    root, ck = files
    lm = MonetLM(pretrained=str(ck["sp"]), batch_size=2)
    assert capsys.readouterr().out.startswith(f"tokenizer: {ck['sp'] / 'tokenizer.model'} (SentencePiece")
    ctx, cont = [1, *sp_ids(root, "The small dog")], sp_ids(root, " runs")
    seq = np.array([ctx + cont[:-1]], np.int32)
    logits = np.asarray(MonetForCausalLM.from_pretrained(ck["sp"])(seq).logits, np.float64)[0]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = sum(logp[len(ctx) - 1 + k, t] for k, t in enumerate(cont))
    (got, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("The small dog", " runs"), 0)])
    assert got == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_byte_sized_checkpoint_without_files_says_it_reads_bytes(files, capsys):
    _, ck = files
    assert eval_main(["experts", "tokens", str(ck["old"]), "--text", "Hi"]) == 0
    line = first_line(capsys.readouterr().out)
    assert line.startswith(f"tokenizer: byte (259 ids): {ck['old']} has no tokenizer files")


def run_error(argv, capsys) -> str:
    assert eval_main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing ran: the error comes before the tokenizer line and any compute
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("monet-eval: error: "), captured.err
    return lines[0]


def test_error_cases_are_one_line(files, capsys):
    root, ck = files
    err = run_error(["perplexity", str(ck["big"]), "--max-batches", "1"], capsys)
    assert "has no tokenizer" in err and "pass --tokenizer PATH" in err
    err = run_error(["generate", str(ck["old"]), "--prompt", "x", "--tokenizer", str(root / "tj_src")], capsys)
    assert "has more ids than the model's embedding (259)" in err
    for kind in ("sp", "old"):  # neither holds a chat template
        assert "has no chat_template" in run_error(["generate", str(ck[kind]), "--prompt", "x", "--chat"], capsys)
    assert "checkpoint directory not found" in run_error(["perplexity", str(root / "nothing")], capsys)


@pytest.mark.parametrize("argv, message", [
    (["--model", "monet_jax", "--model_args", "pretrained=/nonexistent/ckpt", "--tasks", "arc_easy"],
     "monet-lm-eval: error: checkpoint directory not found: /nonexistent/ckpt"),
    (["--model", "monet_jax", "--model_args", "pretrained=CK", "--tasks", "no_such_task_anywhere"],
     "monet-lm-eval: error: Tasks not found: no_such_task_anywhere"),
])
def test_lm_eval_bad_inputs_are_one_line(files, argv, message, capsys):
    pytest.importorskip("lm_eval")
    from monet_jax.eval.harness import main

    _, ck = files
    argv = [a.replace("CK", str(ck["old"])) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line.lower()] == [message]


# --------------------------------------------------------------------------------------------------
# Written with the checkpoint, read by transformers


def test_train_writes_its_tokenizer_and_eval_needs_no_flag(files, tmp_path, capsys):
    from monet_jax.train.config import TrainConfig
    from monet_jax.train.main import run

    root, _ = files
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(sentences(60, seed=2)) + "\n")
    cfg = TrainConfig.load(None, [f"out_dir={tmp_path / 'run'}", "optim.steps=2", "optim.warmup_steps=1",
                                  f"data.path={data}", f"data.tokenizer={root / 'sp_src' / 'tokenizer.model'}",
                                  "data.batch_size=8", "data.seq_len=16", "eval_every=2", "eval_batches=1",
                                  f"model.vocab_size={SP_VOCAB}", "model.hidden_size=32", "model.num_hidden_layers=2",
                                  "model.num_attention_heads=2", "model.num_key_value_heads=2",
                                  "model.moe_experts=8", "model.moe_topk=2", "model.moe_heads=2", "model.moe_dim=4",
                                  "model.max_position_embeddings=32", "metrics.tensorboard=false"])
    run(cfg)
    ckpt = tmp_path / "run" / "checkpoint"
    assert (ckpt / "tokenizer.model").read_bytes() == (root / "sp_src" / "tokenizer.model").read_bytes()
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["add_bos_token"] is True
    assert (config["bos_token"], config["eos_token"]) == ("<s>", "</s>")
    assert json.loads((ckpt / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2,
                                                                        "pad_token_id": 2}
    capsys.readouterr()
    assert eval_main(["perplexity", str(ckpt), "--data", str(root / "corpus.txt"), "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    assert first_line(out) == f"tokenizer: {ckpt / 'tokenizer.model'} (SentencePiece, {SP_VOCAB} ids), the checkpoint's"
    assert int(out.split("tokens ")[1].split()[0].replace(",", "")) == sum(len(sp_ids(root, d)) for d in docs_of(root))


# Characters of the training text only: the SentencePiece model has no byte fallback (transformers' conversion
# drops unknown characters where sentencepiece gives <unk>).
TEXTS = ["the small dog runs after the red ball.", "every token near the old river bank", "a\nb c  d"]


@pytest.mark.parametrize("kind", ["sp", "tj"])
def test_exported_directory_loads_in_auto_tokenizer_with_the_same_ids(files, kind, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from monet_jax.convert.cli import main as convert_main

    root, ck = files
    assert convert_main(["jax-to-hf", str(ck[kind]), str(tmp_path / "hf")]) == 0
    hf = tmp_path / "hf"
    assert (hf / "generation_config.json").is_file() and (hf / "tokenizer_config.json").is_file()
    auto = transformers.AutoTokenizer.from_pretrained(str(hf))
    ids = sp_ids if kind == "sp" else tj_ids
    texts = TEXTS[:2] if kind == "sp" else TEXTS  # whitespace runs: transformers' SentencePiece conversion differs
    for text in texts:
        assert auto.encode(text, add_special_tokens=False) == ids(root, text)
        assert auto.encode(text) == [1, *ids(root, text)]  # bos first, as the model was trained
    assert (auto.bos_token_id, auto.eos_token_id) == (1, 2)
    # ...and back: hf-to-jax carries the files into our checkpoint, which every command reads
    assert convert_main(["hf-to-jax", str(hf), str(tmp_path / "back")]) == 0
    tok = tokenizer_for_checkpoint(tmp_path / "back")
    assert tok.source.endswith("the checkpoint's") and list(tok.encode(TEXTS[0])) == ids(root, TEXTS[0])


def test_byte_checkpoint_record_loads_in_auto_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    tiny_model(512).save_pretrained(tmp_path / "hf", tokenizer=load_tokenizer("byte"))
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["monet_tokenizer"] == "byte"
    assert type(tokenizer_for_checkpoint(tmp_path / "hf")).__name__ == "ByteTokenizer"
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in ["héllo wörld — 日本語 🎉", "  two  spaces\n\ttab"]:
        assert auto.encode(text) == [1] + [b + 3 for b in text.encode("utf-8")]
        assert auto.decode(auto.encode(text), skip_special_tokens=True) == text


# --------------------------------------------------------------------------------------------------
# Chat


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Héllo, who are you?"},
            {"role": "assistant", "content": "A model."}, {"role": "user", "content": "And the dog?"}]


def test_chat_rendering_matches_hand_written_text():
    specials = {"bos_token": "<s>", "eos_token": "</s>"}
    assert render_chat(CHATML, MESSAGES[1:2], specials) == (
        "<|im_start|>user\nHéllo, who are you?<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(LLAMA2, MESSAGES, specials, add_generation_prompt=False) == (
        "<s><<SYS>>\nYou are terse.\n<</SYS>>\n\n[INST] Héllo, who are you? [/INST] A model. </s>"
        "[INST] And the dog? [/INST]")
    with pytest.raises(ValueError, match="unknown role tool"):
        render_chat(CHATML, [{"role": "tool", "content": "x"}], specials)


@pytest.mark.parametrize("template", [CHATML, LLAMA2])
def test_chat_rendering_equals_transformers(files, template, tmp_path):
    transformers = pytest.importorskip("transformers")
    root, _ = files
    shutil.copytree(root / "tj_src", tmp_path / "tj")
    config = json.loads((tmp_path / "tj" / "tokenizer_config.json").read_text())
    (tmp_path / "tj" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tj"))
    ours = load_tokenizer(tmp_path / "tj")
    for messages in (MESSAGES, MESSAGES[1:2]):
        for gen in (True, False):
            want = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert render_chat(ours.chat_template, messages, ours.special_tokens, add_generation_prompt=gen) == want
        text = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = auto.encode(text, add_special_tokens=False)
        assert chat_ids(ours, messages) == (ids if ids[:1] == [1] else [1, *ids])


def test_generate_chat_renders_the_template(files, capsys):
    root, ck = files
    assert eval_main(["generate", str(ck["tj"]), "--prompt", "The dog", "--system", "Be brief.", "--chat",
                      "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"tokenizer: {ck['tj'] / 'tokenizer.json'}")
    assert out[1] == "--- prompt 1: 'The dog'"
    tok = load_tokenizer(ck["tj"])
    want = tj_ids(root, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nThe dog<|im_end|>\n"
                        "<|im_start|>assistant\n")
    assert chat_ids(tok, chat_messages("The dog", "Be brief.")) == [1, *want]
