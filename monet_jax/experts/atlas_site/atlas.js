// The atlas runtime shared by its pages: on-demand data files, safe DOM building, tokenizing and search.
// Data files are scripts calling atlas.add(key, value): pages opened from disk (file://) cannot fetch().
// Corpus text only ever reaches the page as text nodes (textContent), never as HTML.
"use strict";

var atlas = {
  data: {},
  pending: {},

  add(key, value) { this.data[key] = value; },

  // Promise of data/KEY.js's value; each file is loaded once.
  load(key) {
    if (key in this.data) return Promise.resolve(this.data[key]);
    if (!(key in this.pending)) {
      this.pending[key] = new Promise((resolve, reject) => {
        const s = document.createElement("script");
        s.charset = "utf-8";
        s.src = "data/" + key + ".js";
        s.onload = () => key in atlas.data ? resolve(atlas.data[key])
          : reject(new Error("data file " + s.src + " holds no " + key));
        s.onerror = () => reject(new Error("missing data file data/" + key + ".js"));
        document.head.appendChild(s);
      });
    }
    return this.pending[key];
  },

  meta() { return this.data.meta; },

  // A group's kept experts with a Map from expert id to its position (mass rank - 1).
  async group(g) {
    const ix = await this.load("g" + g + "/index");
    if (!ix.pos) ix.pos = new Map(ix.id.map((x, n) => [x, n]));
    return ix;
  },

  async expert(g, id) {
    const ix = await this.group(g);
    const n = ix.pos.get(id);
    if (n === undefined) return null;
    const shard = await this.load("g" + g + "/e" + pad4(Math.floor(n / this.meta().expert_shard)));
    return shard[String(id)];
  },

  // The token-index entries of token ids ({n, g: per group [[id, mean], ...]}), undefined when not indexed.
  async tokenEntries(ids) {
    const m = this.meta(), out = new Map();
    const shards = new Set(ids.filter(t => t !== null).map(t => Math.floor(t / m.token_shard)));
    for (const s of shards) {
      if (!m.token_shards.includes(s)) continue;
      const entries = await this.load("tokens/t" + pad4(s));
      for (const t of ids) if (t !== null && Math.floor(t / m.token_shard) === s) out.set(t, entries[String(t)]);
    }
    return out;
  },

  label(id) {
    if (!this.labels) {
      const v = this.data.vocab;
      this.labels = new Map(v.id.map((t, n) => [t, v.label[n]]));
    }
    const s = this.labels.get(id);
    return s === undefined ? "<id " + id + ">" : s;
  },

  // Text -> [{id, piece}]: exact for the byte tokenizer (UTF-8 bytes); otherwise the longest indexed token
  // at each position, an approximation of the real tokenizer.
  tokenize(text) {
    const tk = this.meta().tokenizer;
    if (tk.kind === "byte") {
      const bytes = new TextEncoder().encode(text), dec = new TextDecoder("utf-8");
      return Array.from(bytes, b => ({id: b + tk.offset, piece: dec.decode(Uint8Array.of(b), {stream: true})}));
    }
    if (!this.byLabel) {
      const v = this.data.vocab;
      this.byLabel = new Map();
      v.label.forEach((s, n) => { if (s && !/^<(0x[0-9A-F]{2}|id \d+)>$/.test(s)) this.byLabel.set(s, v.id[n]); });
      this.longest = Math.max(1, ...Array.from(this.byLabel.keys(), s => s.length));
    }
    const out = [];
    for (let i = 0; i < text.length;) {
      let len = Math.min(this.longest, text.length - i);
      while (len > 0 && !this.byLabel.has(text.substr(i, len))) len--;
      if (len === 0) { out.push({id: null, piece: text[i]}); i++; continue; }
      out.push({id: this.byLabel.get(text.substr(i, len)), piece: text.substr(i, len)});
      i += len;
    }
    return out;
  },

  // Per group, the experts with the highest mean score summed over the text's tokens: [[id, score], ...].
  async search(text, limit) {
    const toks = this.tokenize(text), entries = await this.tokenEntries(toks.map(t => t.id));
    const groups = [];
    for (let g = 0; g < this.meta().groups; g++) {
      const total = new Map();
      for (const t of toks) {
        const e = entries.get(t.id);
        if (e) for (const [id, mean] of e.g[g]) total.set(id, (total.get(id) || 0) + mean);
      }
      groups.push([...total.entries()].sort((a, b) => b[1] - a[1] || a[0] - b[0]).slice(0, limit));
    }
    return {tokens: toks, missing: toks.filter(t => !entries.get(t.id)).length, groups};
  },
};

function pad4(n) { return String(n).padStart(4, "0"); }

// Build an element; string children become text nodes (never parsed as HTML).
function el(tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children.flat(Infinity)) if (c !== undefined && c !== null) e.append(c instanceof Node ? c : String(c));
  return e;
}

function expertHref(g, id) { return "expert.html?g=" + Number(g) + "&id=" + Number(id); }

function expertLink(g, id) { return el("a", {href: expertHref(g, id), class: "mono"}, g + ":" + id); }

// A token's text with its whitespace made visible (for labels, not for running text).
function visible(s) { return s.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); }

function tokenChip(s) { return el("span", {class: "tok"}, visible(s)); }

// One format per kind of number, so that a column reads alike on every row. Sums of scores (mass, a token's
// total score): thousands separators and one decimal. Counts: separators. Scores and mean scores: three
// decimals (three significant digits below 0.1), trailing zeros kept, so an exact 1 shows as 1.000 and not as
// a rounded-off 1. Shares: percent with two decimals.
function sum1(x) { return Number(x).toLocaleString("en", {minimumFractionDigits: 1, maximumFractionDigits: 1}); }

function count(n) { return Number(n).toLocaleString("en"); }

function score(x) {
  const v = Number(x);
  return v === 0 ? "0" : Math.abs(v) >= 0.1 ? v.toFixed(3) : v.toPrecision(3);
}

function pct(x) { return x > 0 && x < 0.0001 ? "<0.01%" : (100 * x).toFixed(2) + "%"; }

function shade(score, top) {
  const a = top > 0 ? Math.min(Math.max(score / top, 0), 1) : 0;
  return "background: rgba(230, 80, 0, " + a.toFixed(3) + ")";
}

function params() { return new URLSearchParams(location.search); }

function showError(where, err) {
  where.replaceChildren(el("div", {class: "error"}, String(err && err.message || err)));
}

// The header every page shares: title, what was measured, navigation.
function header(title) {
  const m = atlas.meta();
  return [
    el("nav", {}, el("a", {href: "index.html"}, "Experts"), el("a", {href: "text.html"}, "Text box")),
    el("h1", {}, title),
    el("div", {class: "meta"}, "checkpoint ", el("code", {}, m.checkpoint), " \u00b7 corpus ", el("code", {}, m.corpus),
       " \u00b7 " + count(m.tokens) + " tokens in " + count(m.documents) + " documents \u00b7 " +
       m.groups + " routing groups of " + count(m.experts_per_group) + " composed experts (id = i \u00d7 " +
       m.E + " + j; score s_ij = \u03a3_h g1_hi g2_hj)"),
  ];
}
