"""The Grain data pipeline: packing, masking, sharding, shuffling, exact resume, sources and tokenizers.

Expected values are rebuilt here from the documents themselves (``bos + utf-8 bytes + 3 + eos``), never taken
from the pipeline, so a packing or masking bug cannot agree with itself.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from monet_jax.config import ConfigError
from monet_jax.data import text
from monet_jax.data.pipeline import DataConfig, make_iterator, split_indices
from monet_jax.data.tokenizer import load_tokenizer

BOS, EOS = 1, 2
WORDS = ("the cat sat on a mat while every small dog ran far away from home and came back later "
         "to eat some bread with cheese").split()


def make_docs(n: int, seed: int = 0, max_words: int = 30) -> list[str]:
    """Distinct documents of very different lengths, some with non-ASCII text, none with blank lines."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, max_words))]
        if i % 5 == 0:
            words.append("naïve café — 日本")
        docs.append(f"doc{i}: " + " ".join(words))
    return docs


def byte_ids(doc: str) -> list[int]:
    return [BOS] + [b + 3 for b in doc.encode("utf-8")] + [EOS]


def write_text(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs))
    return path


def stream_rows(batches, i: int) -> list[dict]:
    """Row ``i`` of every batch: one row stream, each row continuing the one before."""
    return [{k: v[i] for k, v in b.items()} for b in batches]


def rows_of(batches, rows=None, total=None) -> list[dict]:
    """Unpacked rows (one document each) in the global document order: the ``k``-th row of global row stream
    ``r`` holds the document at position ``k * total + r`` (``total`` rows per global batch). Padding rows of
    ended streams are left out."""
    n = len(batches[0]["input_ids"]) if batches else 0
    rows, total = list(rows or range(n)), total or n
    found = [(k * total + r, row) for i, r in enumerate(rows) for k, row in enumerate(stream_rows(batches, i))
             if row["segment_ids"].any()]
    return [row for _, row in sorted(found, key=lambda x: x[0])]


def check_row(row: dict) -> None:
    """Segment ids count up from 1 and then pad with 0; positions restart at 0 per segment; targets are inputs
    shifted within a segment; padding carries no loss."""
    seg, pos = row["segment_ids"], row["positions"]
    real = seg > 0
    n = int(real.sum())
    assert real[:n].all() and not real[n:].any(), "padding only at the end of a row"
    assert (row["loss_mask"][~real] == 0).all()
    if n == 0:
        return
    assert seg[0] == 1 and set(np.diff(seg[:n])) <= {0, 1}
    starts = np.flatnonzero(np.diff(seg[:n], prepend=0))
    for s, e in zip(starts, list(starts[1:]) + [n]):
        np.testing.assert_array_equal(pos[s:e], np.arange(e - s))
        np.testing.assert_array_equal(row["targets"][s:e - 1], row["input_ids"][s + 1:e])


def positioned_documents(batches, rows=None, total=None) -> list[tuple[int, list[int], list[float]]]:
    """Rebuild ``(position, ids, loss mask over targets)`` of every document from the packed row streams, in
    the global document order (see ``rows_of``)."""
    n = len(batches[0]["input_ids"]) if batches else 0
    rows, total = list(rows or range(n)), total or n
    docs = []
    for i, r in enumerate(rows):
        ids, mask, k = None, None, 0
        for row in stream_rows(batches, i):
            check_row(row)
            seg = row["segment_ids"]
            for s in range(1, int(seg.max()) + 1):
                where = seg == s
                inp, tgt, m = row["input_ids"][where], row["targets"][where], row["loss_mask"][where]
                if inp[0] == BOS and ids is None:
                    ids, mask = [BOS], []
                assert ids is not None and inp[0] == ids[-1], "a continued piece starts with the previous target"
                ids += tgt.tolist()
                mask += m.tolist()
                if tgt[-1] == EOS:
                    docs.append((k * total + r, ids, mask))
                    ids = mask = None
                    k += 1
        assert ids is None, "stream ended inside a document"
    return sorted(docs, key=lambda d: d[0])


def documents_of(batches, rows=None, total=None) -> list[tuple[list[int], list[float]]]:
    return [(ids, mask) for _, ids, mask in positioned_documents(batches, rows, total)]


