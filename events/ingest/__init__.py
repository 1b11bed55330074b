"""The consumer process (`manage.py run_consumer`): Kafka -> envelope -> store -> announce -> commit.

Also the audit sink (a child process that writes what web processes' streams did to the database), the
dead-letter path, the consumer's own health and metrics server, and the producer used by `publish_event`.
"""
