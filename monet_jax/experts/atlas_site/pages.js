// The three pages of the atlas: the ranked experts with search, one expert, and the text box.
"use strict";

const PAGE_ROWS = 100;

function intParam(p, name, lo, hi) {
  const s = p.get(name);
  if (s === null || !/^\d+$/.test(s)) return null;
  const v = Number(s);
  return v >= lo && v <= hi ? v : null;
}

// Wrap an async renderer that returns a function showing its result: only the latest call's result is
// shown (an earlier one finishing later is dropped), and an error is shown in `where`.
function latest(renderer, where) {
  let calls = 0;
  return async () => {
    const mine = ++calls;
    try {
      const commit = await renderer();
      if (mine === calls) commit();
    } catch (err) {
      if (mine === calls) showError(where, err);
    }
  };
}

async function run(page) {
  const root = document.getElementById("app");
  try {
    if (!atlas.meta()) throw new Error("data/meta.js did not load: open this page inside the atlas directory");
    await page(root);
  } catch (err) {
    root.append(el("div", {class: "error"}, String(err && err.message || err)));
  }
  document.body.dataset.ready = "1";  // the page has rendered (what scripted checks wait for)
}

// ---------------------------------------------------------------------------------------------- index

async function indexPage(root) {
  const m = atlas.meta(), p = params();
  const state = {g: intParam(p, "g", 0, m.groups - 1) || 0, sort: p.get("sort") === "freq" ? "freq" : "mass",
                 page: 0, dom: -1};
  root.append(...header("Monet expert atlas"));
  root.append(el("p", {class: "meta"}, "Per routing group, the " + count(m.options.experts) +
    " composed experts with the most mass (their summed score over the corpus) at most; frequency is the number " +
    "of tokens on which an expert's score is above zero. Top tokens: the tokens on which it has the most total score."));

  const q = el("input", {type: "search", id: "q", autocomplete: "off",
                         placeholder: "a token or text, or an expert: G:ID or ID"});
  const results = el("div", {id: "results", class: "results"});
  let timer = null, target = null;
  const update = latest(async () => {
    const box = el("div"), t = await showSearch(q.value, box);
    return () => { results.replaceChildren(...box.childNodes); target = t; };
  }, results);
  q.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(update, 150); });
  q.addEventListener("keydown", async ev => {
    if (ev.key !== "Enter") return;
    clearTimeout(timer);
    await update();
    if (target) location.href = target;
  });
  root.append(el("h2", {}, "Search"), q, results);

  const tabs = el("div", {class: "controls", id: "groups"});
  const sorts = el("div", {class: "controls"});
  const domSel = el("select", {id: "domain"}, el("option", {value: "-1"}, "all experts"),
                    m.domains.map((d, n) => el("option", {value: String(n)}, "domain: " + d.name)));
  domSel.addEventListener("change", () => { state.dom = Number(domSel.value); state.page = 0; render(); });
  const summary = el("div", {class: "meta", id: "summary"});
  const pager = el("div", {class: "pager"});
  const table = el("table", {id: "experts"});
  root.append(el("h2", {}, "Experts"), tabs, sorts, summary, pager, table);

  function button(text, on, click, id) {
    return el("button", {class: on ? "on" : "", id, onclick: click}, text);
  }

  let renders = 0;
  async function render() {
    const ticket = ++renders;
    tabs.replaceChildren("Group", ...Array.from({length: m.groups}, (_, g) => button(String(g), g === state.g,
      () => { state.g = g; state.page = 0; render(); }, "group-" + g)));
    sorts.replaceChildren("Rank by", button("mass", state.sort === "mass", () => { state.sort = "mass"; render(); }, "by-mass"),
      button("frequency", state.sort === "freq", () => { state.sort = "freq"; render(); }, "by-freq"),
      m.domains.length ? domSel : "");
    const ix = await atlas.group(state.g), gm = m.group[state.g];
    if (ticket !== renders) return;  // a later click has taken over
    let rows = ix.id.map((_, n) => n);
    if (state.sort === "freq") rows.sort((a, b) => ix.freq[b] - ix.freq[a] || a - b);
    if (state.dom >= 0) rows = rows.filter(n => ix.dom[n].includes(state.dom));
    summary.replaceChildren("Group " + state.g + ": " + count(gm.active) + " of " +
      count(m.experts_per_group) + " composed experts active at least once; " +
      count(gm.kept) + " kept here" + (state.dom >= 0 ? ", " + rows.length + " of them in " +
      m.domains[state.dom].name : "") + ".");
    const pages = Math.max(1, Math.ceil(rows.length / PAGE_ROWS));
    state.page = Math.min(state.page, pages - 1);
    pager.replaceChildren(button("\u2039 prev", false, () => { state.page = Math.max(0, state.page - 1); render(); }),
      " rows " + (rows.length ? state.page * PAGE_ROWS + 1 : 0) + "\u2013" +
      Math.min(rows.length, (state.page + 1) * PAGE_ROWS) + " of " + rows.length + " ",
      button("next \u203a", false, () => { state.page = Math.min(pages - 1, state.page + 1); render(); }));
    const head = el("tr", {}, ["#", "expert", "i, j", "mass", "share", "mean / token", "frequency", "of tokens"]
      .map(h => el("th", {class: h === "expert" || h === "i, j" ? "" : "num"}, h)),
      m.domains.length ? el("th", {}, "domains") : null, el("th", {}, "top tokens"));
    const body = rows.slice(state.page * PAGE_ROWS, (state.page + 1) * PAGE_ROWS).map((n, k) => {
      const id = ix.id[n];
      return el("tr", {"data-id": String(id)},
        el("td", {class: "num"}, String(state.page * PAGE_ROWS + k + 1)),
        el("td", {}, expertLink(state.g, id)),
        el("td", {class: "mono"}, Math.floor(id / m.E) + ", " + (id % m.E)),
        el("td", {class: "num"}, sum1(ix.mass[n])),
        el("td", {class: "num"}, pct(ix.mass[n] / gm.total_mass)),
        el("td", {class: "num"}, score(ix.mass[n] / m.tokens)),
        el("td", {class: "num"}, count(ix.freq[n])),
        el("td", {class: "num"}, pct(ix.freq[n] / m.tokens)),
        m.domains.length ? el("td", {}, ix.dom[n].map(d => el("span", {class: "dom"}, m.domains[d].name))) : null,
        el("td", {}, ix.top[n].map(t => tokenChip(atlas.label(t)))));
    });
    table.replaceChildren(head, ...body);
  }

  await render();
  if (p.get("q")) { q.value = p.get("q"); await update(); }
}

