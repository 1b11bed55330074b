"""Operators' tools behind management commands: follow the store (tail), resend dead letters (replay)."""