def decoded(batches, rows=None, total=None) -> list[str]:
    out = []
    for ids, _ in documents_of(batches, rows, total):
        assert ids[0] == BOS and ids[-1] == EOS
        out.append(bytes(i - 3 for i in ids[1:-1]).decode("utf-8"))
    return out


def one_pass(cfg: DataConfig, tokenizer="byte", **kw) -> list[dict]:
    kw.setdefault("split", "train")
    kw.setdefault("seed", 0)
    return list(make_iterator(cfg, load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer,
                              num_epochs=1, **kw))


@pytest.fixture
def corpus(tmp_path):
    docs = make_docs(40)
    return docs, str(write_text(tmp_path / "corpus.txt", docs))


# --------------------------------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer_round_trips_utf8():
    tok = load_tokenizer("byte")
    s = "héllo wörld — 日本語 🎉\n\ttabs"
    ids = np.asarray(tok.encode(s))
    assert ids.tolist() == [b + 3 for b in s.encode("utf-8")]
    assert tok.decode(ids) == s and tok.decode([BOS, *ids, EOS, 0]) == s
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
    # the legacy names still work for monet_jax.eval
    assert text.decode(text.encode(s)) == s and (text.PAD, text.BOS, text.EOS, text.BYTE_VOCAB) == (0, 1, 2, 259)
    assert text.pack(["ab"]).tolist() == [1, 97 + 3, 98 + 3, 2]


def _train_hf_bpe(directory: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(make_docs(200), trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


def test_hf_tokenizer_json_round_trips_and_feeds_the_pipeline(tmp_path):
    path = _train_hf_bpe(tmp_path / "hf")
    for spec in (str(path), str(path.parent)):
        tok = load_tokenizer(spec)
        assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
        assert 259 < tok.vocab_size <= 320
        for s in ("the cat sat on a mat", "naïve café — 日本 🎉 unseen"):
            ids = tok.encode(s)
            assert BOS not in ids and EOS not in ids
            assert tok.decode(ids) == s
    assert len(tok.encode("the cat sat on a mat")) < len("the cat sat on a mat")  # merges were learnt

    docs = make_docs(12, seed=3)
    cfg = DataConfig(path=str(write_text(tmp_path / "c.txt", docs)), tokenizer=str(path), seq_len=16,
                     batch_size=2, val_fraction=0, shuffle=False)
    batches = one_pass(cfg, tok)
    got = [tok.decode(ids) for ids, _ in documents_of(batches)]
    assert got == docs


def test_hf_tokenizer_config_names_special_tokens(tmp_path):
    path = _train_hf_bpe(tmp_path / "hf")
    (path.parent / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "</s>"}, "eos_token": "<s>", "pad_token": None}))
    tok = load_tokenizer(str(path.parent))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)


def test_sentencepiece_round_trips(tmp_path):
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=80, model_type="bpe", minloglevel=2, hard_vocab_limit=False)
    (tmp_path / "sp.model").rename(tmp_path / "tokenizer.model")
    for spec in (str(tmp_path / "tokenizer.model"), str(tmp_path)):
        tok = load_tokenizer(spec)
        assert (tok.bos_id, tok.eos_id) == (1, 2) and tok.pad_id == tok.eos_id  # no pad piece: pads with eos
        assert tok.vocab_size == 80
        s = "the small dog ran far away"
        ids = tok.encode(s)
        assert 0 < len(ids) < len(s) and BOS not in ids
        assert tok.decode(ids) == s


