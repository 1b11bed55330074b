"""Settings for events-gateway: every environment variable is read here, once, typed.

The variables and their defaults are the contract's (section 2); `.env.example` documents each one.
"""

from __future__ import annotations

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
if (BASE_DIR / ".env").is_file():
    environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DEBUG = env.bool("DJANGO_DEBUG", default=False)
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY is required unless DJANGO_DEBUG=true")
    SECRET_KEY = "insecure-development-key-only-used-with-DJANGO_DEBUG"  # noqa: S105

ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1"])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "events",
    "subscriptions",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "events.delivery.cors.CorsMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "gateway_project.urls"
ASGI_APPLICATION = "gateway_project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": env.db_url("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the web and consumer processes read while one of them writes audits.
    DATABASES["default"].setdefault("OPTIONS", {})
    DATABASES["default"]["OPTIONS"].update(
        {"timeout": 20, "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"}
    )
else:
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=0)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
LOGIN_URL = "/admin/login/"

REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")
# A Redis Cluster: REDIS_URL names one of its nodes; the event store is split into EVENTS_STORE_SHARDS shards
# (one hash slot each, spread over the masters). A single Redis has one shard (docs/event-store.md).
REDIS_CLUSTER = env.bool("REDIS_CLUSTER", default=False)
EVENTS_STORE_SHARDS = env.int("EVENTS_STORE_SHARDS", default=16) if REDIS_CLUSTER else 1
if not 1 <= EVENTS_STORE_SHARDS <= 64:
    raise ImproperlyConfigured("EVENTS_STORE_SHARDS must be between 1 and 64")
# Django's cache lives in the same Redis, and sessions are read from it: the database is asked only for a
# session not cached there (written at login, on every save, and on a miss), so a reconnect storm of
# session-cookie streams does not land on the database. Logging out deletes the session from both.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "events-gateway:cache",
        # Executor threads wait on it: a Redis that does not answer must not hold them (as the hub's client).
        "OPTIONS": {"socket_timeout": 5, "socket_connect_timeout": 2},
    }
}
# Django's Redis cache speaks to one node: on a Redis Cluster sessions are read from the database.
SESSION_ENGINE = f"django.contrib.sessions.backends.{'db' if REDIS_CLUSTER else 'cached_db'}"
CHANNEL_LAYERS = {
    "default": {
        # The pub/sub layer: one PUBLISH per announcement whatever the number of web processes,
        # and no per-channel capacity to overflow (see docs/event-store.md for the measurement).
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL]},
    }
}

# --- Kafka ---
KAFKA_BOOTSTRAP_SERVERS = env.list("KAFKA_BOOTSTRAP_SERVERS", default=["localhost:9092"])
KAFKA_SECURITY_PROTOCOL = env.str("KAFKA_SECURITY_PROTOCOL", default="PLAINTEXT")
KAFKA_SASL_MECHANISM = env.str("KAFKA_SASL_MECHANISM", default="")
KAFKA_SASL_USERNAME = env.str("KAFKA_SASL_USERNAME", default="")
KAFKA_SASL_PASSWORD = env.str("KAFKA_SASL_PASSWORD", default="")
KAFKA_TOPICS = env.list("KAFKA_TOPICS", default=["messaging_events_topic"])
KAFKA_TOPIC_TYPES = env.dict("KAFKA_TOPIC_TYPES", default={})
KAFKA_GROUP_ID = env.str("KAFKA_GROUP_ID", default="events-gateway")
KAFKA_DLQ_TOPIC = env.str("KAFKA_DLQ_TOPIC", default="messaging_events_topic.DLQ")
KAFKA_MESSAGE_MAX_BYTES = env.int("KAFKA_MESSAGE_MAX_BYTES", default=52_428_800)
KAFKA_SESSION_TIMEOUT_MS = env.int("KAFKA_SESSION_TIMEOUT_MS", default=10_000)
# How long the broker may hold a fetch open while it has nothing to return. Apache Kafka answers a held
# fetch as soon as records arrive, so this costs no latency there; brokers that wait it out (the embedded
# one) need a small value, which the embedded runner and the tests set.
KAFKA_FETCH_MAX_WAIT_MS = env.int("KAFKA_FETCH_MAX_WAIT_MS", default=500)
KAFKA_SSL_CAFILE = env.str("KAFKA_SSL_CAFILE", default="")
KAFKA_SSL_CERTFILE = env.str("KAFKA_SSL_CERTFILE", default="")
KAFKA_SSL_KEYFILE = env.str("KAFKA_SSL_KEYFILE", default="")
if KAFKA_SECURITY_PROTOCOL not in {"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"}:
    raise ImproperlyConfigured(f"KAFKA_SECURITY_PROTOCOL={KAFKA_SECURITY_PROTOCOL!r} is not supported")
