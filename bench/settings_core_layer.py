"""The gateway's settings on channels_redis' core (list-based) layer instead of pub/sub.

For the layer comparison only: `bench/delivery.py --systems core-layer` passes it as DJANGO_SETTINGS_MODULE to
the web and consumer processes. Everything else is gateway_project.settings unchanged.
"""

from gateway_project.settings import *  # noqa: F403
from gateway_project.settings import REDIS_URL

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL]},
    }
}
