"""A self-contained HTML page for one composed expert: a text with every token shaded by the expert's
score, and the expert's top-activating contexts from a corpus; a PNG of it through headless Chromium."""

from __future__ import annotations

import html
import shutil
import subprocess
import tempfile
from pathlib import Path

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px; color: #222;
       background: #fff; max-width: 1100px; }
h1 { font-size: 20px; margin: 0 0 4px 0; } h2 { font-size: 16px; margin: 22px 0 8px 0; }
.meta { color: #666; font-size: 13px; }
.text { font-family: 'DejaVu Sans Mono', Menlo, Consolas, monospace; font-size: 14px; line-height: 1.9;
        white-space: pre-wrap; border: 1px solid #ddd; padding: 10px; border-radius: 4px; }
.tok { border-radius: 2px; }
table { border-collapse: collapse; font-size: 13px; width: 100%; }
td, th { border-bottom: 1px solid #eee; padding: 4px 8px; text-align: left; vertical-align: top; }
td.ctx { font-family: 'DejaVu Sans Mono', Menlo, Consolas, monospace; white-space: pre-wrap; }
.hit { background: rgba(230, 80, 0, 0.85); color: #fff; border-radius: 2px; padding: 0 1px; }
.ws { color: #999; }
.legend span { display: inline-block; width: 36px; height: 12px; margin-right: 2px; }
"""


def _shade(score: float, top: float) -> str:
    alpha = 0.0 if top <= 0 else min(max(score / top, 0.0), 1.0)
    return f"background: rgba(230, 80, 0, {alpha:.3f})"


def render(title: str, tokens: list[str], scores: list[float], contexts: list[dict] | None = None,
           meta: str = "") -> str:
    """``tokens``/``scores``: the shaded text (alpha = score / max score, title = exact score);
    ``contexts``: dicts with ``before``, ``token``, ``after``, ``score`` (and optional ``doc``)."""
    top = max(scores, default=0.0)
    spans = "".join(f'<span class="tok" style="{_shade(s, top)}" title="{s:.4f}">{html.escape(t)}</span>'
                    for t, s in zip(tokens, scores, strict=True))
    legend = "".join(f'<span style="{_shade(f * top, top)}"></span>' for f in (0.1, 0.25, 0.5, 0.75, 1.0))
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><div class='meta'>{html.escape(meta)}</div>",
             f"<h2>Text</h2><div class='legend meta'>score 0 {legend} {top:.4f}</div>",
             f"<div class='text'>{spans}</div>"]
    if contexts is not None:
        parts.append("<h2>Top-activating contexts</h2><table><tr><th>#</th><th>score</th><th>context</th></tr>")
        for n, c in enumerate(contexts, 1):
            ctx = (f"{_oneline(c['before'])}<span class='hit'>{_oneline(c['token'])}</span>"
                   f"{_oneline(c['after'])}")
            parts.append(f"<tr><td>{n}</td><td>{c['score']:.4f}</td><td class='ctx'>{ctx}</td></tr>")
        if not contexts:
            parts.append("<tr><td colspan='3'>the expert is not active on this corpus</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "".join(parts)


def _oneline(text: str) -> str:
    """Contexts stay on one row: newlines and tabs shown as symbols."""
    escaped = html.escape(text)
    return escaped.replace("\n", "<span class='ws'>\u21b5</span>").replace("\t", "<span class='ws'>\u21e5</span>")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


def screenshot(html_path: str | Path, png_path: str | Path, *, width: int = 1200, height: int = 1400) -> Path:
    """Render ``html_path`` with headless Chromium (``apt-get install chromium``) into ``png_path``."""
    chromium = find_chromium()
    if chromium is None:
        raise ValueError("a PNG needs Chromium on the PATH (e.g. apt-get install chromium)")
    png_path = Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={png_path}",
               Path(html_path).resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if not png_path.exists():
        raise ValueError(f"Chromium wrote no screenshot: {proc.stderr.strip()[-300:]}")
    return png_path
