"""A stream's channels: its user's (from the bearer token, as the gateway does) and the broadcast channel."""

import jwt
from django.conf import settings
from django_eventstream.channelmanager import DefaultChannelManager


def user_channel(user: str) -> str:
    return f"user-{user}"


BROADCAST = "broadcast"


class BearerChannelManager(DefaultChannelManager):
    def get_channels_for_request(self, request, view_kwargs):
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return set()
        try:
            claims = jwt.decode(header[7:], settings.PEER_JWT_SECRET, algorithms=["HS256"])
        except jwt.InvalidTokenError:
            return set()
        return {user_channel(str(claims["preferred_username"])), BROADCAST}
