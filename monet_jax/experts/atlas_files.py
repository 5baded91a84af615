"""Writing the expert atlas as a static site that opens from disk (``file://``), with no server.

Browsers refuse ``fetch`` of local files from a ``file://`` page, so every data file is a script that hands
its JSON to ``atlas.add(key, value)`` (``data/KEY.js``); the pages load them with ``<script>`` tags, on
demand. Data is split so that no page loads more than it shows: per group an index of the kept experts
(``data/gG/index.js``), their details in shards of ``EXPERT_SHARD`` by mass rank (``data/gG/eNNNN.js``),
and the per-token index in shards of ``TOKEN_SHARD`` token ids (``data/tokens/tNNNN.js``). The site is built
in a temporary directory beside ``out`` and renamed into place, so an interrupted run leaves nothing
half-written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np

from monet_jax.data.tokenizer import ByteTokenizer
from monet_jax.experts.atlas import Atlas, token_label, token_pieces
from monet_jax.experts.mask import ExpertMask

EXPERT_SHARD = 64     # experts per detail file
TOKEN_SHARD = 256     # token ids per token-index file
TOP_TOKENS = 10       # tokens listed per expert (3 of them in the group index)
MARKER = "data/meta.js"  # what makes a directory an atlas that a new run may replace


def check_out(out: str | Path) -> Path:
    """``out`` resolved; an error if it is a file or a non-empty directory that is not an atlas."""
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise ValueError(f"--out {out}: exists and is not an expert atlas (choose a new or empty directory)")
    return out


def write_site(atlas: Atlas, tokenizer, config, out: str | Path, *, masks: dict[str, ExpertMask] | None = None,
               source: dict | None = None) -> Path:
    """Write the site for ``atlas`` into ``out`` (replacing an earlier atlas there) and return its path."""
    out = check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _copy_pages(tmp)
        _write_data(tmp, atlas, tokenizer, config, masks or {}, source or {})
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / "site")
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def site_size(path: str | Path) -> tuple[int, int]:
    """(bytes, files) under ``path``."""
    files = [f for f in Path(path).rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), len(files)


# Each page: its file, title, data files loaded up front (the first view of the index needs group 0) and the
# function of pages.js that renders it.
PAGES = (("index.html", "Monet expert atlas", ["g0/index"], "indexPage"),
         ("expert.html", "Expert \u00b7 Monet expert atlas", [], "expertPage"),
         ("text.html", "Text box \u00b7 Monet expert atlas", [], "textPage"))


def _copy_pages(root: Path) -> None:
    site = resources.files("monet_jax.experts").joinpath("atlas_site")
    for name in ("atlas.css", "atlas.js", "pages.js"):
        (root / name).write_bytes(site.joinpath(name).read_bytes())
    skeleton = site.joinpath("page.html").read_text(encoding="utf-8")
    for name, title, data, page in PAGES:
        scripts = "".join(f'<script src="data/{key}.js"></script>\n' for key in data)
        text = skeleton.replace("{title}", title).replace("{data}", scripts).replace("{page}", page)
        (root / name).write_text(text, encoding="utf-8")


def _write_js(root: Path, key: str, value) -> None:
    path = root / "data" / f"{key}.js"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")  # line breaks to JavaScript before ES2019
    path.write_text(f'atlas.add("{key}",{text});\n', encoding="utf-8")


def _round(x: float) -> float:
    """Six significant digits: display values (mass and frequency are written exactly)."""
    return float(f"{float(x):.6g}")


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based rank of every entry, largest first (ties by index, as ``argsort(..., kind="stable")``)."""
    order = np.argsort(-values, kind="stable")
    ranks = np.empty(values.size, np.int64)
    ranks[order] = np.arange(1, values.size + 1)
    return ranks


