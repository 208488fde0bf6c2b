"""WebSocket routes (served by daphne through nanostudio/asgi.py)."""

from django.urls import path

from studio import consumers

websocket_urlpatterns = [
    path("ws/runs/<str:run_id>/", consumers.RunConsumer.as_asgi()),
    path("ws/chat/", consumers.ChatConsumer.as_asgi()),
]
