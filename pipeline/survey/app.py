"""The survey web app (Starlette): instructions, two example pairs, then one question per page.

Flow: `/` (instructions) -> POST `/start` (assigns a version and the items, sets a cookie) -> `/example/1`,
`/example/2` -> `/question` (the first unanswered item) -> POST `/answer` -> ... -> `/done` (completion code).
Participants are identified only by the cookie; image URLs carry the question number, never a file path or a
budget, and only the current question's image is served. Form bodies are parsed here (URL-encoded, small,
known fields only) so that every malformed request gets a 4xx page saying what was wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qsl

import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from pipeline.core.errors import DatasetError
from pipeline.survey.manifest import read_image_set
from pipeline.survey.store import ANSWERS, Participant, PoolImage, SurveyStore, now
from pipeline.survey.templates import TIMER_JS, render

log = logging.getLogger(__name__)

COOKIE = "sipat_survey"
MAX_BODY = 4096
EXTERNAL_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)
QUESTION_NUMBER = re.compile(r"[0-9]{1,6}", re.ASCII)  # str.isdigit() would admit '²' (int() fails) and '٣'
EXTERNAL_ID_PARAMS = ("PROLIFIC_PID", "participant_id", "pid")  # what recruiting platforms append to the link
SECURITY_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy",
     b"default-src 'none'; img-src 'self'; script-src 'self'; style-src 'unsafe-inline'; form-action 'self'; "
     b"base-uri 'none'"),
]


@dataclass(frozen=True)
class SurveyVersion:
    """One survey version: the image set of one attacked model."""

    name: str
    folder: Path
    info: dict[str, Any]
    pool: list[PoolImage]
    examples: list[tuple[Path, Path, int]]  # (clean, perturbed, k/255) of the two example pairs
    image_size: int

    @property
    def n_levels(self) -> int:
        return 1 + len(self.info["eps_255"])


def _inside(folder: Path, rel: str) -> Path:
    path = (folder / rel).resolve()
    if not path.is_relative_to(folder.resolve()) or not path.is_file():
        raise DatasetError(f"{folder}: manifest names {rel!r}, which is not a file inside the image set")
    return path


def load_version(folder: Path, name: Optional[str] = None) -> SurveyVersion:
    """Read and check one image set: every pool image at every budget, every file inside its ε-ball."""
    info, rows = read_image_set(folder)
    name = name or info.get("version") or folder.name
    levels = [0] + [int(k) for k in info["eps_255"]]
    by_image: dict[int, dict[str, Any]] = {}
    for r in rows:
        k, linf = int(r["eps_255"]), int(r["linf_255"])
        if linf > k:
            raise DatasetError(f"{folder}: {r['file']} is {linf}/255 from its clean image, outside its {k}/255 ball")
        _inside(folder, r["file"])
        if r["role"] != "pool":
            continue
        entry = by_image.setdefault(int(r["index"]), {"image_id": r["image_id"], "label": int(r["label"]),
                                                      "files": {}, "adv": {}})
        entry["files"][k] = r["file"]
        entry["adv"][k] = r["still_adversarial"] == "True"
    pool = []
    for idx, e in sorted(by_image.items()):
        if sorted(e["files"]) != levels:
            raise DatasetError(f"{folder}: pool image {idx} has budgets {sorted(e['files'])}, expected {levels}")
        pool.append(PoolImage(idx, e["image_id"], e["label"], dict(e["files"]), dict(e["adv"])))
    examples = [(_inside(folder, ex["clean"]), _inside(folder, ex["perturbed"]), int(ex["eps_255"]))
                for ex in info.get("examples", [])]
    if len(examples) != 2:
        raise DatasetError(f"{folder}: set.json must name two example pairs")
    return SurveyVersion(name, folder, info, pool, examples, int(info["image_size"]))


def load_versions(root: str | Path, names: Optional[list[str]] = None) -> dict[str, SurveyVersion]:
    """The image sets under `root` (one per subfolder, or `root` itself), optionally only `names`."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"survey image folder not found: {root} (build the sets with `dvc repro` or "
                           f"`sipat survey images`)")
    folders = [root] if (root / "set.json").is_file() else sorted(p for p in root.iterdir()
                                                                   if (p / "set.json").is_file())
    versions = {}
    for f in folders:
        v = load_version(f)
        if v.name in versions:
            raise DatasetError(f"two image sets under {root} are both version {v.name!r}")
        versions[v.name] = v
    if names:
        unknown = [n for n in names if n not in versions]
        if unknown:
            raise DatasetError(f"no image set for version(s) {unknown} under {root}; found {sorted(versions)}")
        versions = {n: versions[n] for n in names}
    if not versions:
        raise DatasetError(f"no survey image sets (folders with set.json) under {root}")
    return versions


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (0: any free port) for uvicorn to serve on.

    Made with protocol IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the
    listening socket says it is TCP, and without it each keep-alive response waits ~40 ms for a delayed ACK.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    return sock