// Search results for a query; returns the expert page to open on Enter, if the query names one.
async function showSearch(text, out) {
  const m = atlas.meta();
  out.replaceChildren();
  if (!text) return null;
  let target = null;
  const pair = /^\s*(\d+)\s*:\s*(\d+)\s*$/.exec(text);
  if (pair) {
    const g = Number(pair[1]), id = Number(pair[2]);
    if (g >= m.groups || id >= m.experts_per_group) {
      out.append(el("div", {class: "error"}, "no expert " + g + ":" + id + " (groups 0.." + (m.groups - 1) +
        ", ids 0.." + (m.experts_per_group - 1) + ")"));
      return null;
    }
    out.append(el("div", {}, "Expert ", expertLink(g, id), " (Enter opens it)"));
    return expertHref(g, id);
  }
  const single = /^\s*(\d+)\s*$/.exec(text);
  if (single) {
    const id = Number(single[1]), found = [];
    for (let g = 0; g < m.groups; g++) if ((await atlas.group(g)).pos.has(id)) found.push(g);
    if (found.length) {
      out.append(el("div", {id: "id-results"}, "Expert id " + id + " in group ", found.map((g, k) =>
        [k ? ", " : "", expertLink(g, id)]), " (Enter opens the first)"));
      target = expertHref(found[0], id);
    }
  }
  const r = await atlas.search(text, 10);
  out.append(el("div", {class: "meta"}, "Tokens: ", r.tokens.slice(0, 40).map(t => tokenChip(t.piece)),
    r.tokens.length > 40 ? " \u2026" : "", r.missing ? " (" + r.missing + " not in the token index)" : "",
    " \u2014 experts ranked by their mean score on these tokens over the corpus"));
  const rows = [];
  r.groups.forEach((list, g) => list.forEach(([id, mean], k) => rows.push(el("tr", {"data-g": String(g),
    "data-id": String(id)}, el("td", {class: "num"}, k ? "" : "group " + g), el("td", {}, expertLink(g, id)),
    el("td", {class: "num"}, score(mean))))));
  out.append(rows.length ? el("table", {id: "search-results"}, el("tr", {}, el("th", {class: "num"}, "group"),
    el("th", {}, "expert"), el("th", {class: "num"}, "mean score")), rows)
    : el("div", {class: "meta"}, "no expert of the atlas fires on these tokens"));
  return target;
}

