"""The expert lab's model side: one model, one corpus, and every question the lab's pages ask of them.

At start the corpus is streamed through the model once (:func:`~monet_jax.experts.stats.token_stats`, so mass
and frequency are exactly those of ``eval.py experts stats``), keeping each counted token's routing sparsely:
per routing group and head, the ``K`` largest probabilities of each side and their experts. An expert's score
on every corpus token (``s_ij = sum_h g1_hi g2_hj``) is then a gather, never a pass over the model, and its
co-activation with every other expert one ``[n * H, E]^T [n * H, E]`` product over the tokens it fires on.

An expert's *output direction* is input-independent, read from the weights: the vector the expert adds to the
residual stream in each layer of its routing group, summed over those layers, with every hidden unit at
activation 1 (``relu2`` units are never negative, so this is the direction of an expert whose units are equally
active). VD: ``[b1_i + sum_k V11_ik + sum_k V12_ik, b2_j + sum_k V21_jk + sum_k V22_jk]`` (the top half depends on
``i`` alone, the bottom half on ``j`` alone); HD: ``b_j + sum_k V_jk`` (``j`` alone). The tokens it promotes and
suppresses are the largest and smallest entries of ``(gamma * direction) @ lm_head``, ``gamma`` the final
RMSNorm's scale (its ``1 / rms``, a positive factor per token, left out).

No web framework is imported here: :mod:`monet_jax.eval.lab.app` serves these answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from monet_jax.data.windows import document_tokens
from monet_jax.eval.generate import Sampling, generate
from monet_jax.experts.atlas import token_label, token_pieces
from monet_jax.experts.mask import ExpertMask, apply_mask
from monet_jax.experts.microscope import token_routing
from monet_jax.experts.stats import ExpertStats, _pow2_at_least, max_active, token_stats
from monet_jax.model.pure import PureModel

MASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class LabError(ValueError):
    """A question the lab cannot answer as asked (bad id, empty text, ...): shown to the user as it is."""


@dataclass(frozen=True)
class LabOptions:
    """How much of the corpus is read and how much each page shows."""

    seq_len: int = 128          # tokens per corpus window (as every ``experts`` command windows)
    batch_size: int = 8
    max_tokens: int | None = 50_000
    contexts: int = 8           # top contexts on an expert page
    quantiles: int = 5          # score quantile bins sampled on an expert page ...
    per_quantile: int = 2       # ... and contexts shown from each
    context_tokens: int = 10    # tokens shown each side of a context
    bins: int = 20              # histogram bins over (0, max score]
    neighbours: int = 10        # nearest experts listed, by output direction and by co-activation
    logit_tokens: int = 10      # tokens promoted and suppressed
    max_new_tokens: int = 64    # the longest continuation an ablation may ask for


@dataclass
class _GroupRouting:
    """One routing group's sparse routing of every counted corpus token: ``[N, H, K]`` values and experts."""

    v1: np.ndarray
    i1: np.ndarray
    v2: np.ndarray
    i2: np.ndarray


class _RoutingCache:
    """Collects, batch by batch, the sparse routing of the tokens ``token_stats`` counts."""

    def __init__(self, groups: int):
        self.parts: list[list[tuple]] = [[] for _ in range(groups)]
        self.doc: list[np.ndarray] = []
        self.pos: list[np.ndarray] = []

    def __call__(self, batch, count, probs):
        rows, cols = np.nonzero(count)
        self.doc.append(batch.doc[rows])
        self.pos.append(batch.start[rows] + cols)
        for g, (g1, g2) in enumerate(probs):
            side = []
            for p in (g1, g2):
                k = _pow2_at_least(int(max_active(p)), p.shape[-1])
                vals, idx = jax.lax.top_k(p, k)
                side += [np.asarray(vals)[rows, cols], np.asarray(idx)[rows, cols].astype(np.int32)]
            self.parts[g].append(tuple(side))

    def finish(self, experts: int) -> tuple[list[_GroupRouting], np.ndarray, np.ndarray]:
        out = []
        for parts in self.parts:
            k = max(p[0].shape[-1] for p in parts)
            # Padded slots point at column E (dropped when a dense row is rebuilt), with probability 0.
            cols = [np.concatenate([np.pad(p[c], ((0, 0), (0, 0), (0, k - p[c].shape[-1])),
                                           constant_values=0.0 if c % 2 == 0 else experts) for p in parts])
                    for c in range(4)]
            out.append(_GroupRouting(*cols))
        return out, np.concatenate(self.doc), np.concatenate(self.pos)


