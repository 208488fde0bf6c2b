"""Which pages may open the studio's WebSockets: only the studio's own origin.

A WebSocket handshake carries the browser's cookies whatever page opens it, so
without this check any page the person visits could open /ws/chat/ with their
session and read their conversations (cross-site WebSocket hijacking). Browsers
send the page's origin with every handshake; it must be

- the origin the handshake itself was sent to: the scheme (ws -> http,
  wss -> https, or https behind a proxy per SECURE_PROXY_SSL_HEADER), the Host
  and its port, with the host in ALLOWED_HOSTS, exactly as Django's CSRF check
  compares a form's Origin; or
- listed in settings.CSRF_TRUSTED_ORIGINS (a reverse proxy whose public origin
  differs from the Host it forwards; "https://*.example.com" covers subdomains).

channels' AllowedHostsOriginValidator compares host names only, so a page on
another port of the same host (http://127.0.0.1:9999 next to the studio on
:8000) passed; here the port and scheme count too.

A handshake without an Origin header is let through: browsers always send one
for WebSockets, so a missing Origin means a program (tests, bench/studio.py, a
script) that already holds the session cookie, which needs no hijacking.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from channels.security.websocket import OriginValidator, WebsocketDenier
from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest

log = logging.getLogger(__name__)


class _Handshake(HttpRequest):
    """The handshake as a Django request, so is_secure() and get_host() apply Django's own rules
    (SECURE_PROXY_SSL_HEADER, USE_X_FORWARDED_HOST, ALLOWED_HOSTS)."""

    def __init__(self, scope: dict):
        super().__init__()
        for name, value in scope.get("headers", []):
            key = "HTTP_" + name.decode("latin1").upper().replace("-", "_")
            self.META[key] = value.decode("latin1")
        self._secure = scope.get("scheme") in ("wss", "https")

    def _get_scheme(self) -> str:
        return "https" if self._secure else "http"


class SameOriginValidator(OriginValidator):
    """Refuses (HTTP 403 at the handshake, before any consumer runs) a WebSocket opened by a page of
    another origin; see the module docstring for what counts as the studio's own origin."""

    def __init__(self, application):
        super().__init__(application, allowed_origins=[])  # decided per handshake, from its Host

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and not self.allowed(scope):
            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)

    def allowed(self, scope: dict) -> bool:
        origins = [value for name, value in scope.get("headers", []) if name.lower() == b"origin"]
        if not origins:
            return True  # not a browser: see the module docstring
        origin = origins[0].decode("latin1") if len(origins) == 1 else ""
        parsed = urlsplit(origin)
        # "null" (sandboxed frames, file: pages) and anything but a web origin is refused.
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            return self._refuse(scope, origin)
        request = _Handshake(scope)
        patterns = [p.replace("://*.", "://.", 1) for p in settings.CSRF_TRUSTED_ORIGINS]  # channels' subdomain syntax
        try:
            patterns.append(f"{request.scheme}://{request.get_host()}")
        except (DisallowedHost, KeyError):  # a Host outside ALLOWED_HOSTS, or none at all
            pass
        try:
            if any(self.match_allowed_origin(parsed, pattern) for pattern in patterns):
                return True
        except ValueError:  # a port that is not a number
            pass
        return self._refuse(scope, origin)

    @staticmethod
    def _refuse(scope: dict, origin: str) -> bool:
        log.warning("WebSocket %s refused: Origin %r is not the studio's own (add it to CSRF_TRUSTED_ORIGINS "
                    "if the studio is served there)", scope.get("path"), origin[:200])
        return False