// ---------------------------------------------------------------------------------------------- expert

async function expertPage(root) {
  const m = atlas.meta(), p = params();
  const g = intParam(p, "g", 0, m.groups - 1), id = intParam(p, "id", 0, m.experts_per_group - 1);
  if (g === null || id === null) {
    root.append(...header("Expert"), el("div", {class: "error"}, "expert.html?g=GROUP&id=ID with a group in 0.." +
      (m.groups - 1) + " and an id in 0.." + (m.experts_per_group - 1)));
    return;
  }
  document.title = "Group " + g + " / Expert " + id;
  root.append(...header("Group " + g + " / Expert " + id + "  (i = " + Math.floor(id / m.E) + ", j = " + (id % m.E) + ")"));
  const x = await atlas.expert(g, id);
  if (!x) {
    root.append(el("div", {class: "note", id: "not-kept"}, "Expert " + g + ":" + id + " is not among the " +
      count(m.group[g].kept) + " experts kept for group " + g + " (those with the most mass; --experts " +
      "sets how many). `eval.py experts view CHECKPOINT --expert " + g + ":" + id + " --text TEXT --data CORPUS` " +
      "shows any expert."));
    return;
  }
  const gm = m.group[g];
  const stat = (k, ...v) => el("tr", {}, el("td", {}, k), el("td", {class: "mono"}, ...v));
  root.append(el("table", {class: "stats", id: "stats"},
    stat("mass (summed score)", sum1(x.mass) + "  (rank " + count(x.mass_rank) + " of " +
      count(m.experts_per_group) + ")"),
    stat("share of the group's mass", pct(x.mass / gm.total_mass)),
    stat("mean score per token", score(x.mass / m.tokens)),
    stat("frequency (tokens with s > 0)", count(x.freq) + " = " + pct(x.freq / m.tokens) +
      " of tokens  (rank " + count(x.freq_rank) + ")"),
    stat("domains", x.domains.length ? x.domains.map(d => el("span", {class: "dom"}, m.domains[d].name))
      : (m.domains.length ? "none of " + m.domains.map(d => d.name).join(", ") : "no selection masks given"))));

  root.append(el("h2", {}, "Top tokens"), el("p", {class: "meta"}, "the tokens on which it has the most total score " +
    "(among the " + count(m.indexed_tokens) + " most frequent tokens)"));
  root.append(el("table", {id: "top-tokens"}, el("tr", {}, el("th", {}, "token"), el("th", {class: "num"}, "total score"),
    el("th", {class: "num"}, "occurrences"), el("th", {class: "num"}, "mean score")),
    x.top_tokens.map(([t, total, n]) => el("tr", {}, el("td", {}, tokenChip(atlas.label(t))),
      el("td", {class: "num"}, sum1(total)), el("td", {class: "num"}, count(n)),
      el("td", {class: "num"}, score(total / n))))));

  const top = x.contexts.length ? x.contexts[0].score : 0;
  const ties = x.contexts.filter(c => c.score === top).length;
  root.append(el("h2", {}, "Top-activating contexts"), el("div", {class: "legend meta", id: "legend"}, "score 0 ",
    [0.1, 0.25, 0.5, 0.75, 1].map(f => el("span", {style: shade(f * top, top)})), " " + score(top) +
    "; the top token is outlined; grey text lies outside the window the model read (not scored there)" +
    (ties > 1 ? "; " + ties + " contexts tie at " + score(top) + (top === 1 ? " (a head that routes the token to i " +
      "alone and to j alone gives a score of 1 by itself)" : "") : "")));
  const rows = x.contexts.map((c, k) => el("tr", {}, el("td", {class: "num"}, String(k + 1)),
    el("td", {class: "num"}, score(c.score)), el("td", {class: "num meta"}, "doc " + c.doc + " @" + c.pos),
    el("td", {class: "ctx"}, c.text.map((piece, n) => {
      const s = c.s[n], text = oneLine(n === c.hit && !piece ? c.label : piece);
      return el("span", {class: (s === null ? "out" : "shade") + (n === c.hit ? " hit" : ""),
        style: s === null ? null : shade(s, top), title: s === null ? "outside the window" : score(s)}, text);
    }))));
  root.append(el("table", {id: "contexts"}, el("tr", {}, el("th", {class: "num"}, "#"), el("th", {class: "num"}, "score"),
    el("th", {class: "num"}, "where"), el("th", {}, "context")),
    rows.length ? rows : el("tr", {}, el("td", {colspan: "4"}, "no contexts"))));
}

