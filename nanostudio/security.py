"""Small pieces of the studio's protection that settings.py points to.

- ContentSecurityPolicyMiddleware: the Content-Security-Policy header on every
  response (Django 5.2 has none built in; on Django 6 settings.py uses
  django.middleware.csp instead, with the same SECURE_CSP setting).
- login_locked_out: the page django-axes shows after too many failed logins.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm
from django.shortcuts import render
from django.utils.deprecation import MiddlewareMixin


def csp_header(policy: dict) -> str:
    """{"script-src": ["'self'"], ...} -> "script-src 'self'; ..." (Django 6's SECURE_CSP format)."""
    return "; ".join(" ".join([directive, *values]) for directive, values in policy.items())


class ContentSecurityPolicyMiddleware(MiddlewareMixin):
    """Adds settings.SECURE_CSP as the Content-Security-Policy header, unless a view set its own.

    A fixed policy with no nonces: the pages load every script and style from
    /static/ and pass data in json_script blocks, so nothing inline needs one.
    Our own ~10 lines rather than django-csp: Django 6 ships this middleware,
    and a dependency for one constant header would outlive its use.
    """

    def __init__(self, get_response):
        super().__init__(get_response)
        self.header = csp_header(settings.SECURE_CSP)

    def process_response(self, request, response):
        if self.header and "Content-Security-Policy" not in response.headers:
            response.headers["Content-Security-Policy"] = self.header
        return response


def login_locked_out(request, original_response=None, credentials=None, *args):
    """django-axes' AXES_LOCKOUT_CALLABLE: the login page again, saying why and for how long (HTTP 429).

    axes calls it as (request, response, credentials) from a sync request and
    (request, credentials) from an async one; neither argument is needed here.
    """
    minutes = round(settings.AXES_COOLOFF_TIME.total_seconds() / 60)
    return render(request, "registration/login.html", {
        "form": AuthenticationForm(request),
        "next": request.POST.get("next", "") or request.GET.get("next", ""),
        "locked_out": True,
        "lockout_minutes": minutes,
        "failure_limit": settings.AXES_FAILURE_LIMIT,
    }, status=429)
