"""The console's web pages: login, queue, case view, verdicts, audit trail, operators'
controls (block and allow lists, threshold overrides), users.

Server-rendered (Starlette + Jinja2, autoescaped; no script at all, so the Content Security
Policy forbids scripts outright). Every page but ``/login`` and ``/healthz`` needs a login;
every form carries the session's CSRF token, checked on every POST. The session is a signed
cookie (``itsdangerous`` through Starlette's ``SessionMiddleware``): HttpOnly, SameSite
strict, Secure unless ``FRAUDSTREAM_CONSOLE_COOKIE_SECURE=false``. It holds the user name,
the CSRF token and a digest of the password hash; the user and role are read from the store
on every request, so a changed password or role takes effect at once.

Logs name users and outcomes, never a customer, terminal, card or transaction.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode

import jinja2
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from stream_app.console import auth
from stream_app.console.metrics import ConsoleMetrics
from stream_app.console.settings import ConsoleSettings
from stream_app.console.store import (
    CaseStatus,
    CaseStore,
    Outcome,
    QueueFilter,
    StoreError,
    User,
)
from stream_app.records import Control, ControlAction

log = logging.getLogger(__name__)

SESSION_COOKIE: Final = "fraudstream_console"
_TEMPLATES: Final = Path(__file__).parent / "templates"
_DATE: Final = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Forbidden(Exception):
    """The user is logged in but may not do this (HTTP 403)."""


class Console:
    """The web application over a case store: build with :func:`create_app`.

    Args:
        store: The case store (schema already created).
        settings: The console settings (SLA, page size, session and login limits).
        metrics: Where verdicts and logins are counted.
        on_label: Called after a verdict queued a label (wakes the label publisher).
        on_control: Called after a control change was stored (wakes its publisher).
    """

    def __init__(
        self,
        store: CaseStore,
        settings: ConsoleSettings,
        metrics: ConsoleMetrics,
        on_label: Callable[[], None] = lambda: None,
        on_control: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.on_label = on_label
        self.on_control = on_control
        self.limiter = auth.LoginRateLimiter(settings.login_max_failures, settings.login_window_s)
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_TEMPLATES),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters["age"] = _age_text
        self.env.filters["utc"] = _utc_text
        self.env.filters["case_url"] = _case_url

    # --- plumbing ------------------------------------------------------------------------
    def render(
        self, request: Request, name: str, status_code: int = 200, **context: Any
    ) -> HTMLResponse:
        """A page, with the user, the CSRF token and any flash message in its context."""
        session = request.session
        if "csrf" not in session:
            session["csrf"] = auth.new_csrf_token()
        flash = session.pop("flash", None)
        html = self.env.get_template(name).render(
            csrf=session["csrf"], flash=flash, user=context.pop("user", None), **context
        )
        return HTMLResponse(html, status_code=status_code)

    async def current_user(self, request: Request) -> User | None:
        """The logged-in user, if the session names one whose password has not changed."""
        name = request.session.get("user")
        if not isinstance(name, str):
            return None
        user = await run_in_threadpool(self.store.user, name)
        if user is None or request.session.get("pw") != auth.hash_fingerprint(user.password_hash):
            request.session.clear()
            return None
        return user

    async def check_csrf(self, request: Request) -> dict[str, str]:
        """The posted form, if its CSRF token is the session's; else :class:`Forbidden`."""
        form = await request.form()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        if not auth.csrf_matches(request.session.get("csrf"), fields.get("csrf")):
            raise Forbidden("the form expired or did not come from this site: reload the page")
        return fields

    def page(
        self, role: auth.Role, handler: Callable[[Request, User], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a handler: login required (else to /login), ``role`` required (else 403)."""

        async def endpoint(request: Request) -> Response:
            user = await self.current_user(request)
            if user is None:
                return RedirectResponse("/login", status_code=303)
            try:
                if not auth.role_allows(user.role, role):
                    raise Forbidden(f"this needs the {role.value} role")
                if request.method == "POST":
                    request.state.form = await self.check_csrf(request)
                return await handler(request, user)
            except Forbidden as exc:
                return self.render(request, "error.html", 403, user=user, message=str(exc))

        return endpoint

    # --- login ---------------------------------------------------------------------------
    async def login_form(self, request: Request) -> Response:
        """The login page."""
        return self.render(request, "login.html")

    async def login(self, request: Request) -> Response:
        """Check the CSRF token, the rate limit and the password; start a fresh session."""
        try:
            form = await self.check_csrf(request)
        except Forbidden as exc:
            return self.render(request, "login.html", 403, error=str(exc))
        username = form.get("username", "").strip().lower()[:64]
        password = form.get("password", "")[:1024]
        client = request.client.host if request.client else "unknown"
        keys = (f"user:{username}", f"addr:{client}")
        if not self.limiter.allowed(keys):
            self.metrics.logins.labels("rate_limited").inc()
            log.warning("login refused by the rate limit for user %r", username)
            return self.render(
                request, "login.html", 429, error="too many failed logins: try again later"
            )
        user = await run_in_threadpool(self.store.user, username)
        ok = await run_in_threadpool(
            auth.verify_password, None if user is None else user.password_hash, password
        )
        if user is None or not ok:
            self.limiter.failed(keys)
            self.metrics.logins.labels("failure").inc()
            log.warning("failed login for user %r", username)
            return self.render(request, "login.html", 401, error="wrong user name or password")
        self.limiter.succeeded(keys[0])
        password_hash = user.password_hash
        if auth.needs_rehash(password_hash):
            password_hash = await run_in_threadpool(auth.hash_password, password)
            await run_in_threadpool(self.store.set_password_hash, user.username, password_hash)
        request.session.clear()  # a new session: no token from before the login survives
        request.session.update(
            user=user.username,
            pw=auth.hash_fingerprint(password_hash),
            csrf=auth.new_csrf_token(),
        )
        self.metrics.logins.labels("success").inc()
        log.info("user %r logged in", user.username)
        return RedirectResponse("/queue", status_code=303)

    async def logout(self, request: Request, user: User) -> Response:
        """End the session."""
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # --- queue and cases -----------------------------------------------------------------
    async def queue(self, request: Request, user: User) -> Response:
        """Cases by score then age, filtered and paged."""
        q = request.query_params
        status_text = q.get("status", "open")
        status = None if status_text == "all" else _enum(CaseStatus, status_text, CaseStatus.OPEN)
        assignee = q.get("assignee", "").strip()
        filters = QueueFilter(
            status=status,
            decision=q.get("decision") if q.get("decision") in ("review", "decline") else None,
            assignee=user.username if assignee == "me" else (assignee or None),
            unassigned=assignee == "none",
            model_version=q.get("model_version") or None,
            date_from=q.get("date_from") if _DATE.match(q.get("date_from", "")) else None,
            date_to=q.get("date_to") if _DATE.match(q.get("date_to", "")) else None,
        )
        page = max(1, _int(q.get("page"), 1))
        size = self.settings.page_size
        cases, total = await run_in_threadpool(
            self.store.queue, filters, limit=size, offset=(page - 1) * size
        )
        versions = await run_in_threadpool(self.store.model_versions)
        pages = max(1, math.ceil(total / size))
        kept = {k: v for k, v in q.items() if k != "page" and v}
        return self.render(
            request,
            "queue.html",
            user=user,
            cases=cases,
            total=total,
            page=page,
            pages=pages,
            prev_url=f"/queue?{urlencode({**kept, 'page': page - 1})}" if page > 1 else None,
            next_url=f"/queue?{urlencode({**kept, 'page': page + 1})}" if page < pages else None,
            now=time.time(),
            sla_s=self.settings.sla_s,
            status=status_text,
            decision=q.get("decision", ""),
            assignee=assignee,
            model_version=q.get("model_version", ""),
            model_versions=versions,
            date_from=filters.date_from or "",
            date_to=filters.date_to or "",
        )

    async def case_view(self, request: Request, user: User) -> Response:
        """One case: the transaction, score, decision and reasons, related cases, verdicts."""
        case = await run_in_threadpool(self.store.case, request.path_params["transaction_id"])
        if case is None:
            return self.render(request, "error.html", 404, user=user, message="no such case")
        related = await run_in_threadpool(self.store.related_cases, case)
        timeline = await run_in_threadpool(self.store.customer_cases, case.customer_id)
        customer_history = await run_in_threadpool(
            lambda: self.store.history(customer_id=case.customer_id)
        )
        terminal_history = await run_in_threadpool(
            lambda: self.store.history(terminal_id=case.terminal_id)
        )
        verdicts = await run_in_threadpool(self.store.verdicts, case.transaction_id)
        supervisor = auth.role_allows(user.role, auth.Role.SUPERVISOR)
        return self.render(
            request,
            "case.html",
            user=user,
            case=case,
            related=related,
            timeline=list(reversed(timeline)),
            customer_history=customer_history,
            terminal_history=terminal_history,
            verdicts=verdicts,
            now=time.time(),
            sla_s=self.settings.sla_s,
            mine=case.assignee == user.username,
            can_claim=case.assignee is None
            and (
                case.status is CaseStatus.OPEN
                or (case.status is CaseStatus.ESCALATED and supervisor)
            ),
            can_release=case.assignee is not None
            and case.status is not CaseStatus.CLOSED
            and (case.assignee == user.username or supervisor),
            outcomes=[o.value for o in Outcome],
            can_correct=supervisor and case.status is CaseStatus.CLOSED,
            supervisor=supervisor,
        )

    async def claim(self, request: Request, user: User) -> Response:
        """Take a case, unless someone else holds it."""
        tx = request.path_params["transaction_id"]
        supervisor = auth.role_allows(user.role, auth.Role.SUPERVISOR)
        if not await run_in_threadpool(
            self.store.claim, tx, user.username, escalated_too=supervisor
        ):
            request.session["flash"] = "not claimed: someone else holds it, or it is not open"
        return RedirectResponse(_case_url(tx), status_code=303)

    async def take_next(self, request: Request, user: User) -> Response:
        """Claim the top case nobody holds and open it ("take next")."""
        supervisor = auth.role_allows(user.role, auth.Role.SUPERVISOR)
        tx = await run_in_threadpool(
            lambda: self.store.claim_next(user.username, escalated_too=supervisor)
        )
        if tx is None:
            request.session["flash"] = "no case left to take"
            return RedirectResponse("/queue", status_code=303)
        return RedirectResponse(_case_url(tx), status_code=303)

    async def correct(self, request: Request, user: User) -> Response:
        """Change a closed case's outcome (supervisors): a new verdict and a new label."""
        tx = request.path_params["transaction_id"]
        form: dict[str, str] = request.state.form
        note = form.get("note", "")
        try:
            outcome = Outcome(form.get("outcome", ""))
            if not note.strip():
                raise StoreError("say why in the note")
            await run_in_threadpool(
                lambda: self.store.correct_verdict(tx, outcome, note, user.username)
            )
        except (ValueError, StoreError) as exc:
            request.session["flash"] = f"not corrected: {exc}"
            return RedirectResponse(_case_url(tx), status_code=303)
        self.on_label()
        log.info("user %r corrected a verdict to %s", user.username, outcome.value)
        request.session["flash"] = f"verdict corrected: {outcome.value}"
        return RedirectResponse(_case_url(tx), status_code=303)

    async def release(self, request: Request, user: User) -> Response:
        """Give a case back to the queue (a supervisor may release anyone's)."""
        tx = request.path_params["transaction_id"]
        supervisor = auth.role_allows(user.role, auth.Role.SUPERVISOR)
        if not await run_in_threadpool(self.store.release, tx, user.username, anyone=supervisor):
            request.session["flash"] = "not released: you do not hold this case"
        return RedirectResponse(_case_url(tx), status_code=303)

    async def verdict(self, request: Request, user: User) -> Response:
        """Record fraud, legitimate or escalate on a case one holds; queue its label."""
        tx = request.path_params["transaction_id"]
        form: dict[str, str] = request.state.form
        try:
            outcome = Outcome(form.get("outcome", ""))
        except ValueError:
            request.session["flash"] = "choose fraud, legitimate or escalate"
            return RedirectResponse(_case_url(tx), status_code=303)
        note = form.get("note", "")
        if outcome is Outcome.ESCALATE and not note.strip():
            request.session["flash"] = "say why in the note when escalating"
            return RedirectResponse(_case_url(tx), status_code=303)
        try:
            recorded = await run_in_threadpool(
                self.store.record_verdict, tx, outcome, note, user.username
            )
        except StoreError as exc:
            request.session["flash"] = f"not recorded: {exc}"
            return RedirectResponse(_case_url(tx), status_code=303)
        self.metrics.verdicts.labels(outcome.value).inc()
        if outcome is not Outcome.ESCALATE:
            self.metrics.time_to_verdict.observe(recorded.time_to_verdict_s)
        if recorded.label is not None:
            self.on_label()
        log.info("user %r recorded a %s verdict", user.username, outcome.value)
        request.session["flash"] = f"verdict recorded: {outcome.value}"
        return RedirectResponse("/queue", status_code=303)

    async def audit(self, request: Request, user: User) -> Response:
        """The verdict trail, newest first (supervisors)."""
        page = max(1, _int(request.query_params.get("page"), 1))
        verdicts = await run_in_threadpool(
            self.store.recent_verdicts, limit=200, offset=(page - 1) * 200
        )
        return self.render(request, "audit.html", user=user, verdicts=verdicts, page=page)

    # --- operators' controls --------------------------------------------------------------
    async def controls(self, request: Request, user: User) -> Response:
        """Lists and threshold overrides in force, forms to change them, and their trail."""
        in_force = await run_in_threadpool(self.store.controls_in_force)
        history = await run_in_threadpool(lambda: self.store.control_changes(limit=100))
        versions = await run_in_threadpool(self.store.model_versions)
        entries = sorted(in_force.entries.values(), key=lambda c: c.changed_at, reverse=True)
        return self.render(
            request,
            "controls.html",
            user=user,
            lists=[c for c in entries if c.action is not ControlAction.THRESHOLDS],
            overrides=[c for c in entries if c.action is ControlAction.THRESHOLDS],
            history=list(reversed(history)),
            model_versions=versions,
            subject=request.query_params.get("subject", ""),
            subject_id=request.query_params.get("subject_id", ""),
        )

    async def _change_control(
        self, request: Request, user: User, fields: dict[str, Any]
    ) -> Response:
        form: dict[str, str] = request.state.form
        note = " ".join(form.get("note", "").split())
        if not note:
            request.session["flash"] = "not changed: say why in the note"
            return RedirectResponse("/controls", status_code=303)
        try:
            control = Control.model_validate(
                {
                    **fields,
                    "changed_by": user.username,
                    "changed_at": datetime.now(UTC),
                    "note": note,
                }
            )
        except ValidationError as exc:
            problems = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
            request.session["flash"] = f"not changed: {problems}"
            return RedirectResponse("/controls", status_code=303)
        await run_in_threadpool(self.store.record_control, control)
        self.on_control()
        # Logs name the user and the kind of change, never the customer or terminal.
        log.info(
            "user %r %s a %s control",
            user.username,
            "set" if control.active else "lifted",
            control.action.value,
        )
        what = "lifted" if not control.active else "in force"
        request.session["flash"] = (
            f"{control.action.value} control {what}; workers apply it within seconds"
        )
        return RedirectResponse("/controls", status_code=303)

    async def add_list_entry(self, request: Request, user: User) -> Response:
        """Put a customer or terminal on the block or allow list (supervisors)."""
        form: dict[str, str] = request.state.form
        fields = {
            "action": form.get("list", ""),
            "subject": form.get("subject", ""),
            "subject_id": form.get("subject_id", "").strip(),
            "active": True,
        }
        if fields["action"] not in (ControlAction.BLOCK, ControlAction.ALLOW):
            request.session["flash"] = "not changed: choose the block or the allow list"
            return RedirectResponse("/controls", status_code=303)
        return await self._change_control(request, user, fields)

    async def set_thresholds(self, request: Request, user: User) -> Response:
        """Override a champion version's review and decline thresholds (supervisors)."""
        form: dict[str, str] = request.state.form
        fields: dict[str, Any] = {
            "action": ControlAction.THRESHOLDS,
            "model_version": form.get("model_version", "").strip(),
            "active": True,
        }
        for name in ("review_threshold", "decline_threshold"):
            try:
                fields[name] = float(form.get(name, ""))
            except ValueError:
                request.session["flash"] = f"not changed: {name.replace('_', ' ')} is a number"
                return RedirectResponse("/controls", status_code=303)
        return await self._change_control(request, user, fields)

    async def lift_control(self, request: Request, user: User) -> Response:
        """Lift a list entry or a threshold override in force (supervisors)."""
        form: dict[str, str] = request.state.form
        in_force = await run_in_threadpool(self.store.controls_in_force)
        current = in_force.entries.get(form.get("key", ""))
        if current is None:
            request.session["flash"] = "not changed: that control is no longer in force"
            return RedirectResponse("/controls", status_code=303)
        fields = current.model_dump(
            include={"action", "subject", "subject_id", "model_version"}, exclude_none=True
        )
        return await self._change_control(request, user, {**fields, "active": False})

    async def users(self, request: Request, user: User) -> Response:
        """The users and their roles (admins); created with ``fraudstream console add-user``."""
        users = await run_in_threadpool(self.store.users)
        return self.render(request, "users.html", user=user, users=users)


def create_app(
    store: CaseStore,
    settings: ConsoleSettings,
    metrics: ConsoleMetrics,
    on_label: Callable[[], None] = lambda: None,
    on_control: Callable[[], None] = lambda: None,
    lifespan: Any = None,
) -> Starlette:
    """The console's ASGI application (see :class:`Console` for the arguments)."""
    console = Console(store, settings, metrics, on_label, on_control)
    analyst, supervisor, admin = auth.Role.ANALYST, auth.Role.SUPERVISOR, auth.Role.ADMIN

    async def home(request: Request, user: User) -> Response:
        return RedirectResponse("/queue", status_code=303)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    routes = [
        Route("/login", console.login_form, methods=["GET"]),
        Route("/login", console.login, methods=["POST"]),
        Route("/logout", console.page(analyst, console.logout), methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/", console.page(analyst, home), methods=["GET"]),
        Route("/queue", console.page(analyst, console.queue), methods=["GET"]),
        Route("/cases/{transaction_id}", console.page(analyst, console.case_view), methods=["GET"]),
        Route(
            "/cases/{transaction_id}/claim", console.page(analyst, console.claim), methods=["POST"]
        ),
        Route(
            "/cases/{transaction_id}/release",
            console.page(analyst, console.release),
            methods=["POST"],
        ),
        Route(
            "/cases/{transaction_id}/verdict",
            console.page(analyst, console.verdict),
            methods=["POST"],
        ),
        Route("/queue/next", console.page(analyst, console.take_next), methods=["POST"]),
        Route(
            "/cases/{transaction_id}/correct",
            console.page(supervisor, console.correct),
            methods=["POST"],
        ),
        Route("/audit", console.page(supervisor, console.audit), methods=["GET"]),
        Route("/controls", console.page(supervisor, console.controls), methods=["GET"]),
        Route("/controls/list", console.page(supervisor, console.add_list_entry), methods=["POST"]),
        Route(
            "/controls/thresholds",
            console.page(supervisor, console.set_thresholds),
            methods=["POST"],
        ),
        Route("/controls/lift", console.page(supervisor, console.lift_control), methods=["POST"]),
        Route("/users", console.page(admin, console.users), methods=["GET"]),
    ]
    middleware = [
        Middleware(BaseHTTPMiddleware, dispatch=_security_headers),
        Middleware(
            SessionMiddleware,
            secret_key=settings.session_secret,
            session_cookie=SESSION_COOKIE,
            max_age=settings.session_max_age_s,
            same_site="strict",
            https_only=settings.cookie_secure,
        ),
    ]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.console = console
    return app


async def _security_headers(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """No framing, no sniffing, no referrer, no caching, no script: on every response."""
    response = await call_next(request)
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _case_url(transaction_id: str) -> str:
    from urllib.parse import quote

    return "/cases/" + quote(transaction_id, safe="")


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def _enum(kind: type[CaseStatus], text: str, default: CaseStatus) -> CaseStatus:
    try:
        return kind(text)
    except ValueError:
        return default


def _age_text(seconds: float) -> str:
    """``3 d 4 h``, ``2 h 5 min``, ``7 min``: a case's age at a glance."""
    s = int(max(0, seconds))
    if s >= 86_400:
        return f"{s // 86_400} d {s % 86_400 // 3600} h"
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 60} min"


def _utc_text(epoch_s: float | None) -> str:
    if epoch_s is None:
        return ""
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