function oneLine(s) { return s.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); }

// ---------------------------------------------------------------------------------------------- text box

const TEXT_TOKENS = 400;

async function textPage(root) {
  const m = atlas.meta(), p = params();
  root.append(...header("Text box"));
  const exact = m.tokenizer.kind === "byte";
  root.append(el("div", {class: "note", id: "caveat"},
    el("b", {}, "This page does not run the model. "),
    "For each token of your text it looks up precomputed, context-free averages: the experts (of the " +
    count(m.options.experts) + " kept per group) with the highest mean score on that token over the " +
    "corpus, for the " + count(m.indexed_tokens) + " most frequent tokens. The model routes every token " +
    "by its context, so the experts that really fire on your text can differ. For exact per-context scores run ",
    el("code", {}, "python eval.py experts tokens CHECKPOINT --text \"...\""), ". ",
    exact ? "Tokenization is exact (the byte tokenizer: one token per UTF-8 byte)."
      : "Tokenization here is approximate: the longest indexed token at each position, not the real tokenizer."));
  const box = el("textarea", {id: "text", placeholder: "paste text here", spellcheck: "false"});
  const groupSel = el("select", {id: "group"}, el("option", {value: "-1"}, "all groups"),
    Array.from({length: m.groups}, (_, g) => el("option", {value: String(g)}, "group " + g)));
  const out = el("div", {id: "tokens"});
  root.append(box, el("div", {class: "controls"}, "Experts of ", groupSel,
    " (per token, the 3 with the highest mean score on it)"), out);
  let timer = null;
  const render = latest(async () => {
    const table = el("div");
    await show(box.value, Number(groupSel.value), table);
    return () => out.replaceChildren(...table.childNodes);
  }, out);
  const update = () => { clearTimeout(timer); timer = setTimeout(render, 150); };
  box.addEventListener("input", update);
  groupSel.addEventListener("change", update);
  if (p.get("text")) { box.value = p.get("text"); await render(); }
}

async function show(text, only, out) {
  const m = atlas.meta();
  const toks = atlas.tokenize(text).slice(0, TEXT_TOKENS);
  const entries = await atlas.tokenEntries(toks.map(t => t.id));
  const groups = only >= 0 ? [only] : Array.from({length: m.groups}, (_, g) => g);
  const head = el("tr", {}, el("th", {}, "token"), el("th", {class: "num"}, "corpus count"),
    groups.map(g => el("th", {}, "group " + g + ": expert (mean score)")));
  const rows = toks.map((t, n) => {
    const e = entries.get(t.id);
    return el("tr", {"data-token": String(n)}, el("td", {}, tokenChip(t.piece)),
      el("td", {class: "num"}, e ? count(e.n) : "\u2014"),
      groups.map(g => el("td", {}, !e ? el("span", {class: "meta"}, "not in the token index")
        : e.g[g].slice(0, 3).map(([id, mean], k) => [k ? ", " : "", expertLink(g, id), " (" + score(mean) + ")"]))));
  });
  out.replaceChildren(text ? el("table", {id: "token-table"}, head, rows) : "",
    atlas.tokenize(text).length > TEXT_TOKENS ? el("p", {class: "meta"}, "first " + TEXT_TOKENS + " tokens shown") : "");
}