class _Headers:
    """ASGI wrapper adding the security and no-cache headers to every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + SECURITY_HEADERS
            await send(message)

        return await self.app(scope, receive, send_with_headers)


def blind_png(path: Path) -> bytes:
    """The image's pixels as an uncompressed RGB PNG with no metadata: its length depends on its size alone,
    so that nothing but the pixels tells an unperturbed image from a perturbed one (a compressed PNG is smaller
    the smoother it is, and perturbations are not smooth)."""
    import io

    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


class BlindImages:
    """Every image a participant may receive, encoded once by `blind_png` and served from memory: one code
    path, the same headers and, within a set, the same length for clean and perturbed images."""

    def __init__(self, versions: dict[str, "SurveyVersion"]):
        self._bytes: dict[Path, bytes] = {}
        for v in versions.values():
            for p in v.pool:
                for f in p.files.values():
                    self._add(_inside(v.folder, f))
            for clean, perturbed, _ in v.examples:
                self._add(Path(clean))
                self._add(Path(perturbed))

    def _add(self, path: Path) -> None:
        if path not in self._bytes:
            self._bytes[path] = blind_png(path)

    def response(self, path: Path) -> Response:
        return Response(self._bytes[path], media_type="image/png")  # cache-control: no-store, as every page


def create_app(versions: dict[str, SurveyVersion], store: SurveyStore, *, images_per_participant: int = 10,
               display_px: int = 320, title: str = "Image survey") -> Any:
    """The ASGI application serving `versions`, writing to `store`."""
    for v in versions.values():
        if len(v.pool) < images_per_participant:
            raise DatasetError(f"version {v.name!r} has {len(v.pool)} pool images; each participant needs "
                               f"{images_per_participant} (lower survey.images_per_participant or enlarge the pool)")
    pools = {name: v.pool for name, v in versions.items()}
    images = BlindImages(versions)

    def width(v: SurveyVersion) -> int:
        return v.image_size * max(1, display_px // v.image_size)

    def root(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    def page(request: Request, template: str, status: int = 200, **ctx) -> HTMLResponse:
        return HTMLResponse(render(template, title=title, root=root(request), **ctx), status_code=status)

    def redirect(request: Request, path: str) -> RedirectResponse:
        return RedirectResponse(root(request) + path, status_code=303)

    async def who(request: Request) -> Optional[Participant]:
        return await run_in_threadpool(store.participant, request.cookies.get(COOKIE))

    async def need(request: Request) -> Participant:
        p = await who(request)
        if p is None:
            raise HTTPException(403, "No survey session in this browser: open the survey's start page to begin "
                                     "(cookies must be enabled).")
        return p

    async def read_form(request: Request, fields: tuple[str, ...]) -> dict[str, str]:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise HTTPException(413, f"Form body larger than {MAX_BODY} bytes.")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if body and ctype != "application/x-www-form-urlencoded":  # an empty form may come without a type
            raise HTTPException(415, "Send the form as application/x-www-form-urlencoded.")
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=8)
        except (UnicodeDecodeError, ValueError):
            raise HTTPException(400, "The form body is not valid URL-encoded UTF-8.") from None
        out: dict[str, str] = {}
        for key, value in pairs:
            if key not in fields:
                raise HTTPException(400, f"Unexpected form field {key[:40]!r}; expected {', '.join(fields)}.")
            if key in out:
                raise HTTPException(400, f"Form field {key!r} given twice.")
            out[key] = value
        return out

    def check_external(value: Optional[str]) -> Optional[str]:
        if value in (None, ""):
            return None
        if not EXTERNAL_ID.fullmatch(value):
            raise HTTPException(400, "The participant id must be 1-64 letters, digits, '.', '_' or '-'.")
        return value

    # When a question page was served travels in its form, signed, so that showing a page writes nothing;
    # a stamp that does not verify (forged) only loses the response time. The key is kept in the database, so
    # a stamp verifies after a restart and in every server process sharing the database.
    secret = store.signing_key

    def shown_stamp(pid: int, position: int) -> str:
        t = now()
        mac = hmac.new(secret, f"{pid}|{position}|{t}".encode(), hashlib.sha256).hexdigest()[:32]
        return f"{t}|{mac}"

    def check_stamp(stamp: str, pid: int, position: int) -> Optional[str]:
        t, _, mac = stamp.partition("|")
        good = hmac.new(secret, f"{pid}|{position}|{t}".encode(), hashlib.sha256).hexdigest()[:32]
        return t if mac and hmac.compare_digest(mac, good) else None

    async def resume_path(p: Participant) -> str:
        done, total = await run_in_threadpool(store.progress, p.id)
        return "/done" if done >= total else ("/question" if done else "/example/1")

    async def welcome(request: Request) -> Response:
        p = await who(request)
        given = [request.query_params[k] for k in EXTERNAL_ID_PARAMS if k in request.query_params]
        external = check_external(given[0] if given else None)
        n = images_per_participant * max(v.n_levels for v in versions.values())
        resume = root(request) + await resume_path(p) if p else None
        return page(request, "welcome.html", participant=p, resume=resume, external_id=external, n_questions=n)

    async def start(request: Request) -> Response:
        form = await read_form(request, ("external_id",))
        p = await who(request)
        if p is not None:
            return redirect(request, await resume_path(p))
        external = check_external(form.get("external_id"))
        if external and await run_in_threadpool(store.external_id_taken, external):
            raise HTTPException(409, "This participant id has already started the survey. Continue in the "
                                     "browser where you started it.")
        try:
            token, p = await run_in_threadpool(store.join, pools, images_per_participant, external_id=external,
                                               user_agent=request.headers.get("user-agent"))
        except sa.exc.IntegrityError:  # the same participant id started twice at the same moment
            raise HTTPException(409, "This participant id has already started the survey.") from None
        resp = redirect(request, "/example/1")
        resp.set_cookie(COOKIE, token, max_age=14 * 24 * 3600, httponly=True, samesite="lax",
                        secure=request.url.scheme == "https", path=root(request) or "/")
        log.info("participant %d joined (version %s)", p.id, p.version)
        return resp

    async def example(request: Request) -> Response:
        n = request.path_params["n"]
        if n not in (1, 2):
            raise HTTPException(404, "There are two examples.")
        p = await who(request)
        if p is None:
            return redirect(request, "/")
        v = versions[p.version]
        strength = "strong" if n == 1 else "subtle"
        heading = "An unperturbed image and a strongly perturbed one" if n == 1 else \
            "An unperturbed image and a slightly perturbed one"
        text = ("Image B has been perturbed: small changes were added to its pixels." if n == 1 else
                "Here the perturbation is much weaker. It can be very hard to tell whether an image has been "
                "perturbed; when unsure, give your best guess.")
        return page(request, "example.html", n=n, heading=heading, text=text, strength=strength, width=width(v))

    async def example_image(request: Request) -> Response:
        n, which = request.path_params["n"], request.path_params["which"]
        if n not in (1, 2) or which not in ("clean", "perturbed"):
            raise HTTPException(404, "No such example image.")
        p = await need(request)
        clean, perturbed, _ = versions[p.version].examples[n - 1]
        return images.response(Path(clean if which == "clean" else perturbed))

    async def question(request: Request) -> Response:
        p = await who(request)
        if p is None:
            return redirect(request, "/")
        item, done, total = await run_in_threadpool(store.current_item, p.id)
        if item is None:
            return redirect(request, "/done")
        return page(request, "question.html", position=item.position, total=total, answered=done,
                    percent=round(100 * done / max(total, 1), 1), width=width(versions[p.version]),
                    shown=shown_stamp(p.id, item.position))

    async def image(request: Request) -> Response:
        position = request.path_params["position"]
        p = await need(request)
        item, _, _ = await run_in_threadpool(store.current_item, p.id)
        if item is None or item.position != position:
            raise HTTPException(404, f"Image {position} is not your current question's image.")
        v = versions[p.version]
        return images.response(_inside(v.folder, item.file))

    async def answer(request: Request) -> Response:
        form = await read_form(request, ("item", "answer", "shown", "client_ms"))
        p = await need(request)
        if form.get("answer") not in ANSWERS:
            raise HTTPException(400, f"The answer must be one of: {', '.join(ANSWERS)}.")
        raw = form.get("item", "")
        if not QUESTION_NUMBER.fullmatch(raw):
            raise HTTPException(400, "The form must give the question number as 'item'.")
        shown_at = check_stamp(form.get("shown", ""), p.id, int(raw))
        client = form.get("client_ms", "")
        client_ms = int(client) if client.isascii() and client.isdigit() and len(client) <= 9 else None
        status = await run_in_threadpool(store.answer, p.id, int(raw), form["answer"], shown_at, client_ms)
        if status in ("ok", "repeat"):  # a repeated identical submission (double click, reload) changes nothing
            return redirect(request, "/question")
        if status == "unassigned":
            raise HTTPException(404, f"Your survey has no question {raw}.")
        link = root(request) + "/question"
        if status == "changed":
            return page(request, "error.html", 409, heading="Already answered",
                        message=f"Question {raw} has already been answered; answers are final.",
                        link=link, link_text="Continue")
        return page(request, "error.html", 409, heading="Not the current question",
                    message=f"Question {raw} is not your current question; answer them in order.",
                    link=link, link_text="Go to the current question")

    async def done(request: Request) -> Response:
        p = await who(request)
        if p is None:
            return redirect(request, "/")
        n_done, total = await run_in_threadpool(store.progress, p.id)
        if n_done < total:
            return redirect(request, "/question")
        return page(request, "done.html", code=p.completion_code, total=total)

    async def timer(request: Request) -> Response:
        return Response(TIMER_JS, media_type="text/javascript")

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True, "versions": sorted(versions)})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        headings = {400: "Bad request", 403: "No survey session", 404: "Not found", 405: "Method not allowed",
                    409: "Conflict", 413: "Too large", 415: "Unsupported form encoding"}
        message = f"{request.method} is not allowed here." if exc.status_code == 405 else exc.detail
        resp = page(request, "error.html", exc.status_code, heading=headings.get(exc.status_code, "Error"),
                    message=message, link=root(request) + "/", link_text="Survey start page")
        resp.headers.update(exc.headers or {})
        return resp

    routes = [
        Route("/", welcome, methods=["GET"]),
        Route("/start", start, methods=["POST"]),
        Route("/example/{n:int}", example, methods=["GET"]),
        Route("/example-image/{n:int}/{which}", example_image, methods=["GET"]),
        Route("/question", question, methods=["GET"]),
        Route("/image/{position:int}", image, methods=["GET"]),
        Route("/answer", answer, methods=["POST"]),
        Route("/done", done, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
        Route("/timer.js", timer, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    wrapped = _Headers(app)
    wrapped.store, wrapped.versions = store, versions
    return wrapped
