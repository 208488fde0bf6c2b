"""WSGI entry point (for tools that want one; the studio is served over ASGI by daphne)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "nanostudio.settings")

application = get_wsgi_application()
