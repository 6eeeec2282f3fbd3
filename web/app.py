"""The Starlette application: routes, sign-in and CSRF checks, templates, security headers.

Every route but the sign-in form and the static CSS/JS goes through ``_guarded``:
no session, no page; a POST without its session's CSRF token changes nothing;
admin-only routes check the role. Pages are plain HTML forms that work without
JavaScript; static/app.js only adds keyboard shortcuts and the category type-ahead.
"""

from __future__ import annotations

import io
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader
from sqlalchemy import Engine, text
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shelver.catalog.settings import Settings
from shelver.training.registry import RegistryError
from shelver.web import audit, auth, dashboard, review
from shelver.worker.labels import ReviewError

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "shelver_session"
LOGIN_CSRF_COOKIE = "shelver_login_csrf"
THUMBNAIL_PIXELS = (480, 480)
# The largest form is a page's bulk accept: a few kilobytes. Anything far bigger is refused.
MAX_FORM_BYTES = 1_000_000

# Nothing but our own files: product text that slipped past escaping still could not
# load or run a script, and no other site may frame the pages.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; "
        b"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]

# What a redirect after a verdict may say; the query string carries only the key.
MESSAGES = {
    "accepted": "Saved {n} verdict(s).",
    "taken": "{n} product(s) had already been reviewed by someone else and were left as they are.",
    "audited": "Audit saved.",
    "promoted": "Promoted.",
    "rolled_back": "Rolled back to the previous champion.",
}