def _token_nll(model, ids_bt, valid_bt):
    """Per-token next-token loss ``[b, t - 1]`` (0 where the target is padding)."""
    logits = model(ids_bt, attention_mask=valid_bt.astype(jnp.int32)).logits[:, :-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, ids_bt[:, 1:, None], axis=-1)[..., 0]
    return jnp.where(valid_bt[:, 1:], nll, 0.0)


class Lab:
    """A model, its tokenizer and a corpus, with what the lab's pages show of them.

    Args:
        model: a Monet model (inference mode); experts deleted by an ablation are restored after it.
        tokenizer: the checkpoint's tokenizer.
        documents: the corpus (strings) that expert pages, histograms and search read.
        options: bounds on the corpus read and the pages.
        out_dir: the only directory the lab writes to (saved masks go to ``out_dir/masks``).
        domain_masks: named masks (``select-domain`` / ``select-correlated`` output) offered for ablation.
    """

    def __init__(self, model, tokenizer, documents, options: LabOptions = LabOptions(), *, out_dir: str | Path,
                 domain_masks: dict[str, ExpertMask] | None = None, source: dict | None = None):
        if not model.config.is_moe:
            raise LabError("the dense baseline has no experts to inspect")
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.config = model.config
        self.E = self.config.moe_experts
        self.groups = len(model.model.routing_groups())
        self.out_dir = Path(out_dir).expanduser().resolve()
        self.source = source or {}
        self.domain_masks = dict(domain_masks or {})
        for name, mask in self.domain_masks.items():
            self._check_mask(mask, f"mask {name!r}")
        self.docs = document_tokens(tokenizer, documents, options.max_tokens)
        if not self.docs:
            raise LabError("the corpus has no tokens")
        cache = _RoutingCache(self.groups)
        self.stats: ExpertStats = token_stats(model, self.docs, pad_id=tokenizer.pad_id, seq_len=options.seq_len,
                                              batch_size=options.batch_size, squares=True, on_batch=cache,
                                              desc="lab")
        self.routing, doc, pos = cache.finish(self.E)
        self.offset = np.concatenate([[0], np.cumsum([d.size for d in self.docs])])
        if not np.array_equal(self.offset[doc] + pos, np.arange(doc.size)):
            raise AssertionError("corpus tokens were not counted once each, in order")
        self.tokens = np.concatenate(self.docs)
        self.is_first = np.zeros(self.tokens.size, bool)
        self.is_first[self.offset[:-1]] = True  # a document's bos: counted, never shown as a context
        self._directions = [self._group_directions(g) for g in range(self.groups)]

    # -- checks ------------------------------------------------------------------------------------------------
    def expert_id(self, group, ident) -> tuple[int, int]:
        """``(group, id)`` as integers in range, else a :class:`LabError` naming the valid ranges."""
        try:
            g, x = int(group), int(ident)
        except (TypeError, ValueError):
            raise LabError(f"expert {group}:{ident}: group and id must be integers") from None
        if not (0 <= g < self.groups and 0 <= x < self.E * self.E):
            raise LabError(f"unknown expert {g}:{x}: groups are 0..{self.groups - 1} and ids 0..{self.E ** 2 - 1} "
                           f"(id = i * {self.E} + j)")
        return g, x

    def text_ids(self, text: str) -> np.ndarray:
        """``bos + encode(text)``, as every command scores a document; an error if empty or past the window."""
        if not isinstance(text, str) or not text.strip():
            raise LabError("the text is empty: type something to run through the model")
        ids = np.array([self.tokenizer.bos_id, *map(int, self.tokenizer.encode(text))], np.int32)
        window = self.config.max_position_embeddings
        if ids.size > window:
            raise LabError(f"the text is {ids.size} tokens with bos; the model's window is {window}: shorten it")
        return ids

    def _check_mask(self, mask: ExpertMask, what: str) -> ExpertMask:
        if mask.experts != self.E or len(mask.groups) != self.groups:
            raise LabError(f"{what} is for {len(mask.groups)} routing groups of {mask.experts} experts; this model "
                           f"has {self.groups} of {self.E}")
        return mask

    # -- your text ---------------------------------------------------------------------------------------------
    def analyze(self, text: str, top: int = 8) -> dict:
        """Per token of ``text``: its piece and, per routing group, the number of active composed experts and
        the ``top`` of them with their exact scores (the same numbers as ``eval.py experts tokens``)."""
        ids = self.text_ids(text)
        routing = token_routing(self.model, ids)
        pieces = ["<bos>", *token_pieces(self.tokenizer, ids[1:])]
        out = []
        for t, piece, groups in zip(ids.tolist(), pieces, routing, strict=True):
            out.append({"id": t, "piece": piece, "groups": [
                {"active": int(r.expert_ids.size),
                 "top": [{"id": int(x), "i": int(x) // self.E, "j": int(x) % self.E, "score": float(s)}
                         for x, s in zip(r.expert_ids[:top], r.scores[:top], strict=True)]} for r in groups]})
        return {"tokens": out, "experts": self.E, "groups": self.groups}

    # -- an expert ---------------------------------------------------------------------------------------------
    def scores(self, g: int, x: int) -> np.ndarray:
        """Expert ``x`` of group ``g``'s score on every counted corpus token (float32 ``[N]``)."""
        r, (i, j) = self.routing[g], divmod(x, self.E)
        a = np.where(r.i1 == i, r.v1, 0.0).sum(-1)
        b = np.where(r.i2 == j, r.v2, 0.0).sum(-1)
        return (a * b).sum(-1)

    def expert(self, group, ident) -> dict:
        """Everything an expert page shows: statistics, histogram, top and quantile-sampled contexts, promoted
        and suppressed tokens, nearest experts by output direction and by co-activation."""
        g, x = self.expert_id(group, ident)
        o, st = self.options, self.stats
        s = self.scores(g, x)
        fires = s > 0
        shown = fires & ~self.is_first
        hi = float(s.max()) if fires.any() else 0.0
        counts, edges = np.histogram(s[fires], bins=o.bins, range=(0.0, hi if hi > 0 else 1.0))
        order = np.argsort(-np.where(shown, s, -np.inf), kind="stable")[:min(o.contexts, int(shown.sum()))]
        mass_rank = int((st.mass[g] > st.mass[g, x]).sum()) + 1
        return {
            "group": g, "id": x, "i": x // self.E, "j": x % self.E, "experts": self.E,
            "mass": float(st.mass[g, x]), "frequency": int(st.frequency[g, x]), "tokens": int(st.tokens),
            "density": float(st.frequency[g, x] / max(st.tokens, 1)), "mass_rank": mass_rank,
            "max_score": hi, "mean_when_active": float(s[fires].mean()) if fires.any() else 0.0,
            "histogram": {"counts": counts.tolist(), "edges": edges.tolist(), "zero": int((~fires).sum())},
            "top": [self._context(int(n), s) for n in order],
            "quantiles": self._quantile_contexts(s, shown),
            **self._logit_effect(g, x),
            "nearest_output": self._nearest_output(g, x),
            "nearest_coactivation": self._nearest_coactivation(g, x, s),
        }

    def _context(self, n: int, s: np.ndarray, label: str | None = None) -> dict:
        """Corpus token ``n`` with ``context_tokens`` each side in its document: pieces and the expert's scores."""
        d = int(np.searchsorted(self.offset, n, side="right") - 1)
        pos, w = n - int(self.offset[d]), self.options.context_tokens
        lo, hi = max(pos - w, 1), min(pos + w + 1, self.docs[d].size)
        base = int(self.offset[d])
        out = {"doc": d, "pos": pos, "hit": pos - lo, "score": float(s[n]),
               "label": token_label(self.tokenizer, int(self.tokens[n])),
               "text": token_pieces(self.tokenizer, self.docs[d][lo:hi]),
               "s": [round(float(v), 5) for v in s[base + lo:base + hi]]}
        if label is not None:
            out["quantile"] = label
        return out

    def _quantile_contexts(self, s: np.ndarray, shown: np.ndarray) -> list[dict]:
        """``per_quantile`` contexts from each of ``quantiles`` equal-count bins of the expert's positive scores,
        evenly spaced inside the bin (deterministic), lowest bin first."""
        o = self.options
        where = np.flatnonzero(shown)
        if not where.size:
            return []
        ranked = where[np.argsort(s[where], kind="stable")]
        out = []
        for q in range(o.quantiles):
            lo, hi = q * ranked.size // o.quantiles, (q + 1) * ranked.size // o.quantiles
            if hi <= lo:
                continue
            label = f"{100 * q // o.quantiles}-{100 * (q + 1) // o.quantiles}%"
            picks = sorted({lo + int((k + 0.5) * (hi - lo) / o.per_quantile) for k in range(o.per_quantile)})
            out += [self._context(int(ranked[p]), s, label) for p in picks]
        return out

    def _group_directions(self, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(P [E, dp], Q [E, dq], gamma_P, gamma_Q)``: expert ``(i, j)``'s output direction is
        ``concat(P_i, Q_j)`` (module docstring), summed over the group's layers; HD has ``dp = 0``."""
        layers = self.model.model.routing_groups()[g]
        e = self.E
        gamma = np.asarray(self.model.model.norm.weight[...], np.float64)
        rows = lambda dense: np.asarray(dense.kernel[...], np.float64).reshape(e, -1, dense.kernel.shape[-1]).sum(1)
        p = q = 0.0
        for layer in layers:
            m = layer.moe
            if self.config.moe_decompose == "vertical":
                p = p + np.asarray(m.b1[...], np.float64) + rows(m.v11) + rows(m.v12)
                q = q + np.asarray(m.b2[...], np.float64) + rows(m.v21) + rows(m.v22)
            else:
                p = np.zeros((e, 0))
                q = q + np.asarray(m.b[...], np.float64) + rows(m.v)
        return p, q, gamma[:p.shape[1]], gamma[p.shape[1]:]

    def _logit_effect(self, g: int, x: int) -> dict:
        p, q, gp, gq = self._directions[g]
        i, j = divmod(x, self.E)
        head = np.asarray(self.model.lm_head.kernel[...], np.float64)  # [d, V]
        effect = (gp * p[i]) @ head[:p.shape[1]] + (gq * q[j]) @ head[p.shape[1]:]
        effect = effect[:min(effect.size, self.tokenizer.vocab_size)]  # rows past the tokenizer: padding, no token
        k = self.options.logit_tokens
        order = np.argsort(-effect, kind="stable")
        item = lambda t: {"token": int(t), "label": token_label(self.tokenizer, int(t)), "logit": float(effect[t])}
        return {"promoted": [item(t) for t in order[:k]], "suppressed": [item(t) for t in order[::-1][:k]]}

    def _nearest(self, g: int, x: int, sim: np.ndarray, key: str) -> list[dict]:
        """The experts with the highest ``sim`` (``[E*E]``) among those active in the corpus, ``x`` left out;
        ties by mass."""
        mass = self.stats.mass[g]
        ok = (self.stats.frequency[g] > 0) & np.isfinite(sim)
        ok[x] = False
        cand = np.flatnonzero(ok)
        cand = cand[np.lexsort((-mass[cand], -sim[cand]))][:self.options.neighbours]
        return [{"id": int(y), "i": int(y) // self.E, "j": int(y) % self.E, key: float(sim[y])} for y in cand]

    def _nearest_output(self, g: int, x: int) -> list[dict]:
        """By cosine similarity of output directions (module docstring)."""
        p, q, _, _ = self._directions[g]
        i, j = divmod(x, self.E)
        dot = (p @ p[i])[:, None] + (q @ q[j])[None, :]
        norm = np.sqrt((p * p).sum(1)[:, None] + (q * q).sum(1)[None, :])
        own = np.sqrt(p[i] @ p[i] + q[j] @ q[j])
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where(norm * own > 0, dot / (norm * own), np.nan).reshape(-1)
        return self._nearest(g, x, cos, "cosine")

    def dense_routing(self, g: int, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ``[len(n), H, E]`` routing probabilities ``(g1, g2)`` of corpus tokens ``n``, rebuilt."""
        r = self.routing[g]
        out = []
        for v, i in ((r.v1, r.i1), (r.v2, r.i2)):
            dense = np.zeros((*v[n].shape[:2], self.E + 1), np.float32)
            np.put_along_axis(dense, i[n].astype(np.int64), v[n], axis=-1)
            out.append(dense[..., :self.E])
        return out[0], out[1]

    def _pair_sums(self, g: int, n: np.ndarray, w: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """``sum_t w_t s_tij`` over corpus tokens ``n`` for every composed expert: ``[E*E]`` float64."""
        total = np.zeros((self.E, self.E), np.float64)
        for c in range(0, n.size, chunk):
            g1, g2 = self.dense_routing(g, n[c:c + chunk])
            a = (g1 * w[c:c + chunk, None, None]).reshape(-1, self.E)
            total += a.T.astype(np.float64) @ g2.reshape(-1, self.E)
        return total.reshape(-1)

    def _nearest_coactivation(self, g: int, x: int, s: np.ndarray) -> list[dict]:
        """By cosine similarity of score vectors over the corpus tokens: ``sum_t s_x s_y / |s_x| |s_y|``."""
        n = np.flatnonzero(s > 0)
        if not n.size:
            return []
        co = self._pair_sums(g, n, s[n].astype(np.float32))
        square = self.stats.square[g]
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where(square > 0, co / np.sqrt(square * float((s.astype(np.float64) ** 2).sum())), np.nan)
        return self._nearest(g, x, np.where(cos > 0, cos, np.nan), "cosine")  # only experts it fires with

    # -- search ------------------------------------------------------------------------------------------------
    def search(self, text: str, top: int = 10) -> dict:
        """The experts with the highest mean score on the last token of every occurrence of ``text``'s tokens in
        the corpus, per routing group."""
        if not isinstance(text, str) or not text:
            raise LabError("type a word or a piece of text to search the corpus for")
        seq = np.array(list(map(int, self.tokenizer.encode(text))), np.int32)
        if not seq.size:
            raise LabError(f"{text!r} has no tokens")
        hits = []
        for d, toks in enumerate(self.docs):
            if toks.size > seq.size:
                win = np.lib.stride_tricks.sliding_window_view(toks[1:], seq.size)
                starts = np.flatnonzero((win == seq).all(axis=1)) + 1
                hits.append(self.offset[d] + starts + seq.size - 1)
        n = np.concatenate(hits) if hits else np.zeros(0, np.int64)
        if not n.size:
            raise LabError(f"{text!r} does not occur in the corpus ({int(self.stats.tokens):,} tokens)")
        groups = []
        for g in range(self.groups):
            mean = self._pair_sums(g, n, np.ones(n.size, np.float32)) / n.size
            best = np.argsort(-mean, kind="stable")[:top]
            groups.append([{"id": int(y), "i": int(y) // self.E, "j": int(y) % self.E, "mean": float(mean[y])}
                           for y in best if mean[y] > 0])
        return {"text": text, "occurrences": int(n.size), "tokens": int(seq.size), "groups": groups}

    # -- ablation ----------------------------------------------------------------------------------------------
    def mask(self, experts=(), masks=()) -> ExpertMask:
        """The union of ``experts`` (``[group, id]`` pairs) and the named masks (domain masks given at start,
        or masks saved in ``out_dir/masks``)."""
        per = [set() for _ in range(self.groups)]
        if not isinstance(experts, list | tuple):
            raise LabError(f"experts is a list of [group, id] pairs or 'GROUP:ID' strings, got {experts!r}")
        for pair in experts:
            if isinstance(pair, str) and pair.count(":") == 1:
                pair = pair.split(":")
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise LabError(f"an expert is [group, id] or 'GROUP:ID', got {pair!r}")
            g, x = self.expert_id(*pair)
            per[g].add(x)
        out = ExpertMask(self.E, [sorted(p) for p in per], {"source": "expert lab"})
        if isinstance(masks, str) or not isinstance(masks, list | tuple):
            raise LabError(f"masks is a list of mask names, got {masks!r}")
        for name in masks:
            out = out.union(self.load_mask(name))
        if not out.count:
            raise LabError("no experts chosen: add experts by id, search or domain mask")
        return out

    def load_mask(self, name: str) -> ExpertMask:
        if name in self.domain_masks:
            return self.domain_masks[name]
        path = self._mask_path(name)
        if not path.is_file():
            known = sorted([*self.domain_masks, *self.saved_masks()])
            raise LabError(f"no mask named {name!r}" + (f" (known: {', '.join(known)})" if known else ""))
        return self._check_mask(ExpertMask.load(path), f"mask {name!r}")

    def saved_masks(self) -> list[str]:
        d = self.out_dir / "masks"
        return sorted(p.stem for p in d.glob("*.json") if MASK_NAME.match(p.stem)) if d.is_dir() else []

    def _mask_path(self, name: str) -> Path:
        if not isinstance(name, str) or not MASK_NAME.match(name) or name.endswith(".json"):
            raise LabError(f"mask name {name!r}: use letters, digits, '-', '_' and '.' (at most 64, no path)")
        return self.out_dir / "masks" / f"{name}.json"

    def save_mask(self, name: str, mask: ExpertMask) -> Path:
        """Write ``mask`` as ``out_dir/masks/NAME.json`` (read by ``eval.py --mask`` and ``monet-lm-eval``)."""
        path = self._mask_path(name)
        mask.meta = {**mask.meta, **self.source, "name": name}
        tmp = path.with_name(f".{path.name}.tmp")
        mask.save(tmp)
        tmp.replace(path)
        return path

    def token_losses(self, ids: np.ndarray) -> np.ndarray:
        """Next-token loss of every token after bos (float64 ``[len(ids) - 1]``), the row padded to a power of
        two so that texts of similar lengths share one compilation."""
        t = max(8, 1 << (ids.size - 1).bit_length())
        row = np.full((1, t), self.tokenizer.pad_id, np.int32)
        row[0, :ids.size] = ids
        valid = np.arange(t)[None] < ids.size
        nll = PureModel(self.model).jit(_token_nll)(jnp.asarray(row), jnp.asarray(valid))
        return np.asarray(nll, np.float64)[0, :ids.size - 1]

    def continuation(self, ids: np.ndarray, new_tokens: int, sampling, seed: int) -> dict:
        res = generate(self.model, [ids.tolist()], max_new_tokens=new_tokens, eos_id=self.tokenizer.eos_ids,
                       pad_id=self.tokenizer.pad_id, sampling=sampling, seed=seed)
        new = [int(t) for t in res["tokens"][0]]
        stops = set(self.tokenizer.eos_ids)
        end = next((k + 1 for k, t in enumerate(new) if t in stops), len(new))
        return {"ids": new[:end], "text": self.decode(new[:end])}

    def decode(self, ids: list[int]) -> str:
        """``ids`` as text; an id past the tokenizer's (a model whose vocabulary is padded) shows as ``<id N>``."""
        out, run = [], []
        for t in ids:
            if 0 <= t < self.tokenizer.vocab_size:
                run.append(t)
                continue
            out += [self.tokenizer.decode(run), f"<id {t}>"]
            run = []
        return "".join(out) + self.tokenizer.decode(run)

    def ablate(self, text: str, mask: ExpertMask, *, new_tokens: int = 24, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> dict:
        """``text`` before and after deleting ``mask``'s experts: per-token loss, mean loss (as ``eval.py
        perplexity`` scores the text as one document) and a continuation (greedy, or sampled with ``seed``)."""
        ids = self.text_ids(text)
        if ids.size < 2:
            raise LabError("the text needs at least one token after bos to score")
        if not 1 <= int(new_tokens) <= self.options.max_new_tokens:
            raise LabError(f"new tokens must be in 1..{self.options.max_new_tokens}, got {new_tokens}")
        if ids.size + int(new_tokens) > self.config.max_position_embeddings:
            raise LabError(f"{ids.size} tokens of text and {new_tokens} new ones pass the model's window of "
                           f"{self.config.max_position_embeddings}")
        try:
            sampling = Sampling(float(temperature), int(top_k), float(top_p))
        except (TypeError, ValueError):
            raise LabError("temperature, top-k and top-p must be numbers") from None
        self._check_mask(mask, "the mask")
        runs = {}
        for name, chosen in (("before", None), ("after", mask)):
            apply_mask(self.model, chosen)
            try:
                losses = self.token_losses(ids)
                runs[name] = {"losses": losses.tolist(), "loss": float(losses.mean()),
                              "continuation": self.continuation(ids, int(new_tokens), sampling, int(seed))}
            finally:
                apply_mask(self.model, None)
        pieces = token_pieces(self.tokenizer, ids[1:])
        return {"pieces": pieces, **runs, "deleted": mask.count,
                "deleted_per_group": [int(ids_.size) for ids_ in mask.groups]}
