"""ASGI entry point: `daphne nanostudio.asgi:application`.

HTTP goes to Django; WebSockets go through the same-origin check (studio/origin.py:
only pages of the studio itself may open them, before any consumer runs) and
Channels' session/auth middleware to the routes in studio/routing.py.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "nanostudio.settings")

# Set up Django (apps, settings) before importing anything that touches models.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from studio.origin import SameOriginValidator  # noqa: E402
from studio.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": SameOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