Endpoint = Callable[[Request], Awaitable[Response]]


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class WebApp:
    """The routes, bound to one database and one set of settings."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        # Autoescaping on for every template: product names and descriptions are
        # whatever an importer was fed, and are always rendered as text.
        self.templates = Jinja2Templates(
            env=Environment(
                autoescape=True, loader=FileSystemLoader(HERE / "templates"), auto_reload=False
            )
        )

    # -- plumbing -------------------------------------------------------------------------

    def _guarded(self, endpoint: Endpoint, *, admin: bool = False) -> Endpoint:
        async def guarded(request: Request) -> Response:
            token = request.cookies.get(SESSION_COOKIE)
            session = await run_in_threadpool(auth.session_for, self.engine, token)
            if session is None:
                if request.method == "GET":
                    return RedirectResponse(
                        "/login?" + urlencode({"next": request.url.path}), status_code=303
                    )
                return self._error(request, 401, "You are not signed in; sign in and try again.")
            request.state.session = session
            if admin and not session.user.is_admin:
                return self._error(request, 403, "Only an admin may do this.")
            if request.method == "POST":
                form = await request.form()
                if not auth.csrf_matches(session.csrf_token, _field(form, "csrf_token")):
                    log.warning("CSRF token mismatch from user %s", session.user.name)
                    return self._error(
                        request,
                        403,
                        "This form's security token is missing or stale, so nothing was "
                        "changed. Reload the page and try again.",
                    )
                request.state.form = form
            return await endpoint(request)

        return guarded

    def _render(
        self, request: Request, template: str, status_code: int = 200, **context: object
    ) -> Response:
        session = getattr(request.state, "session", None)
        context.update(
            user=session.user if session else None,
            csrf_token=session.csrf_token if session else None,
            message=_message(request),
        )
        return self.templates.TemplateResponse(request, template, context, status_code=status_code)

    def _error(self, request: Request, status_code: int, text: str) -> Response:
        return self._render(request, "error.html", status_code, error=text)

    # -- sign-in --------------------------------------------------------------------------

    async def login_form(self, request: Request, error: str | None = None, status: int = 200):
        token = secrets.token_urlsafe(32)
        response = self._render(
            request,
            "login.html",
            status,
            login_csrf=token,
            next=_local_path(request.query_params.get("next")),
            error=error,
        )
        # Double-submit token: a sign-in form posted from another site (login CSRF)
        # cannot know the cookie's value.
        response.set_cookie(
            LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=_https(request)
        )
        return response

    async def login(self, request: Request) -> Response:
        form = await request.form()
        if not auth.csrf_matches(
            request.cookies.get(LOGIN_CSRF_COOKIE, ""), _field(form, "csrf_token")
        ):
            return await self.login_form(
                request, "The sign-in form expired; please try again.", 403
            )
        client = request.client.host if request.client else "unknown"
        try:
            token = await run_in_threadpool(
                auth.sign_in,
                self.engine,
                _field(form, "name"),
                _field(form, "password"),
                client,
                self.settings.session_minutes,
            )
        except auth.TooManyFailures as exc:
            response = await self.login_form(request, f"Sign-in refused: {exc}.", 429)
            response.headers["retry-after"] = str(int(exc.retry_after.total_seconds()))
            return response
        if token is None:
            return await self.login_form(request, "Wrong name or password.", 401)
        response = RedirectResponse(_local_path(_field(form, "next")), status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=self.settings.session_minutes * 60,
            httponly=True,
            samesite="strict",
            secure=_https(request),
        )
        response.delete_cookie(LOGIN_CSRF_COOKIE)
        return response

    async def logout(self, request: Request) -> Response:
        await run_in_threadpool(auth.sign_out, self.engine, request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    # -- review ---------------------------------------------------------------------------

    async def review_page(self, request: Request) -> Response:
        filters = _review_filters(request.query_params)
        page = await run_in_threadpool(review.review_page, self.engine, **filters)
        return self._render(request, "review.html", page=page, filters=filters)

    async def review_verdict(self, request: Request) -> Response:
        form: FormData = request.state.form
        product_id = _int(_field(form, "product_id"))
        category = _field(form, "category").strip()
        if product_id is None or not category:
            return self._error(request, 400, "Pick a category for the product.")
        return await self._verdicts(request, [(product_id, category)])

    async def review_accept_page(self, request: Request) -> Response:
        form: FormData = request.state.form
        verdicts = []
        for value in form.getlist("accept"):
            product_id, _, category = str(value).partition("|")
            if _int(product_id) is not None and category:
                verdicts.append((int(product_id), category))
        return await self._verdicts(request, verdicts)

    async def _verdicts(self, request: Request, verdicts: list[tuple[int, str]]) -> Response:
        form: FormData = request.state.form
        try:
            report = await run_in_threadpool(
                review.give_verdicts, self.engine, request.state.session.user.id, verdicts
            )
        except ReviewError as exc:
            return self._error(request, 400, f"Nothing was saved: {exc}. Pick a listed category.")
        filters = _review_filters(form, "filter_")
        query = {
            name: filters[key]
            for name, key in (("category", "category_id"), ("batch", "batch_id"))
            if filters[key] is not None
        }
        if report.already_reviewed:
            query.update(msg="taken", n=report.already_reviewed)
        else:
            query.update(msg="accepted", n=report.accepted)
        return RedirectResponse("/review?" + urlencode(query), status_code=303)

    async def categories(self, request: Request) -> Response:
        query = request.query_params.get("q", "")[:100]
        names = await run_in_threadpool(review.search_categories, self.engine, query)
        return JSONResponse(names)

    async def product_image(self, request: Request) -> Response:
        product_id = _int(request.path_params["product_id"])
        data = await run_in_threadpool(self._thumbnail, product_id)
        if data is None:
            return Response("no usable image", status_code=404, media_type="text/plain")
        return Response(data, media_type="image/jpeg")

    def _thumbnail(self, product_id: int | None) -> bytes | None:
        """The product's image, re-encoded as a JPEG thumbnail.

        Read with the worker's own checks (image roots, URL allowlist, size and
        decompression limits), and re-encoded rather than passed through, so whatever
        the file really held, the browser only ever gets a plain JPEG.
        """
        # Imported here: Pillow and numpy load only once an image is asked for.
        from shelver.worker.images import ImageRejected, load_image

        with self.engine.connect() as conn:
            uri = conn.execute(
                text("SELECT image_uri FROM products WHERE id = :id"), {"id": product_id}
            ).scalar_one_or_none()
        if not uri:
            return None
        try:
            image = load_image(uri, self.settings)
        except ImageRejected as exc:
            log.info("not showing the image of product %s: %s", product_id, exc)
            return None
        image.thumbnail(THUMBNAIL_PIXELS)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
        return out.getvalue()

    # -- audit ----------------------------------------------------------------------------

    async def audit_page(self, request: Request) -> Response:
        rate = await run_in_threadpool(audit.audit_rate, self.engine, self.settings)
        items, pending = await run_in_threadpool(audit.audit_sample, self.engine, rate)
        precision = await run_in_threadpool(
            audit.live_precision, self.engine, self.settings.target_precision
        )
        return self._render(
            request,
            "audit.html",
            items=items,
            pending=pending,
            precision=precision,
            rate=rate,
        )

    async def audit_verdict(self, request: Request) -> Response:
        form: FormData = request.state.form
        product_id = _int(_field(form, "product_id"))
        model_version_id = _int(_field(form, "model_version_id"))
        category = _field(form, "category").strip()
        if product_id is None or model_version_id is None or not category:
            return self._error(request, 400, "Confirm the category or pick the right one.")
        try:
            await run_in_threadpool(
                audit.record_audit,
                self.engine,
                request.state.session.user.id,
                product_id,
                model_version_id,
                category,
            )
        except (audit.AuditError, ReviewError) as exc:
            return self._error(request, 409, f"Nothing was saved: {exc}.")
        return RedirectResponse("/audit?msg=audited", status_code=303)

    # -- dashboard and registry -----------------------------------------------------------

    async def dashboard_page(self, request: Request) -> Response:
        board = await run_in_threadpool(dashboard.dashboard, self.engine)
        precision = await run_in_threadpool(
            audit.live_precision, self.engine, self.settings.target_precision
        )
        return self._render(request, "dashboard.html", board=board, precision=precision)

    async def report_image(self, request: Request) -> Response:
        data = await run_in_threadpool(
            dashboard.champion_report_image, self.engine, request.path_params["name"]
        )
        if data is None:
            return Response("no such report image", status_code=404, media_type="text/plain")
        return Response(data, media_type="image/png")

    async def promote(self, request: Request) -> Response:
        version = _field(request.state.form, "version")
        try:
            await run_in_threadpool(dashboard.promote, self.engine, version)
        except RegistryError as exc:
            return self._error(request, 409, str(exc))
        log.info("%s promoted %s", request.state.session.user.name, version)
        return RedirectResponse("/dashboard?msg=promoted", status_code=303)

    async def rollback(self, request: Request) -> Response:
        try:
            await run_in_threadpool(dashboard.rollback, self.engine)
        except RegistryError as exc:
            return self._error(request, 409, str(exc))
        log.info("%s rolled the champion back", request.state.session.user.name)
        return RedirectResponse("/dashboard?msg=rolled_back", status_code=303)

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/review", status_code=303)

    def routes(self) -> list[Route | Mount]:
        guard = self._guarded
        return [
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", guard(self.logout), methods=["POST"]),
            Route("/", guard(self.home), methods=["GET"]),
            Route("/review", guard(self.review_page), methods=["GET"]),
            Route("/review/verdict", guard(self.review_verdict), methods=["POST"]),
            Route("/review/accept-page", guard(self.review_accept_page), methods=["POST"]),
            Route("/categories.json", guard(self.categories), methods=["GET"]),
            Route("/products/{product_id}/image", guard(self.product_image), methods=["GET"]),
            Route("/audit", guard(self.audit_page), methods=["GET"]),
            Route("/audit/verdict", guard(self.audit_verdict), methods=["POST"]),
            Route("/dashboard", guard(self.dashboard_page), methods=["GET"]),
            Route("/dashboard/report/{name}.png", guard(self.report_image), methods=["GET"]),
            Route("/models/promote", guard(self.promote, admin=True), methods=["POST"]),
            Route("/models/rollback", guard(self.rollback, admin=True), methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]


def create_app(engine: Engine, settings: Settings) -> Starlette:
    """The ASGI application on ``engine``; ``settings`` gives the audit rate, the target
    precision, the session length and the image rules."""
    web = WebApp(engine, settings)
    app = Starlette(routes=web.routes(), max_body_size=MAX_FORM_BYTES)
    return SecurityHeaders(app)  # type: ignore[return-value]


def _field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


def _review_filters(params: Mapping[str, Any], prefix: str = "") -> dict[str, int | None]:
    """The review page's filters, from its query string or (prefixed) from a verdict form."""
    return {
        "category_id": _int(params.get(prefix + "category") or ""),
        "batch_id": _int(params.get(prefix + "batch") or ""),
    }


def _local_path(value: str | None) -> str:
    """Where to go after signing in: a path on this site, never another site."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/review"


def _https(request: Request) -> bool:
    return request.url.scheme == "https"


def _message(request: Request) -> str | None:
    template = MESSAGES.get(request.query_params.get("msg", ""))
    if template is None:
        return None
    return template.format(n=_int(request.query_params.get("n", "0")) or 0)