def _write_data(root: Path, atlas: Atlas, tokenizer, config, masks: dict[str, ExpertMask], source: dict) -> None:
    st, opt = atlas.stats, atlas.options
    e = config.moe_experts
    byte = isinstance(tokenizer, ByteTokenizer)
    labels = {int(t): token_label(tokenizer, int(t)) for t in atlas.token_ids}
    groups_meta = []
    for g, ga in enumerate(atlas.groups):
        members = [set(m.groups[g].tolist()) for m in masks.values()]
        domains = [[d for d, ids in enumerate(members) if x in ids] for x in ga.ids.tolist()]
        top_tokens = _top_tokens(atlas, g)
        _write_js(root, f"g{g}/index", {
            "id": ga.ids.tolist(), "mass": [float(st.mass[g, x]) for x in ga.ids],
            "freq": [int(st.frequency[g, x]) for x in ga.ids],
            "top": [[t for t, _, _ in tops[:3]] for tops in top_tokens], "dom": domains})
        _write_expert_shards(root, atlas, tokenizer, g, top_tokens, domains)
        groups_meta.append({"total_mass": float(st.mass[g].sum()), "active": int((st.frequency[g] > 0).sum()),
                            "kept": int(ga.ids.size)})
    _write_token_index(root, atlas)
    _write_js(root, "vocab", {"id": atlas.token_ids.tolist(), "label": [labels[int(t)] for t in atlas.token_ids],
                              "count": atlas.token_counts.tolist()})
    kept = [set(ga.ids.tolist()) for ga in atlas.groups]
    _write_js(root, "meta", {
        **source,
        "tokens": int(st.tokens), "documents": len(atlas.docs), "groups": len(atlas.groups), "E": e,
        "experts_per_group": e * e, "heads": config.moe_heads, "layers": config.num_hidden_layers,
        "moe_groups": config.moe_groups, "group": groups_meta,
        "tokenizer": {"kind": "byte", "offset": 3} if byte else {"kind": "vocab", "name": repr(tokenizer)},
        "options": {"experts": opt.experts, "contexts": opt.contexts, "context_tokens": opt.context_tokens,
                    "tokens": opt.tokens, "token_experts": opt.token_experts},
        "indexed_tokens": int(atlas.token_ids.size),
        "expert_shard": EXPERT_SHARD, "token_shard": TOKEN_SHARD,
        "token_shards": sorted({int(t) // TOKEN_SHARD for t in atlas.token_ids}),
        "domains": [{"name": name, "selected": [int(ids.size) for ids in m.groups],
                     "kept": [len(kept[g] & set(ids.tolist())) for g, ids in enumerate(m.groups)]}
                    for name, m in masks.items()]})


def _top_tokens(atlas: Atlas, g: int) -> list[list[tuple[int, float, int]]]:
    """Per kept expert of group ``g``: (token id, summed score, occurrences) of the tokens with the most score."""
    sums = atlas.groups[g].token_sums
    best = np.argsort(-sums, axis=0, kind="stable")[:TOP_TOKENS].T
    return [[(int(atlas.token_ids[v]), _round(sums[v, n]), int(atlas.token_counts[v])) for v in best[n]
             if sums[v, n] > 0] for n in range(sums.shape[1])]


def _write_expert_shards(root: Path, atlas: Atlas, tokenizer, g: int, top_tokens, domains) -> None:
    st, ga, width = atlas.stats, atlas.groups[g], atlas.options.context_tokens
    mass_rank, freq_rank = _ranks(st.mass[g]), _ranks(st.frequency[g].astype(np.float64))
    e = st.experts
    for start in range(0, ga.ids.size, EXPERT_SHARD):
        shard = {}
        for n in range(start, min(start + EXPERT_SHARD, ga.ids.size)):
            x = int(ga.ids[n])
            shard[str(x)] = {
                "rank": n + 1, "i": x // e, "j": x % e, "mass": float(st.mass[g, x]),
                "freq": int(st.frequency[g, x]), "mass_rank": int(mass_rank[x]), "freq_rank": int(freq_rank[x]),
                "top_tokens": top_tokens[n], "domains": domains[n],
                "contexts": [_context(atlas, tokenizer, ga, n, f, width)
                             for f in np.flatnonzero(ga.contexts.doc[n] >= 0)],
            }
        _write_js(root, f"g{g}/e{start // EXPERT_SHARD:04d}", shard)


def _context(atlas: Atlas, tokenizer, ga, n: int, f: int, width: int) -> dict:
    """One top context: its pieces of text, the expert's score on each (None outside the model's window),
    and which piece is the top token."""
    doc, pos = int(ga.contexts.doc[n, f]), int(ga.contexts.position[n, f])
    toks = atlas.docs[doc]
    lo, hi = max(pos - width, 1), min(pos + width + 1, toks.size)
    near = ga.contexts.near[n, f, lo - (pos - width):hi - (pos - width)]
    return {"score": _round(ga.contexts.score[n, f]), "doc": doc, "pos": pos, "hit": pos - lo,
            "label": token_label(tokenizer, int(toks[pos])), "text": token_pieces(tokenizer, toks[lo:hi]),
            "s": [None if np.isnan(v) else round(float(v), 5) for v in near]}


def _write_token_index(root: Path, atlas: Atlas) -> None:
    """Per indexed token and group, the kept experts with the highest mean score on it: ``[id, mean]``."""
    k = atlas.options.token_experts
    shards: dict[int, dict] = {}
    best = [np.argsort(-ga.token_sums, axis=1, kind="stable")[:, :k] for ga in atlas.groups]
    for v, (t, count) in enumerate(zip(atlas.token_ids.tolist(), atlas.token_counts.tolist(), strict=True)):
        per_group = []
        for ga, order in zip(atlas.groups, best, strict=True):
            per_group.append([[int(ga.ids[n]), _round(ga.token_sums[v, n] / count)] for n in order[v]
                              if ga.token_sums[v, n] > 0])
        shards.setdefault(t // TOKEN_SHARD, {})[str(t)] = {"n": count, "g": per_group}
    for s, entries in shards.items():
        _write_js(root, f"tokens/t{s:04d}", entries)

