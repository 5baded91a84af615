"""The expert lab's web app (FastAPI): the atlas's static pages, the lab's pages and a JSON API over one
:class:`~monet_jax.eval.lab.service.LabService`.

Routes: ``/`` opens the atlas (or the text page without one); ``/atlas/...`` serves the atlas with a script that
links its pages to the live ones; ``/lab/...`` the lab's pages; ``/api/...`` the answers. Bad input is a 400
with ``{"error": "..."}`` that the pages show; nothing but ``POST /api/masks`` writes, and only into the lab's
``out_dir/masks``.
"""

from __future__ import annotations

import traceback
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from monet_jax.eval.lab.engine import LabError
from monet_jax.eval.lab.service import LabService

SITE = resources.files("monet_jax.eval.lab").joinpath("site")
PAGES = {"text.html": ("Your text", "textPage"), "expert.html": ("Expert", "expertPage"),
         "ablate.html": ("Ablation", "ablatePage")}  # each: site/page.html with its title and lab.js function
ASSETS = {"lab.js": "text/javascript", "lab.css": "text/css", "hook.js": "text/javascript"}
ATLAS_CSS = resources.files("monet_jax.experts").joinpath("atlas_site", "atlas.css")  # the lab's base style
HOOK = '<script src="/lab/hook.js"></script>\n</body>'


class TextRequest(BaseModel):
    text: str
    top: int = Field(8, ge=1, le=64)


class SearchRequest(BaseModel):
    text: str
    top: int = Field(10, ge=1, le=100)


class Selection(BaseModel):
    experts: Any = []  # [[group, id], ...] or ["GROUP:ID", ...]: checked by Lab.mask, whose messages say so
    masks: Any = []    # mask names


class AblateRequest(Selection):
    text: str
    new_tokens: int = 24
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


class SaveRequest(Selection):
    name: str


def create_app(service: LabService, atlas_dir: str | Path | None = None) -> FastAPI:
    """The app over ``service``; ``atlas_dir``: an atlas site (``eval.py experts atlas``) to open on."""
    atlas = Path(atlas_dir).resolve() if atlas_dir is not None else None
    app = FastAPI(title="Monet expert lab", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(LabError)
    async def _lab_error(request: Request, e: LabError):
        return JSONResponse({"error": str(e)}, status_code=400)

    @app.exception_handler(Exception)
    async def _failure(request: Request, e: Exception):  # a fault of the lab's own: still a message in the page
        traceback.print_exception(e)
        return JSONResponse({"error": f"the lab failed on this request ({type(e).__name__}: {e}); the server's "
                                      "log has the traceback"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"error": f"bad request: {where or 'body'}: {first.get('msg', 'invalid')}"},
                            status_code=400)

    @app.get("/")
    def home():
        return RedirectResponse("/atlas/index.html" if atlas is not None else "/lab/text.html")

    @app.get("/atlas/{path:path}")
    def atlas_file(path: str):
        if atlas is None:
            return JSONResponse({"error": "this lab was started without an atlas"}, status_code=404)
        file = (atlas / path).resolve()
        if not file.is_relative_to(atlas) or not file.is_file():
            return JSONResponse({"error": f"no atlas file {path!r}"}, status_code=404)
        if file.suffix == ".html":  # the atlas's pages get the links to the live ones
            return HTMLResponse(file.read_text(encoding="utf-8").replace("</body>", HOOK, 1))
        return FileResponse(file)

    @app.get("/lab/{name}")
    def lab_file(name: str):
        if name in PAGES:
            title, page = PAGES[name]
            skeleton = SITE.joinpath("page.html").read_text(encoding="utf-8")
            return HTMLResponse(skeleton.replace("{title}", title).replace("{page}", page))
        if name == "atlas.css":
            return Response(ATLAS_CSS.read_bytes(), media_type="text/css")
        if name in ASSETS:
            return Response(SITE.joinpath(name).read_bytes(), media_type=ASSETS[name])
        return JSONResponse({"error": f"no lab page {name!r}"}, status_code=404)

    @app.get("/api/status")
    def status():
        return {**service.status(), "atlas": atlas is not None}

    @app.get("/api/info")
    def info():
        return service.run("info", lambda lab: {
            "groups": lab.groups, "experts": lab.E, "window": lab.config.max_position_embeddings,
            "tokens": int(lab.stats.tokens), "documents": len(lab.docs), "decompose": lab.config.moe_decompose,
            "domain_masks": sorted(lab.domain_masks), "saved_masks": lab.saved_masks(),
            "max_new_tokens": lab.options.max_new_tokens, **lab.source})

    @app.post("/api/tokens")
    def tokens(req: TextRequest):
        return service.run("your text", lambda lab: lab.analyze(req.text, req.top))

    @app.get("/api/expert")
    def expert(g: str, id: str):  # strings: a bad id is the lab's own one-line message
        return service.run(f"expert {g}:{id}", lambda lab: lab.expert(g, id))

    @app.post("/api/search")
    def search(req: SearchRequest):
        return service.run("search", lambda lab: lab.search(req.text, req.top))

    @app.post("/api/ablate")
    def ablate(req: AblateRequest):
        def job(lab):
            return lab.ablate(req.text, lab.mask(req.experts, req.masks), new_tokens=req.new_tokens,
                              temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed)
        return service.run("ablation", job)

    @app.get("/api/masks")
    def masks():
        return service.run("masks", lambda lab: {"domain": sorted(lab.domain_masks), "saved": lab.saved_masks()})

    @app.get("/api/masks/{name}")
    def mask(name: str):
        def job(lab):
            m = lab.load_mask(name)
            return {"name": name, "experts": [[g, int(x)] for g, ids in enumerate(m.groups) for x in ids],
                    "count": m.count, "meta": m.meta}
        return service.run("load mask", job)

    @app.post("/api/masks")
    def save(req: SaveRequest):
        def job(lab):
            path = lab.save_mask(req.name, lab.mask(req.experts, req.masks))
            return {"name": req.name, "path": str(path), "count": int(lab.load_mask(req.name).count)}
        return service.run("save mask", job)

    return app
