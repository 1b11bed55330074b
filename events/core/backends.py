"""Redis clients for the configured deployment: one Redis, or a Redis Cluster (REDIS_CLUSTER)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from django.conf import settings
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from events.core.routing import Keyspace


def redis_client(*, timeout: float, connect_timeout: float) -> Any:
    """A client of REDIS_URL: redis.asyncio.Redis, or RedisCluster when REDIS_CLUSTER is on."""
    if settings.REDIS_CLUSTER:
        return RedisCluster.from_url(settings.REDIS_URL, socket_timeout=timeout, socket_connect_timeout=connect_timeout)
    return aioredis.from_url(settings.REDIS_URL, socket_timeout=timeout, socket_connect_timeout=connect_timeout)


def keyspace() -> Keyspace:
    return Keyspace(shards=settings.EVENTS_STORE_SHARDS, cluster=settings.REDIS_CLUSTER)


def channel_nodes(client: Any) -> Callable[[str], tuple[str, Any]]:
    """For the live feed: the node serving a channel, and a plain client of that node (subscriber
    connections are per node; on a cluster the node is the master of the channel's hash slot)."""
    if not isinstance(client, RedisCluster):
        return lambda channel: ("redis", client)
    nodes: dict[str, aioredis.Redis] = {}

    def node_of(channel: str) -> tuple[str, Any]:
        node = client.nodes_manager.get_node_from_slot(key_slot(channel.encode()))
        if node.name not in nodes:
            kwargs = {k: v for k, v in node.connection_kwargs.items() if k in _NODE_OPTIONS}
            nodes[node.name] = aioredis.Redis(host=node.host, port=int(node.port), **kwargs)
        return node.name, nodes[node.name]

    return node_of


_NODE_OPTIONS = {"username", "password", "ssl", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"}
