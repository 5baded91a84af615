// The expert lab's pages: each asks the lab's /api (one model, requests queued in order) and builds its content
// with DOM nodes; text from the model or the corpus only ever reaches the page as text nodes, never as HTML.
"use strict";

class LabError extends Error {}

const lab = {
  pending: 0,
  status: null,

  // POST body (or GET without one) to /api/PATH; the lab's one-line message becomes a LabError.
  async api(path, body) {
    this.pending++;
    this.watch();
    try {
      const r = await fetch("/api/" + path, body === undefined ? {} :
        {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
      let data = null;
      try { data = await r.json(); } catch (e) { data = null; }
      if (!r.ok) throw new LabError((data && data.error) || ("the lab answered " + r.status + " " + r.statusText));
      return data;
    } finally {
      this.pending--;
    }
  },

  // While a request waits or the model loads, say what the lab is doing (polling /api/status).
  async watch() {
    if (this.watching) return;
    this.watching = true;
    const bar = document.getElementById("status");
    try {
      for (;;) {
        const s = await (await fetch("/api/status")).json();
        this.status = s;
        const loading = s.state === "loading";
        if (s.state === "error") {
          bar.hidden = false;
          bar.textContent = "The model could not be loaded: " + s.error;
          return;
        }
        if (!loading && this.pending === 0) { bar.hidden = true; return; }
        bar.hidden = false;
        bar.textContent = loading ? "Loading: " + s.message + " (" + s.seconds.toFixed(0) + " s) \u2014 requests wait " +
          "until the model is ready" : s.running ? "Computing: " + s.running + " (" + s.seconds.toFixed(1) + " s)" +
          (s.waiting ? ", " + s.waiting + " more waiting" : "") : "Waiting for the lab\u2026";
        await new Promise(res => setTimeout(res, 300));
      }
    } catch (e) {
      bar.hidden = false;
      bar.textContent = "The lab server does not answer (" + e.message + ")";
    } finally {
      this.watching = false;
    }
  },

  // The experts chosen for ablation, shared by the pages (localStorage): {experts: [[g, id]], masks: [name]}.
  selection() {
    try {
      const s = JSON.parse(localStorage.getItem("monet-lab-selection") || "{}");
      return {experts: Array.isArray(s.experts) ? s.experts : [], masks: Array.isArray(s.masks) ? s.masks : []};
    } catch (e) { return {experts: [], masks: []}; }
  },
  saveSelection(s) { localStorage.setItem("monet-lab-selection", JSON.stringify(s)); },
  choose(g, id) {
    const s = this.selection();
    if (!s.experts.some(([a, b]) => a === g && b === id)) s.experts.push([g, id]);
    this.saveSelection(s);
  },

  async start(page) {
    const nav = document.getElementById("nav");
    const root = document.getElementById("app");
    let status = {atlas: false};
    try { status = await (await fetch("/api/status")).json(); } catch (e) { /* shown by watch() */ }
    if (status.atlas) nav.append(el("a", {href: "/atlas/index.html"}, "Atlas"));
    nav.append(el("a", {href: "/lab/text.html"}, "Your text"), el("a", {href: "/lab/ablate.html"}, "Ablation"),
      el("span", {class: "meta"}, "Monet expert lab (the model runs on this machine)"));
    this.watch();
    try {
      await page(root, status);
    } catch (e) {
      root.append(el("div", {class: "error", id: "page-error"}, e.message));
    }
    document.body.dataset.ready = "1";
  },
};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function params() { return new URLSearchParams(location.search); }
const count = n => Number(n).toLocaleString("en-US");
const fixed = (x, d) => Number(x).toLocaleString("en-US", {minimumFractionDigits: d, maximumFractionDigits: d});
const score = x => Number(x).toPrecision(4);
const pct = x => (100 * x).toFixed(x < 0.001 && x > 0 ? 4 : 2) + "%";
function oneLine(s) { return s.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); }
function shade(s, top) {
  const a = top > 0 ? Math.max(0, Math.min(1, s / top)) : 0;
  return "background: rgba(230, 80, 0, " + (0.85 * a).toFixed(3) + ")";
}
function expertHref(g, id) { return "/lab/expert.html?g=" + Number(g) + "&id=" + Number(id); }
function expertLink(g, id) { return el("a", {href: expertHref(g, id), class: "mono"}, g + ":" + id); }
function errorBox(target, e) {
  target.replaceChildren(el("div", {class: "error"}, e instanceof LabError ? e.message : "error: " + e.message));
}
function addButton(g, id, after) {
  return el("button", {class: "add", "data-g": g, "data-id": id, title: "add to the ablation's selection",
    onclick: ev => { lab.choose(g, id); ev.target.textContent = "added"; if (after) after(); }}, "+ ablate");
}

// ------------------------------------------------------------------------------------------------ your text

async function textPage(root) {
  const p = params();
  root.append(el("h1", {}, "Your text, through the model"),
    el("p", {class: "meta"}, "Each token's composed experts per routing group, with their exact scores in this " +
      "context (score = sum over heads of g1[h, i] \u00b7 g2[h, j]; expert id = i \u00b7 E + j). Click a token."));
  const text = el("textarea", {id: "text", placeholder: "Type or paste a text"});
  text.value = p.get("text") || localStorage.getItem("monet-lab-text") || "";
  const top = el("input", {id: "top", type: "number", min: 1, max: 64, value: 8});
  const out = el("div", {id: "result"});
  const run = async () => {
    localStorage.setItem("monet-lab-text", text.value);
    out.replaceChildren(el("div", {class: "meta"}, "running\u2026"));
    try {
      showRouting(out, await lab.api("tokens", {text: text.value, top: Number(top.value)}));
    } catch (e) { errorBox(out, e); }
  };
  root.append(text, el("div", {class: "controls"}, el("button", {id: "run", class: "primary", onclick: run},
    "Run through the model"), el("label", {}, "experts per group ", top)), out);
  if (p.get("text")) run();
}

function showRouting(out, r) {
  const detail = el("div", {id: "detail"});
  const chips = r.tokens.map((t, n) => el("span", {class: "tok", "data-t": n, title: "token id " + t.id,
    onclick: ev => select(n, ev.target)}, oneLine(t.piece) || "\u2205"));
  const select = (n, chip) => {
    chips.forEach(c => c.classList.remove("sel"));
    chip.classList.add("sel");
    const t = r.tokens[n];
    const rows = [];
    t.groups.forEach((grp, g) => grp.top.forEach((x, k) => rows.push(el("tr", {"data-g": g, "data-id": x.id,
      "data-score": String(x.score)}, el("td", {class: "num"}, k ? "" : "group " + g + " (" + count(grp.active) +
      " active)"), el("td", {}, expertLink(g, x.id)), el("td", {class: "num mono"}, "(" + x.i + ", " + x.j + ")"),
      el("td", {class: "num mono score"}, x.score.toFixed(6)), el("td", {}, addButton(g, x.id))))));
    detail.replaceChildren(el("h2", {}, "Token " + n + ": " + JSON.stringify(t.piece)),
      el("table", {id: "experts"}, el("tr", {}, el("th", {class: "num"}, "group"), el("th", {}, "expert"),
        el("th", {class: "num"}, "(i, j)"), el("th", {class: "num"}, "score"), el("th", {}, "")), rows));
  };
  out.replaceChildren(el("div", {id: "tokens"}, chips), detail);  // el() flattens the list
  if (chips.length > 1) select(1, chips[1]);
}

// ------------------------------------------------------------------------------------------------ an expert

async function expertPage(root, status) {
  const p = params();
  const g = p.get("g"), id = p.get("id");
  root.append(el("h1", {}, "Group " + g + " / Expert " + id));
  let x;
  try {
    x = await lab.api("expert?g=" + encodeURIComponent(g) + "&id=" + encodeURIComponent(id));
  } catch (e) {
    root.append(el("div", {class: "error", id: "page-error"}, e.message));
    return;
  }
  document.title = "Group " + x.group + " / Expert " + x.id + " \u00b7 Monet expert lab";
  root.firstChild.textContent = "Group " + x.group + " / Expert " + x.id + "  (i = " + x.i + ", j = " + x.j + ")";
  root.append(el("div", {class: "controls"}, addButton(x.group, x.id),
    status.atlas ? el("a", {href: "/atlas/expert.html?g=" + x.group + "&id=" + x.id}, "its atlas page") : null));
  const stat = (k, v) => el("tr", {}, el("td", {}, k), el("td", {class: "mono"}, v));
  root.append(el("table", {class: "stats", id: "stats"},
    stat("mass (summed score)", fixed(x.mass, 2) + "  (rank " + count(x.mass_rank) + " of " + count(x.experts ** 2) + ")"),
    stat("frequency (tokens with s > 0)", count(x.frequency) + " of " + count(x.tokens) + " tokens"),
    stat("density", pct(x.density)),
    stat("score when active", "mean " + score(x.mean_when_active) + ", max " + score(x.max_score))));

  const h = x.histogram, most = Math.max(1, ...h.counts);
  root.append(el("h2", {}, "Score histogram"), el("div", {class: "hist", id: "histogram"}, h.counts.map((c, k) =>
    el("div", {style: "height: " + (100 * c / most).toFixed(1) + "%", "data-count": c,
      title: score(h.edges[k]) + " \u2013 " + score(h.edges[k + 1]) + ": " + count(c) + " tokens"}))),
    el("div", {class: "meta"}, "positive scores in " + h.counts.length + " bins from 0 to " + score(x.max_score) +
      "; " + count(h.zero) + " tokens score 0 (not shown)"));

  const contexts = (id, list, top, withQuantile) => el("table", {id: id}, el("tr", {},
    withQuantile ? el("th", {}, "quantile") : el("th", {class: "num"}, "#"), el("th", {class: "num"}, "score"),
    el("th", {class: "num"}, "where"), el("th", {}, "context")),
    list.length ? list.map((c, k) => el("tr", {class: "context"}, el("td", {class: withQuantile ? "" : "num"},
      withQuantile ? c.quantile : String(k + 1)), el("td", {class: "num"}, score(c.score)),
      el("td", {class: "num meta"}, "doc " + c.doc + " @" + c.pos),
      el("td", {class: "ctx"}, c.text.map((piece, n) => el("span", {class: "shade" + (n === c.hit ? " hit" : ""),
        style: shade(c.s[n], top), title: score(c.s[n])}, oneLine(n === c.hit && !piece ? c.label : piece))))))
      : el("tr", {}, el("td", {colspan: 4}, "it never fires on the corpus")));
  root.append(el("h2", {}, "Top-activating contexts"), contexts("top", x.top, x.max_score, false),
    el("h2", {}, "Contexts across its scores"), el("p", {class: "meta"}, "from equal-count bins of its positive " +
      "scores, lowest first: what it does most of the time, not only at its peak"),
    contexts("quantiles", x.quantiles, x.max_score, true));

  const tokens = (id, list) => el("table", {id: id}, el("tr", {}, el("th", {}, "token"),
    el("th", {class: "num"}, "logit effect")), list.map(t => el("tr", {"data-token": t.token},
    el("td", {class: "mono"}, oneLine(t.label)), el("td", {class: "num"}, fixed(t.logit, 4)))));
  root.append(el("h2", {}, "Output tokens"), el("p", {class: "meta"}, "Its output direction (in each layer of " +
    "its group: its value vectors with every hidden unit at activation 1, plus its bias, summed over the " +
    "group's layers) times the final norm's scale, through lm_head."),
    el("div", {class: "cols"}, el("div", {}, el("h2", {}, "promotes"), tokens("promoted", x.promoted)),
      el("div", {}, el("h2", {}, "suppresses"), tokens("suppressed", x.suppressed))));

  const near = (id, list) => el("table", {id: id}, el("tr", {}, el("th", {}, "expert"), el("th", {class: "num"}, "(i, j)"),
    el("th", {class: "num"}, "cosine")), list.length ? list.map(y => el("tr", {"data-id": y.id},
    el("td", {}, expertLink(x.group, y.id)), el("td", {class: "num mono"}, "(" + y.i + ", " + y.j + ")"),
    el("td", {class: "num"}, fixed(y.cosine, 4)))) : el("tr", {}, el("td", {colspan: 3}, "none")));
  root.append(el("div", {class: "cols"},
    el("div", {}, el("h2", {}, "Nearest by output direction"), near("nearest-output", x.nearest_output)),
    el("div", {}, el("h2", {}, "Nearest by co-activation"), el("p", {class: "meta"}, "cosine of the score " +
      "vectors over the corpus's tokens"), near("nearest-coactivation", x.nearest_coactivation))));
}

// ------------------------------------------------------------------------------------------------ ablation

async function ablatePage(root) {
  root.append(el("h1", {}, "Ablation"), el("p", {class: "meta"}, "Delete experts and see what changes for your " +
    "text: each token's loss and the continuation, before and after (the other experts' routing weights are " +
    "left as they are, as in the paper)."));
  const chosen = el("div", {id: "selection"});
  const drawSelection = () => {
    const s = lab.selection();
    const drop = (f) => () => { f(s); lab.saveSelection(s); drawSelection(); };
    const chips = [
      ...s.experts.map(([g, id], k) => el("span", {class: "chip", "data-g": g, "data-id": id}, g + ":" + id,
        el("button", {title: "remove", onclick: drop(t => t.experts.splice(k, 1))}, "\u00d7"))),
      ...s.masks.map((name, k) => el("span", {class: "chip", "data-mask": name}, "mask " + name,
        el("button", {title: "remove", onclick: drop(t => t.masks.splice(k, 1))}, "\u00d7")))];
    chosen.replaceChildren(...(chips.length ? chips : [el("span", {class: "meta"}, "nothing chosen yet")]));
  };
  const message = el("div", {id: "message"});
  const addExpert = el("input", {id: "add-expert", placeholder: "group:id"});
  const add = () => {
    const m = /^\s*(\d+)\s*:\s*(\d+)\s*$/.exec(addExpert.value);
    if (!m) { message.replaceChildren(el("div", {class: "error"}, "an expert is GROUP:ID, e.g. 0:42")); return; }
    message.replaceChildren();
    lab.choose(Number(m[1]), Number(m[2]));
    drawSelection();
  };
  const query = el("input", {id: "search", placeholder: "a word or piece of text"});
  const found = el("div", {id: "search-results"});
  const search = async () => {
    try {
      const r = await lab.api("search", {text: query.value, top: 5});
      found.replaceChildren(el("div", {class: "meta"}, count(r.occurrences) + " occurrences in the corpus; the " +
        "experts with the highest mean score on their last token:"), el("table", {}, r.groups.map((list, g) =>
        list.map((y, k) => el("tr", {"data-g": g, "data-id": y.id}, el("td", {class: "num"}, k ? "" : "group " + g),
          el("td", {}, expertLink(g, y.id)), el("td", {class: "num"}, score(y.mean)),
          el("td", {}, addButton(g, y.id, drawSelection)))))));
    } catch (e) { errorBox(found, e); }
  };
  const masks = el("select", {id: "masks"});
  const loadMasks = async () => {
    const m = await lab.api("masks");
    masks.replaceChildren(el("option", {value: ""}, "\u2014 a mask \u2014"),
      ...m.domain.map(n => el("option", {value: n}, n + " (domain)")),
      ...m.saved.map(n => el("option", {value: n}, n + " (saved)")));
  };
  const useMask = () => {
    if (!masks.value) return;
    const s = lab.selection();
    if (!s.masks.includes(masks.value)) s.masks.push(masks.value);
    lab.saveSelection(s);
    drawSelection();
  };
  const loadMask = async () => {
    if (!masks.value) return;
    try {
      const m = await lab.api("masks/" + encodeURIComponent(masks.value));
      lab.saveSelection({experts: m.experts, masks: []});
      drawSelection();
      message.replaceChildren(el("div", {class: "note", id: "loaded"}, "loaded " + m.count + " experts of " + m.name));
    } catch (e) { errorBox(message, e); }
  };
  root.append(el("h2", {}, "Experts to delete"), chosen, el("div", {class: "controls"}, addExpert,
    el("button", {id: "add", onclick: add}, "add"), query, el("button", {id: "search-run", onclick: search}, "search"),
    masks, el("button", {id: "use-mask", onclick: useMask}, "add mask"),
    el("button", {id: "load-mask", onclick: loadMask}, "load its experts"),
    el("button", {id: "clear", onclick: () => { lab.saveSelection({experts: [], masks: []}); drawSelection(); }},
      "clear")), message, found);

  const text = el("textarea", {id: "text", placeholder: "A text to score and continue"});
  text.value = localStorage.getItem("monet-lab-text") || "";
  const num = (id, value, attrs) => el("input", {id: id, type: "number", value: value, ...attrs});
  const newTokens = num("new-tokens", 24, {min: 1}), temperature = num("temperature", 0, {min: 0, step: 0.1});
  const seed = num("seed", 0, {});
  const out = el("div", {id: "result"});
  const run = async () => {
    localStorage.setItem("monet-lab-text", text.value);
    out.replaceChildren(el("div", {class: "meta"}, "running before and after\u2026"));
    try {
      showAblation(out, await lab.api("ablate", {...lab.selection(), text: text.value,
        new_tokens: Number(newTokens.value), temperature: Number(temperature.value), seed: Number(seed.value)}));
    } catch (e) { errorBox(out, e); }
  };
  const name = el("input", {id: "mask-name", placeholder: "mask name"});
  const saved = el("div", {id: "saved"});
  const save = async () => {
    try {
      const r = await lab.api("masks", {...lab.selection(), name: name.value});
      saved.replaceChildren(el("div", {class: "note"}, "saved " + r.count + " experts to ", el("code", {}, r.path),
        " \u2014 use it with eval.py --mask or monet-lm-eval"));
      await loadMasks();
    } catch (e) { errorBox(saved, e); }
  };
  root.append(el("h2", {}, "Text"), text, el("div", {class: "controls"},
    el("button", {id: "run", class: "primary", onclick: run}, "Run before and after"),
    el("label", {}, "new tokens ", newTokens), el("label", {}, "temperature (0 = greedy) ", temperature),
    el("label", {}, "seed ", seed)), out,
    el("h2", {}, "Save the selection"), el("div", {class: "controls"}, name,
      el("button", {id: "save", onclick: save}, "save mask")), saved);
  drawSelection();
  await loadMasks();
}

function showAblation(out, r) {
  const delta = (a, b) => {
    const d = b - a;
    return el("td", {class: "num " + (d > 1e-6 ? "up" : d < -1e-6 ? "down" : "")}, (d >= 0 ? "+" : "") + d.toFixed(4));
  };
  out.replaceChildren(
    el("p", {}, "Deleted " + count(r.deleted) + " experts (" + r.deleted_per_group.join(", ") + " per group). " +
      "Mean loss over the text: ", el("b", {id: "loss-before"}, r.before.loss.toFixed(4)), " before, ",
      el("b", {id: "loss-after"}, r.after.loss.toFixed(4)), " after."),
    el("div", {class: "cols"},
      el("div", {}, el("h2", {}, "Continuation before"), el("div", {class: "cont", id: "cont-before"},
        r.before.continuation.text)),
      el("div", {}, el("h2", {}, "Continuation after"), el("div", {class: "cont", id: "cont-after"},
        r.after.continuation.text))),
    el("h2", {}, "Loss per token"),
    el("table", {id: "losses"}, el("tr", {}, el("th", {class: "num"}, "#"), el("th", {}, "token"),
      el("th", {class: "num"}, "before"), el("th", {class: "num"}, "after"), el("th", {class: "num"}, "change")),
      r.pieces.map((piece, n) => el("tr", {"data-n": n + 1, "data-before": String(r.before.losses[n]),
        "data-after": String(r.after.losses[n])}, el("td", {class: "num"}, String(n + 1)),
        el("td", {class: "mono"}, oneLine(piece)), el("td", {class: "num"}, r.before.losses[n].toFixed(4)),
        el("td", {class: "num"}, r.after.losses[n].toFixed(4)), delta(r.before.losses[n], r.after.losses[n])))));
}
