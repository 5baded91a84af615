// Added by the expert lab to the atlas's pages it serves: links from the static pages to the live ones.
"use strict";
(function () {
  const bar = document.createElement("div");
  bar.id = "lab-bar";
  bar.setAttribute("style", "background:#e7f0fb;border:1px solid #b6cde9;border-radius:4px;padding:6px 12px;" +
    "margin:0 0 10px 0;font-size:13px");
  const link = (href, text) => { const a = document.createElement("a"); a.href = href; a.textContent = text;
    a.style.marginRight = "14px"; return a; };
  bar.append("The model is live here: ", link("/lab/text.html", "run your text"), link("/lab/ablate.html", "ablation"));
  const p = new URLSearchParams(location.search);
  if (/expert\.html$/.test(location.pathname) && p.get("g") !== null && p.get("id") !== null) {
    const a = link("/lab/expert.html?g=" + Number(p.get("g")) + "&id=" + Number(p.get("id")),
      "this expert's live page (quantiles, histogram, output tokens, neighbours)");
    a.id = "lab-expert";
    bar.append(a);
  }
  document.body.prepend(bar);
})();