def test_mistral_sentencepiece_model_if_installed():
    mistral_common = pytest.importorskip("mistral_common")
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        pytest.skip(f"{path} not shipped with this mistral_common")
    tok = load_tokenizer(str(path))
    assert tok.vocab_size == 32000 and (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.decode(tok.encode("Hello world")) == "Hello world"


# --------------------------------------------------------------------------------------------------
# Packing and masking


def test_packed_rows_decode_back_to_documents(corpus):
    docs, path = corpus
    cfg = DataConfig(path=path, seq_len=24, batch_size=4, val_fraction=0, shuffle=False)
    batches = one_pass(cfg)
    assert all(b["input_ids"].shape == (4, 24) and b["input_ids"].dtype == np.int32 for b in batches)
    assert {k: str(v.dtype) for k, v in batches[0].items()} == {
        "input_ids": "int32", "targets": "int32", "loss_mask": "float32", "segment_ids": "int32",
        "positions": "int32"}
    rebuilt = documents_of(batches)
    assert [ids for ids, _ in rebuilt] == [byte_ids(d) for d in docs]
    assert all(all(m == 1 for m in mask) for _, mask in rebuilt)  # plain text: every real target counts
    # concat-then-split per row stream: padding only after the stream's last document, in its last row
    for i in range(4):
        real = np.concatenate([row["segment_ids"] for row in stream_rows(batches, i)]) > 0
        tokens = sum(len(byte_ids(d)) - 1 for d in docs[i::4])  # stream i packs documents i, i + 4, ...
        assert real[:tokens].all() and not real[tokens:].any()
        assert len(real) - tokens < 24 or not real[-24:].any()  # a stream that ended early pads whole rows
    # a document longer than a row is split and its continuation restarts at position 0
    assert any(len(byte_ids(d)) > 25 for d in docs)


def test_unpacked_rows_hold_one_truncated_document(corpus):
    docs, path = corpus
    cfg = DataConfig(path=path, seq_len=40, batch_size=8, val_fraction=0, shuffle=False, packing=False)
    rows = rows_of(one_pass(cfg))
    assert len(rows) == 40  # 5 full batches, no padding rows needed
    for doc, row in zip(docs, rows):
        ids = byte_ids(doc)[:41]
        n = len(ids) - 1
        np.testing.assert_array_equal(row["input_ids"][:n], ids[:-1])
        np.testing.assert_array_equal(row["targets"][:n], ids[1:])
        assert (row["segment_ids"][:n] == 1).all() and (row["segment_ids"][n:] == 0).all()
        assert (row["loss_mask"][:n] == 1).all() and (row["loss_mask"][n:] == 0).all()
        assert (row["input_ids"][n:] == 0).all()  # pad id
        np.testing.assert_array_equal(row["positions"][:n], np.arange(n))


@pytest.mark.parametrize("packing", [True, False])
def test_prompt_tokens_are_masked_out_of_the_loss(tmp_path, packing):
    rng = random.Random(1)
    pairs = [(f"Q{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8))),
              " A: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))) for i in range(20)]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"q": p, "a": r, "id": i}) + "\n" for i, (p, r) in enumerate(pairs)))
    cfg = DataConfig(path=str(path), prompt_key="q", response_key="a", seq_len=96 if not packing else 20,
                     batch_size=4, val_fraction=0, shuffle=False, packing=packing)
    batches = one_pass(cfg)
    if packing:
        rebuilt = documents_of(batches)
    else:
        rebuilt = []
        for row in rows_of(batches):
            check_row(row)
            real = row["segment_ids"] > 0
            rebuilt.append(([BOS] + row["targets"][real].tolist(), row["loss_mask"][real].tolist()))
    assert len(rebuilt) == len(pairs)
    for (ids, mask), (p, r) in zip(rebuilt, pairs):
        n_p, n_r = len(p.encode()), len(r.encode())
        assert ids == byte_ids(p + r)
        # targets 0..n_p-1 are prompt bytes; the first response byte and everything after (eos too) count
        assert mask == [0.0] * n_p + [1.0] * (n_r + 1)


# --------------------------------------------------------------------------------------------------
# Shuffling, sharding, splits


def test_seeded_shuffle_is_deterministic_and_seed_dependent(corpus):
    _, path = corpus
    cfg = DataConfig(path=path, seq_len=32, batch_size=4, val_fraction=0)

    def first(seed, c=cfg):
        return np.stack([b["input_ids"] for b in one_pass(c, seed=seed)[:3]])

    np.testing.assert_array_equal(first(0), first(0))
    assert not np.array_equal(first(0), first(1))
    assert not np.array_equal(first(0), first(0, DataConfig(path=path, seq_len=32, batch_size=4, val_fraction=0,
                                                            shuffle=False)))


def test_each_epoch_sees_every_document_once_across_two_processes(corpus):
    docs, path = corpus
    cfg = DataConfig(path=path, seq_len=16, batch_size=4, val_fraction=0.1)
    tok = load_tokenizer("byte")
    n_train = 36
    epochs = [[], []]
    for p in range(2):
        batches = list(make_iterator(cfg, tok, split="train", seed=7, process_index=p, process_count=2,
                                     num_epochs=2))
        assert all(b["input_ids"].shape == (2, 16) for b in batches)  # batch_size // process_count rows
        for pos, ids, _ in positioned_documents(batches, rows=[2 * p, 2 * p + 1], total=4):
            epochs[pos // n_train].append((p, bytes(i - 3 for i in ids[1:-1]).decode()))
    val = set(decoded(list(make_iterator(cfg, tok, split="validation", seed=7))))
    assert len(val) == 4 and len(set(docs) - val) == n_train
    for epoch in epochs:  # every training document once per epoch, read by exactly one of the processes
        assert sorted(d for _, d in epoch) == sorted(set(docs) - val)
    assert [d for _, d in epochs[0]] != [d for _, d in epochs[1]]  # reshuffled between epochs


@pytest.mark.parametrize("packing", [True, False])
def test_the_global_batch_does_not_depend_on_the_process_count(corpus, packing):
    """Each process reads its slice of the same global batch: 1, 2 or 4 processes, or any set of rows."""
    _, path = corpus
    cfg = DataConfig(path=path, seq_len=16, batch_size=4, val_fraction=0.1, packing=packing)
    tok = load_tokenizer("byte")

    def steps(n, **kw):
        it = make_iterator(cfg, tok, split="train", seed=3, **kw)
        return [next(it) for _ in range(n)]

    whole = steps(25)  # several epochs of the 36 training documents
    for count in (2, 4):
        parts = [steps(25, process_index=p, process_count=count) for p in range(count)]
        joined = [{k: np.concatenate([part[s][k] for part in parts]) for k in whole[s]} for s in range(25)]
        _assert_same_batches(joined, whole)
    odd = steps(25, rows=[3, 0])  # e.g. the rows that a process's devices hold under some mesh
    _assert_same_batches(odd, [{k: v[[0, 3]] for k, v in b.items()} for b in whole])
    for split in ("validation",):
        full = list(make_iterator(cfg, tok, split=split, seed=3))
        halves = [list(make_iterator(cfg, tok, split=split, seed=3, process_index=p, process_count=2))
                  for p in range(2)]
        longest = max(len(h) for h in halves)
        assert len(full) == longest
        for h in halves:  # a process whose rows ended first pads until the longest ends
            h += [{k: np.zeros_like(v) for k, v in h[0].items()}] * (longest - len(h))
        joined = [{k: np.concatenate([h[s][k] for h in halves]) for k in full[s]} for s in range(longest)]
        for a, b in zip(joined, full):
            real = b["segment_ids"] > 0
            for k in a:
                np.testing.assert_array_equal(a[k][real], b[k][real])


def test_validation_split_is_disjoint_in_order_and_padded(corpus):
    docs, path = corpus
    cfg = DataConfig(path=path, seq_len=32, batch_size=4, val_fraction=0.25)
    tok = load_tokenizer("byte")
    val_batches = list(make_iterator(cfg, tok, split="validation", seed=3))
    val = decoded(val_batches)
    train = decoded(one_pass(cfg, seed=3))
    assert len(val) == 10 and not set(val) & set(train) and sorted(val + train) == sorted(docs)
    assert val == [d for d in docs if d in set(val)]  # source order (row streams interleaved), not shuffled
    assert decoded(list(make_iterator(cfg, tok, split="validation", seed=3))) == val
    assert set(decoded(list(make_iterator(cfg, tok, split="validation", seed=4)))) != set(val)
    # one pass, nothing dropped: every target of every held-out document counts once, the rest is padding
    tokens = sum(len(byte_ids(d)) - 1 for d in val)
    assert all(b["input_ids"].shape == (4, 32) for b in val_batches)
    longest = max(sum(len(byte_ids(d)) - 1 for d in val[i::4]) for i in range(4))  # row stream i: val[i::4]
    assert len(val_batches) == -(-longest // 32)
    assert sum(b["loss_mask"].sum() for b in val_batches) == tokens


# --------------------------------------------------------------------------------------------------
# Exact resume


def _assert_same_batches(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("packing", [True, False])
def test_restored_state_continues_exactly_across_epochs(tmp_path, packing):
    docs = make_docs(12, seed=5, max_words=20)  # a few hundred tokens: an epoch is ~3 batches
    path = str(write_text(tmp_path / "c.txt", docs))
    cfg = DataConfig(path=path, seq_len=16, batch_size=4, val_fraction=0, packing=packing)
    tok = load_tokenizer("byte")
    epoch_rows = sum(len(byte_ids(d)) - 1 for d in docs) / 16 if packing else len(docs)
    k, m = 2, int(2 * epoch_rows / 4) + 2
    it = make_iterator(cfg, tok, split="train", seed=11)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(m)]
    resumed = make_iterator(cfg, tok, split="train", seed=11)
    resumed.set_state(state)
    _assert_same_batches([next(resumed) for _ in range(m)], expected)
    assert (k + m) * 4 > 2 * epoch_rows  # the continuation crossed at least one epoch boundary

    # and a state saved mid-epoch-two restores too
    state2 = json.loads(json.dumps(resumed.get_state()))
    more = [next(resumed) for _ in range(3)]
    again = make_iterator(cfg, tok, split="train", seed=11)
    again.set_state(state2)
    _assert_same_batches([next(again) for _ in range(3)], more)


def test_state_restore_with_long_documents_and_two_processes(tmp_path):
    docs = make_docs(20, seed=2, max_words=80)  # documents span several rows: state points inside one
    path = str(write_text(tmp_path / "c.txt", docs))
    cfg = DataConfig(path=path, seq_len=8, batch_size=4, val_fraction=0.1)
    tok = load_tokenizer("byte")
    for step in (1, 3, 5):
        it = make_iterator(cfg, tok, split="train", seed=0, process_index=1, process_count=2)
        for _ in range(step):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        expected = [next(it) for _ in range(4)]
        fresh = make_iterator(cfg, tok, split="train", seed=0, process_index=1, process_count=2)
        fresh.set_state(state)
        _assert_same_batches([next(fresh) for _ in range(4)], expected)
    other = make_iterator(cfg, tok, split="train", seed=0, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="no position for row 0 of 4"):
        other.set_state(state)
    with pytest.raises(ValueError, match="seed=0 .now 1."):
        make_iterator(cfg, tok, split="train", seed=1, process_index=1, process_count=2).set_state(state)


def test_states_of_two_processes_restore_on_one_and_on_four(tmp_path):
    """A checkpoint of a 2-process run resumes on any process count: the merged row-stream states continue
    every row exactly where it was."""
    from monet_jax.data.pipeline import merge_states

    docs = make_docs(30, seed=4, max_words=60)
    path = str(write_text(tmp_path / "c.txt", docs))
    cfg = DataConfig(path=path, seq_len=8, batch_size=4, val_fraction=0.1)
    tok = load_tokenizer("byte")
    whole = make_iterator(cfg, tok, split="train", seed=5)
    expected = [next(whole) for _ in range(9)][5:]
    states = []
    for p in range(2):
        it = make_iterator(cfg, tok, split="train", seed=5, process_index=p, process_count=2)
        for _ in range(5):
            next(it)
        states.append(json.loads(json.dumps(it.get_state())))
    merged = merge_states(states)
    one = make_iterator(cfg, tok, split="train", seed=5)
    one.set_state(merged)
    _assert_same_batches([next(one) for _ in range(4)], expected)
    quarters = []
    for p in range(4):
        it = make_iterator(cfg, tok, split="train", seed=5, process_index=p, process_count=4)
        it.set_state(merged)
        quarters.append([next(it) for _ in range(4)])
    joined = [{k: np.concatenate([q[s][k] for q in quarters]) for k in expected[s]} for s in range(4)]
    _assert_same_batches(joined, expected)


def test_tokenization_threads_do_not_change_batches_or_state(corpus):
    _, path = corpus
    tok = load_tokenizer("byte")
    base = DataConfig(path=path, seq_len=16, batch_size=4, val_fraction=0, worker_count=0)
    expected = [b for _, b in zip(range(6), make_iterator(base, tok, split="train", seed=0))]
    threads = DataConfig(path=path, seq_len=16, batch_size=4, val_fraction=0, worker_count=3)
    it = make_iterator(threads, tok, split="train", seed=0)
    got = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    got += [next(it) for _ in range(3)]
    it.close()
    _assert_same_batches(got, expected)
    resumed = make_iterator(base, tok, split="train", seed=0)  # a state saved with threads restores without
    resumed.set_state(state)
    _assert_same_batches([next(resumed) for _ in range(3)], expected[3:])


# --------------------------------------------------------------------------------------------------
# Sources


def test_every_source_format_loads_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python.array_record_module import ArrayRecordWriter

    docs = make_docs(15, seed=9)
    write_text(tmp_path / "one.txt", docs)
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    for i, d in enumerate(docs):  # one document per file, in name order, across subdirectories and suffixes
        (tmp_path / "dir" / ("sub" if i % 2 else "") / f"{i:03d}.{('txt', 'md', 'py')[i % 3]}").write_text(d)
    (tmp_path / "dir" / "notes.bin").write_bytes(b"\x00ignored")
    with open(tmp_path / "d.jsonl", "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "body": d}) + "\n" + ("\n" if i == 3 else ""))  # blank lines are skipped
    pq.write_table(pa.table({"id": list(range(15)), "body": docs}), tmp_path / "d.parquet", row_group_size=4)
    (tmp_path / "ar").mkdir()
    for name, payload in (("json.arrayrecord", lambda d: json.dumps({"body": d}).encode()),
                          ("raw.array_record", lambda d: d.encode())):
        writer = ArrayRecordWriter(str(tmp_path / "ar" / name), "group_size:1")
        for d in docs:
            writer.write(payload(d))
        writer.close()

    def load(path, **kw):
        cfg = DataConfig(path=str(path), text_key="body", seq_len=16, batch_size=2, val_fraction=0, shuffle=False,
                         **kw)
        return decoded(one_pass(cfg))

    dir_docs = [docs[i] for i in sorted(range(15), key=lambda i: ("sub/" if i % 2 else "") + f"{i:03d}")]
    assert load(tmp_path / "one.txt") == docs
    assert load(tmp_path / "one.txt", format="text") == docs
    assert load(tmp_path / "dir") == dir_docs
    assert load(tmp_path / "dir" / "**" / "*.*") == dir_docs
    assert load(tmp_path / "d.jsonl") == docs
    assert load(tmp_path / "*.jsonl", format="jsonl") == docs
    assert load(tmp_path / "d.parquet") == docs
    assert load(tmp_path / "ar" / "json.arrayrecord") == docs
    assert load(tmp_path / "ar" / "raw.array_record", format="arrayrecord") == docs
    assert load(tmp_path / "ar") == docs + docs  # a directory of shards, in name order


def test_embedded_corpus_is_the_default():
    cfg = DataConfig(seq_len=64, batch_size=2, val_fraction=0, shuffle=False)
    got = decoded(one_pass(cfg))
    assert got == text.embedded_corpus()


# --------------------------------------------------------------------------------------------------
# One-line errors


def _error(match: str, fn, *args, exc=ValueError, **kw) -> str:
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_errors_name_the_problem(tmp_path, corpus):
    _, path = corpus
    tok = load_tokenizer("byte")

    def it(**kw):
        split = kw.pop("split", "train")
        pi, pc = kw.pop("process_index", 0), kw.pop("process_count", 1)
        rows = kw.pop("rows", None)
        return make_iterator(DataConfig(**kw), tok, split=split, seed=0, process_index=pi, process_count=pc,
                             rows=rows)

    missing = tmp_path / "nope.txt"
    assert str(missing) in _error("data path not found", it, path=str(missing))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("\n\n   \n")
    _error("no documents found in .*empty", it, path=str(tmp_path / "empty"))
    _error(r"no documents found in .*\*\.jsonl", it, path=str(tmp_path / "*.jsonl"))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": broken}\n')
    _error(r"bad\.jsonl:3: not valid JSON", it, path=str(bad))
    bad.write_text('{"text": "fine"}\n{"content": "x"}\n')
    _error(r"bad\.jsonl:2: no key 'text'", it, path=str(bad))
    _error(r"bad\.jsonl:1: no key 'prompt'", it, path=str(bad), prompt_key="prompt", response_key="content")

    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["a b c"]}), tmp_path / "t.parquet")
    _error(r"t\.parquet: no column 'text' \(columns: body\)", it, path=str(tmp_path / "t.parquet"))

    msg = _error("dataset too short for one batch", it, path=path, seq_len=4096, batch_size=4, val_fraction=0)
    assert "need 4 rows x 4096 = 16384 tokens" in msg and "tokens in 40 training documents" in msg
    _error("dataset too short .* need 64 rows", it, path=path, seq_len=8, batch_size=64, packing=False)

    _error("batch_size 5 is not divisible by process_count 2", it, path=path, batch_size=5, process_count=2)
    _error("unknown format 'csv'", DataConfig, path=path, format="csv", exc=ConfigError)
    _error("prompt_key and data.response_key", DataConfig, prompt_key="q", exc=ConfigError)
    _error("unknown split", it, path=path, split="test")
    _error("no validation documents: the split has none of the 40", it, path=path, val_fraction=0,
           split="validation")
    _error("rows must be a non-empty subset of the 4 rows", it, path=path, batch_size=4, rows=[4])
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "mixed" / "b.parquet").write_bytes(b"")
    _error("several data formats .jsonl, parquet.", it, path=str(tmp_path / "mixed"))


def test_tokenizer_errors_name_the_path(tmp_path):
    missing = tmp_path / "tok" / "tokenizer.json"
    assert str(missing) in _error("tokenizer not found", load_tokenizer, str(missing))
    (tmp_path / "tok").mkdir()
    _error("no tokenizer.json or tokenizer.model in directory", load_tokenizer, str(tmp_path / "tok"))
    (tmp_path / "tok" / "tokenizer.json").write_text("{not json")
    assert str(missing) in _error("cannot read tokenizer", load_tokenizer, str(tmp_path / "tok"))
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    _error(r"cannot read tokenizer .*tokenizer\.model", load_tokenizer, str(tmp_path / "tokenizer.model"))


def test_keyed_split_keeps_every_document_where_it_was():
    """With keys (the embedded corpus, whose documents follow the package's files), a document added or removed
    moves no other between the splits; the same seed holds out the same keys; at least one is held out."""
    keys = [f"doc-{i}" for i in range(200)]
    split = split_indices(len(keys), 0.1, 3, keys)
    held = {keys[i] for i in split["validation"]}
    assert 5 <= len(held) <= 40 and sorted(split["validation"].tolist() + split["train"].tolist()) == list(range(200))
    more = ["new-a", *keys[:50], "new-b", *keys[51:]]  # two added, one removed
    held_more = {more[i] for i in split_indices(len(more), 0.1, 3, more)["validation"]}
    assert held_more - {"new-a", "new-b"} == held - {keys[50]}
    assert {keys[i] for i in split_indices(len(keys), 0.1, 4, keys)["validation"]} != held  # the seed chooses
    assert split_indices(3, 0.01, 0, ["a", "b", "c"])["validation"].size == 1
    with pytest.raises(ValueError, match="2 keys for 3 documents"):
        split_indices(3, 0.1, 0, ["a", "b"])


def test_embedded_corpus_held_out_documents_survive_a_new_file(monkeypatch):
    """A source file added to the package (the embedded corpus grows) leaves the held-out documents of the
    default run where they were: ``eval.py perplexity`` still scores text the checkpoint never trained on."""
    from monet_jax.data import text as text_module
    from monet_jax.eval.main import held_out_documents

    before = held_out_documents()
    real = text_module.embedded_documents
    monkeypatch.setattr(text_module, "embedded_documents",
                        lambda: [("aaa/new_module.py", "x = 1\n"), *real(), ("zzz/other.py", "y = 2\n")])
    after = held_out_documents()
    assert [d for d in after if d not in ("x = 1\n", "y = 2\n")] == before
