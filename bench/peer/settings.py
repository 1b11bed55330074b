"""The comparison peer: django-eventstream 5.3.4 on Django + channels + Redis, served by daphne.

Environment: PEER_REDIS_URL (redis://host:port/db), PEER_JWT_SECRET (HS256 secret of the bench tokens).
Live delivery only (no EVENTSTREAM_STORAGE_CLASS): the database is never touched, the most favourable setup
for the peer's latency. Multi-process fan-out through django-eventstream's Redis pub/sub listener.
"""

import os
from urllib.parse import urlparse

_redis = urlparse(os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/0"))

DEBUG = True
SECRET_KEY = "peer-benchmark-only"  # a throw-away benchmark process
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["daphne", "django.contrib.contenttypes", "django.contrib.auth", "channels", "django_eventstream"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "urls"
ASGI_APPLICATION = "asgi.application"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

CHANNEL_LAYERS = {
    "default": {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer", "CONFIG": {"hosts": [_redis.geturl()]}}
}
EVENTSTREAM_REDIS = {"host": _redis.hostname, "port": _redis.port or 6379, "db": int(_redis.path.lstrip("/") or 0)}
EVENTSTREAM_CHANNELMANAGER_CLASS = "channelmanager.BearerChannelManager"
PEER_JWT_SECRET = os.environ.get("PEER_JWT_SECRET", "")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
