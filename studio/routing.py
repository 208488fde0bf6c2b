"""WebSocket routes (served by daphne through nanostudio/asgi.py).

Live run monitoring and chat consumers register here; none yet.
"""

websocket_urlpatterns: list = []