if KAFKA_SASL_MECHANISM not in {"", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"}:
    raise ImproperlyConfigured(f"KAFKA_SASL_MECHANISM={KAFKA_SASL_MECHANISM!r} is not supported")

# --- Events and streams ---
EVENTS_RETENTION_SECONDS = env.int("EVENTS_RETENTION_SECONDS", default=14_400)
EVENTS_HEARTBEAT_SECONDS = env.float("EVENTS_HEARTBEAT_SECONDS", default=15.0)
EVENTS_RETRY_MS = env.int("EVENTS_RETRY_MS", default=3000)
EVENTS_MAX_STREAMS_PER_USER = env.int("EVENTS_MAX_STREAMS_PER_USER", default=10)
EVENTS_STREAM_BUFFER = env.int("EVENTS_STREAM_BUFFER", default=1000)
EVENTS_SLOW_CLIENT_BYTES = env.int("EVENTS_SLOW_CLIENT_BYTES", default=1_048_576)
EVENTS_SLOW_CLIENT_SECONDS = env.float("EVENTS_SLOW_CLIENT_SECONDS", default=30.0)
# A bearer stream says `token-expiring` this long before its token's exp: time for the page to get a fresh
# token from its identity provider and POST it (a minute covers a silent refresh with retries).
EVENTS_TOKEN_RENEW_SECONDS = env.int("EVENTS_TOKEN_RENEW_SECONDS", default=60)
if EVENTS_TOKEN_RENEW_SECONDS < 0:
    raise ImproperlyConfigured("EVENTS_TOKEN_RENEW_SECONDS must be 0 or more")

# --- Bearer tokens (off unless a key is set) ---
JWT_ALGORITHMS = env.list("JWT_ALGORITHMS", default=["RS256"])
JWT_PUBLIC_KEY = env.str("JWT_PUBLIC_KEY", default="", multiline=True)
JWT_SECRET = env.str("JWT_SECRET", default="")
JWT_AUDIENCE = env.str("JWT_AUDIENCE", default="")
JWT_ISSUER = env.str("JWT_ISSUER", default="")
JWT_USER_CLAIM = env.str("JWT_USER_CLAIM", default="preferred_username")
# Keys are also taken from this JWKS endpoint (cached, refetched on rotation); tokens name theirs by `kid`.
JWT_JWKS_URL = env.str("JWT_JWKS_URL", default="")
# Addresses (or CIDR networks) of the proxies in front: X-Forwarded-For is believed only from these.
TRUSTED_PROXIES = env.list("TRUSTED_PROXIES", default=[])
# The demo page and its publish endpoint (any user could publish to what they follow): off unless asked for.
DEMO_ENABLED = env.bool("DEMO_ENABLED", default=False)

CORS_ALLOWED_ORIGINS = env.list("CORS_ALLOWED_ORIGINS", default=[])
AUDIT_DELIVERIES = env.str("AUDIT_DELIVERIES", default="all")
if AUDIT_DELIVERIES not in {"all", "failures", "off"}:
    raise ImproperlyConfigured("AUDIT_DELIVERIES must be all, failures or off")

CONSUMER_METRICS_PORT = env.int("CONSUMER_METRICS_PORT", default=9108)

# --- Security (TLS usually ends at the proxy in front) ---
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=False)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_SECURE = not DEBUG
CSRF_COOKIE_SECURE = not DEBUG
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=0 if DEBUG else 31_536_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = not DEBUG
SECURE_HSTS_PRELOAD = not DEBUG
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])
SILENCED_SYSTEM_CHECKS = [
    # TLS ends at the proxy in front by default; DJANGO_SECURE_SSL_REDIRECT=true turns the redirect on.
    "security.W008",
]

LOG_FORMAT = env.str("LOG_FORMAT", default="text")
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {"()": "gateway_project.logging.JsonFormatter"},
        "text": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "json" if LOG_FORMAT == "json" else "text"}
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "aiokafka": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
        "daphne.access": {"level": "INFO"},
        "django.request": {"level": "ERROR"},
    },
}
