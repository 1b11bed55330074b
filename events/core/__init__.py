"""What both processes share and neither owns: the envelope, routing, SSE frames, event records, the store.

No Django models, no server, no Kafka client: everything here is importable by the consumer, the web
process and the admin alike (the import-linter contracts in pyproject.toml keep it so).
"""
