"""WebSocket routes (served by daphne through nanostudio/asgi.py)."""

from channels.security.websocket import WebsocketDenier
from django.urls import path, re_path

from studio import consumers

websocket_urlpatterns = [
    # Run ids are made by studio.models.new_run_id (letters, digits, "-"); anything else cannot name a run.
    re_path(r"^ws/runs/(?P<run_id>[A-Za-z0-9_.-]{1,64})/$", consumers.RunConsumer.as_asgi()),
    path("ws/chat/", consumers.ChatConsumer.as_asgi()),
    # Any other path is refused at the handshake (HTTP 403, nothing accepted): without this catch-all,
    # channels' URLRouter raises "No route found" and daphne logs a traceback for every stray request.
    re_path(r"", WebsocketDenier.as_asgi()),
]
