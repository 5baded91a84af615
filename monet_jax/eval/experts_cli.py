"""``eval.py experts ...``: the expert microscope (tokens, stats, view, atlas) and scalpel (select-domain,
select-correlated). Masks written here are read back by every eval subcommand's ``--mask``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from monet_jax import distributed as dist
from monet_jax.config import DTYPES
from monet_jax.data.sources import FORMATS

TOKENIZER_HELP = ("default: the checkpoint's own (tokenizer.json / tokenizer.model beside its config.json); "
                  "byte, a tokenizer.json, a tokenizer.model or a directory holding one")


def add_parsers(sub, common, corpus):
    """``common``: checkpoint, --tokenizer, --mask; ``corpus``: --seq-len, --batch-size, --max-tokens."""
    tok = sub.add_parser("tokens", parents=[common], help="each token's active composed experts per routing group")
    tok.add_argument("--text", required=True)
    tok.add_argument("--top", type=int, default=3, help="experts shown per token and group")

    st = sub.add_parser("stats", parents=[common, corpus],
                        help="per-expert activation mass and frequency over a corpus, with top contexts")
    _data_args(st, required=False, default="the embedded corpus")
    st.add_argument("--out", required=True, help="directory for stats.npz and contexts.json")
    st.add_argument("--top", type=int, default=5, help="experts listed per group (by mass) with their contexts")
    st.add_argument("--contexts", type=int, default=5, help="top-activating contexts kept per listed expert")

    dom = sub.add_parser("select-domain", parents=[common, corpus],
                         help="experts whose mean score in a domain is >= RATIO x the second-highest domain")
    dom.add_argument("--domain", action="append", required=True, metavar="NAME=PATH",
                     help="a labelled corpus (text / dir / JSONL / Parquet); repeat for each domain")
    dom.add_argument("--format", default="auto")
    dom.add_argument("--text-key", default="text")
    dom.add_argument("--ratio", type=float, default=2.0)
    dom.add_argument("--min-mean", type=float, default=0.0, help="and a mean score in the domain above this")
    dom.add_argument("--out", required=True, help="directory for NAME.json masks and domain_means.npz")

    cor = sub.add_parser("select-correlated", parents=[common, corpus],
                         help="experts whose score correlates (Pearson, over tokens) with a per-token score")
    cor.add_argument("--data", required=True,
                     help="JSONL; each line has the text and SCORE_KEY: a number for the document, or one number "
                          "per token of the tokenized text")
    cor.add_argument("--text-key", default="text")
    cor.add_argument("--score-key", default="score")
    cor.add_argument("--threshold", type=float, default=0.2)
    cor.add_argument("--out", required=True, help="the mask file to write")

    view = sub.add_parser("view", parents=[common, corpus],
                          help="an HTML page (and PNG) of one expert: a text shaded by its score, its top contexts")
    view.add_argument("--expert", required=True, metavar="GROUP:ID", help="routing group and composed id i*E+j")
    view.add_argument("--text", required=True)
    _data_args(view, required=False, default="the embedded corpus")
    view.add_argument("--contexts", type=int, default=8,
                      help="top-activating contexts shown from --data (0: none, and no pass over a corpus)")
    view.add_argument("--out", required=True, help="the HTML file to write")
    view.add_argument("--png", default=None, help="also a screenshot (needs Chromium)")

    # Its own parents: here --mask labels experts with a selection's domain instead of deleting them.
    atlas = sub.add_parser("atlas", parents=[corpus], help="a static HTML site of the experts: ranked lists, "
                           "pages with top contexts, token search and a text box (opens from disk)")
    atlas.add_argument("checkpoint", help="our checkpoint directory or a Hugging Face model directory")
    atlas.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    atlas.add_argument("--dtype", choices=DTYPES, default=None,
                       help="parameters and computation (default: float32 on a CPU, bfloat16 on TPU and GPU, "
                            "whatever dtype the checkpoint stores)")
    dist.add_launch_args(atlas)
    _data_args(atlas, required=False, default="the embedded corpus")
    atlas.set_defaults(mask=None)
    atlas.add_argument("--out", required=True, help="the site's directory (an earlier atlas there is replaced)")
    atlas.add_argument("--experts", type=int, default=1024, help="experts kept per group, those with the most mass")
    atlas.add_argument("--contexts", type=int, default=12, help="top-activating contexts per expert")
    atlas.add_argument("--context-tokens", type=int, default=12, help="tokens shown each side of a context")
    atlas.add_argument("--tokens", type=int, default=4096, help="vocabulary tokens indexed (the most frequent)")
    atlas.add_argument("--token-experts", type=int, default=8, help="experts listed per indexed token and group")
    atlas.add_argument("--mask", action="append", default=[], dest="domain_masks", metavar="NAME=FILE",
                       help="a mask of select-domain / select-correlated: its experts are labelled NAME "
                            "(nothing is deleted); repeat for several")
    atlas.add_argument("--png", default=None, help="also a screenshot of the index (needs Chromium)")
    _serve_parser(sub)


def _data_args(p, required=True, default=None):
    p.add_argument("--data", required=required, default=None,
                   help="text file, directory, glob, JSONL, Parquet or ArrayRecord"
                        + (f" (default: {default})" if default else ""))
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="how to read --data (default: %(default)s, by the files' extensions)")
    p.add_argument("--text-key", default="text", help="the text field of JSONL / Parquet / ArrayRecord records "
                   "(default: %(default)s)")


def read_corpus(path, fmt="auto", text_key="text") -> list:
    from monet_jax.data.sources import open_documents

    src = open_documents(path, fmt, text_key)
    return [src[i] for i in range(len(src))]


def run(args, model, tokenizer) -> int:
    handlers = {"tokens": _tokens, "stats": _stats, "select-domain": _select_domain,
                "select-correlated": _select_correlated, "view": _view, "atlas": _atlas}
    return handlers[args.experts_command](args, model, tokenizer)


def _corpus_kw(args) -> dict:
    return dict(seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens)


def _tokens(args, model, tokenizer) -> int:
    from monet_jax.experts.microscope import token_routing

    ids = [tokenizer.bos_id, *map(int, tokenizer.encode(args.text))]
    routing = token_routing(model, np.array(ids), deleted=_deleted_ids(model))
    e = model.config.moe_experts
    print(f"composed expert id = i * {e} + j; score = sum over heads of g1[h, i] * g2[h, j]")
    for t, groups in zip(ids, routing, strict=True):
        cells = []
        for g, r in enumerate(groups):
            top = ", ".join(f"{i}:{s:.3f}" for i, s in zip(r.expert_ids[:args.top], r.scores[:args.top], strict=True))
            cells.append(f"group {g}: {len(r.expert_ids):4d} active, top {top}")
        print(f"{tokenizer.decode([t]) or '<bos>'!r:>10}  " + " | ".join(cells))
    return 0


def _deleted_ids(model) -> list[set[int]] | None:
    """Per group, the ids deleted by an applied mask (the microscope then hides them)."""
    groups = model.model.routing_groups()
    if all(layers[0].deleted is None for layers in groups):
        return None
    return [set() if layers[0].deleted is None else set(np.flatnonzero(np.asarray(layers[0].deleted[...])).tolist())
            for layers in groups]


def _stats(args, model, tokenizer) -> int:
    from monet_jax.experts.stats import corpus_stats, describe_context, top_contexts

    docs = read_corpus(args.data, args.format, args.text_key)
    st = corpus_stats(model, tokenizer, docs, **_corpus_kw(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    st.save(out / "stats.npz")
    e = model.config.moe_experts
    chosen = [(g, int(x)) for g in range(st.mass.shape[0]) for x in np.argsort(-st.mass[g], kind="stable")[:args.top]]
    ctx, toks = top_contexts(model, tokenizer, docs, chosen, top=args.contexts, **_corpus_kw(args))
    report = []
    print(f"{st.tokens:,} tokens, {len(toks)} documents; composed expert id = i * {e} + j")
    for g in range(st.mass.shape[0]):
        active = int((st.frequency[g] > 0).sum())
        print(f"group {g}: {active:,} of {e * e:,} composed experts active at least once")
        for gg, x in chosen:
            if gg != g:
                continue
            items = [dict(zip(("before", "token", "after"), describe_context(tokenizer, toks[c.doc], c.position),
                              strict=True), score=c.score, doc=c.doc, position=c.position) for c in ctx[(g, x)]]
            report.append({"group": g, "expert": x, "mean_score": float(st.mean[g, x]),
                           "frequency": int(st.frequency[g, x]), "contexts": items})
            shown = " | ".join(repr(c["before"][-12:] + "[" + c["token"] + "]" + c["after"][:6]) for c in items[:2])
            print(f"  expert {x:>7} (i={x // e}, j={x % e}): mean score {st.mean[g, x]:.4f}, "
                  f"active on {st.frequency[g, x] / max(st.tokens, 1):.1%} of tokens; top: {shown}")
    (out / "contexts.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out / 'stats.npz'} and {out / 'contexts.json'}")
    return 0


def _select_domain(args, model, tokenizer) -> int:
    from monet_jax.experts.select import domain_experts
    from monet_jax.experts.stats import corpus_stats

    domains = {}
    for spec in args.domain:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--domain expects NAME=PATH, got {spec!r}")
        domains[name] = path
    means, tokens = {}, {}
    for name, path in domains.items():
        st = corpus_stats(model, tokenizer, read_corpus(path, args.format, args.text_key), desc=name,
                          **_corpus_kw(args))
        means[name], tokens[name] = st.mean, st.tokens
    masks = domain_experts(means, ratio=args.ratio, min_mean=args.min_mean)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "domain_means.npz", **means)
    for name, mask in masks.items():
        mask.meta["tokens"] = tokens[name]
        mask.save(out / f"{name}.json")
        per_group = ", ".join(str(g.size) for g in mask.groups)
        print(f"{name}: {mask.count:,} experts selected ({per_group} per group; {tokens[name]:,} tokens) "
              f"-> {out / (name + '.json')}")
    return 0


def _select_correlated(args, model, tokenizer) -> int:
    from monet_jax.experts.select import correlated_experts
    from monet_jax.experts.stats import corpus_stats

    texts, scores = [], []
    for n, line in enumerate(Path(args.data).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, score = str(row[args.text_key]), row[args.score_key]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{args.data}:{n}: expected JSON with {args.text_key!r} and {args.score_key!r}") from None
        if not isinstance(score, int | float):  # one number per token: the bos takes the document's mean
            score = [float(np.mean(score)), *map(float, score)]
        texts.append(text)
        scores.append(score)
    st = corpus_stats(model, tokenizer, texts, token_scores=scores, **_corpus_kw(args))
    r = st.pearson()
    mask = correlated_experts(r, args.threshold, {"score_key": args.score_key, "tokens": st.tokens})
    mask.save(args.out)
    active = [int((f > 0).sum()) for f in st.frequency]
    print(f"{mask.count:,} experts with Pearson r > {args.threshold} over {st.tokens:,} tokens "
          f"({', '.join(f'{g.size} of {a} active' for g, a in zip(mask.groups, active, strict=True))} per group); "
          f"max r {r.max():.3f} -> {args.out}")
    return 0


def _view(args, model, tokenizer) -> int:
    from monet_jax.experts.microscope import token_routing
    from monet_jax.experts.stats import describe_context, top_contexts
    from monet_jax.experts.viewer import render, screenshot

    group, sep, ident = args.expert.partition(":")
    e = model.config.moe_experts
    try:
        group, ident = int(group), int(ident)
    except ValueError:
        raise ValueError(f"--expert expects GROUP:ID, got {args.expert!r}") from None
    groups = len(model.model.routing_groups())
    if not sep or not 0 <= group < groups or not 0 <= ident < e * e:
        raise ValueError(f"--expert {args.expert}: group must be in [0, {groups}) and id in [0, {e * e})")
    ids = [tokenizer.bos_id, *map(int, tokenizer.encode(args.text))]
    routing = token_routing(model, np.array(ids))
    scores = []
    for groups_t in routing[1:]:
        r = groups_t[group]
        hit = np.flatnonzero(r.expert_ids == ident)
        scores.append(float(r.scores[hit[0]]) if hit.size else 0.0)
    tokens = [tokenizer.decode([t]) for t in ids[1:]]
    contexts = None
    if args.contexts > 0:
        found, toks = top_contexts(model, tokenizer, read_corpus(args.data, args.format, args.text_key),
                                   [(group, ident)], top=args.contexts, **_corpus_kw(args))
        contexts = [dict(zip(("before", "token", "after"), describe_context(tokenizer, toks[c.doc], c.position),
                             strict=True), score=c.score) for c in found[(group, ident)]]
    title = f"Group {group} / Expert {ident}  (i = {ident // e}, j = {ident % e})"
    meta = f"score = sum over heads of g1[h, i] * g2[h, j]; max on this text {max(scores, default=0):.4f}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(title, tokens, scores, contexts, meta))
    print(f"wrote {out}")
    if args.png:
        print(f"wrote {screenshot(out, args.png)}")
    return 0


def _domain_masks(specs: list[str]) -> dict:
    """``NAME=FILE`` (or ``FILE``, named by its stem) -> the loaded masks."""
    from monet_jax.experts.mask import ExpertMask

    masks = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = (name, path) if sep else (Path(spec).stem, spec)
        if not name or not path:
            raise ValueError(f"--mask expects NAME=FILE, got {spec!r}")
        if name in masks:
            raise ValueError(f"--mask {name!r} given twice")
        masks[name] = ExpertMask.load(path)
    return masks


def _atlas(args, model, tokenizer) -> int:
    from monet_jax.experts.atlas import AtlasOptions, collect, expert_domains
    from monet_jax.experts.atlas_files import check_out, site_size, write_site
    from monet_jax.experts.viewer import screenshot

    options = AtlasOptions(args.experts, args.contexts, args.context_tokens, args.tokens, args.token_experts)
    masks = expert_domains(_domain_masks(args.domain_masks), model)
    check_out(args.out)
    atlas = collect(model, tokenizer, read_corpus(args.data, args.format, args.text_key), options,
                    **_corpus_kw(args))
    source = {"checkpoint": str(args.checkpoint), "corpus": args.data or "the embedded corpus",
              "seq_len": args.seq_len}
    out = write_site(atlas, tokenizer, model.config, args.out, masks=masks, source=source)
    size, files = site_size(out)
    kept = ", ".join(f"{g.ids.size:,}" for g in atlas.groups)
    print(f"{atlas.stats.tokens:,} tokens, {len(atlas.docs)} documents; experts kept per group: {kept} of "
          f"{model.config.moe_experts ** 2:,}; {atlas.token_ids.size:,} tokens indexed")
    print(f"wrote {out / 'index.html'}: {size / 2**20:.2f} MiB in {files} files")
    if args.png:
        print(f"wrote {screenshot(out / 'index.html', args.png)}")
    return 0


def _serve_parser(sub) -> None:
    # Not the shared corpus parent: its actions are shared objects, and serve reads less of the corpus by default.
    serve = sub.add_parser("serve", help="the expert lab: a local web app where the model runs "
                           "(your text's experts, live expert pages, ablation with before/after)")
    serve.add_argument("checkpoint", help="our checkpoint directory or a Hugging Face model directory")
    serve.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    serve.add_argument("--dtype", choices=DTYPES, default=None,
                       help="parameters and computation (default: float32 on a CPU, bfloat16 on TPU and GPU)")
    _data_args(serve, required=False, default="the embedded corpus")
    serve.add_argument("--atlas", default=None, metavar="DIR",
                       help="an atlas built by `experts atlas` to open on (default: one is built into OUT/atlas)")
    serve.add_argument("--no-atlas", action="store_true", help="build no atlas: open on the lab's text page")
    serve.add_argument("--out", default="runs/lab", help="the only directory the lab writes to: its atlas and "
                       "saved masks (default: %(default)s)")
    serve.add_argument("--mask", action="append", default=[], dest="domain_masks", metavar="NAME=FILE",
                       help="a mask of select-domain / select-correlated offered for ablation; repeat for several")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    serve.add_argument("--seq-len", type=int, default=128, help="tokens per corpus window (default: %(default)s)")
    serve.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    serve.add_argument("--max-tokens", type=int, default=50_000,
                       help="corpus tokens read at start, for expert pages and search (default: %(default)s)")
    serve.set_defaults(mask=None)  # nothing deleted: --mask here offers masks for ablation


def serve(args) -> int:
    """``experts serve``: start the server at once; the model loads in the background (the pages say so)."""
    try:
        import uvicorn

        from monet_jax.eval.lab.app import create_app
    except ImportError as e:
        raise ValueError(f"the expert lab needs fastapi and uvicorn ({e}): pip install -e '.[lab]'") from None
    from monet_jax.eval.lab.service import LabService

    out = Path(args.out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    if args.atlas is not None and args.no_atlas:
        raise ValueError("--atlas and --no-atlas: choose one")
    atlas = None if args.no_atlas else Path(args.atlas).resolve() if args.atlas else out / "atlas"
    if args.atlas is not None and not (atlas / "index.html").is_file():
        raise ValueError(f"--atlas {atlas}: no index.html (build one with `eval.py experts atlas`)")
    masks = _domain_masks(args.domain_masks)  # unreadable files fail here, before the server starts
    service = LabService(lambda note: _load_lab(args, out, atlas, masks, note))
    app = create_app(service, atlas)
    print(f"expert lab: http://{args.host}:{args.port}/  (the model loads in the background; Ctrl-C stops)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _load_lab(args, out: Path, atlas: Path | None, masks: dict, note):
    from monet_jax.eval.lab.engine import Lab, LabOptions
    from monet_jax.eval.main import model_and_tokenizer

    note(f"reading {args.checkpoint}")
    model, tokenizer = model_and_tokenizer(args)
    docs = read_corpus(args.data, args.format, args.text_key)
    out.mkdir(parents=True, exist_ok=True)
    source = {"checkpoint": str(args.checkpoint), "corpus": args.data or "the embedded corpus",
              "tokenizer": tokenizer.source}
    if atlas is not None and args.atlas is None:
        from monet_jax.experts.atlas import AtlasOptions, collect, expert_domains
        from monet_jax.experts.atlas_files import write_site

        note("building the atlas")
        built = collect(model, tokenizer, docs, AtlasOptions(), **_corpus_kw(args))
        write_site(built, tokenizer, model.config, atlas, masks=expert_domains(masks, model),
                   source={**source, "seq_len": args.seq_len})
    note("reading the corpus's routing")
    options = LabOptions(seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens)
    return Lab(model, tokenizer, docs, options, out_dir=out, domain_masks=masks, source=source)
