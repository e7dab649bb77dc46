"""The stream: the broker connection, the messages on it, and applying them in order.

The connection to RabbitMQ and publishing with confirms (``broker``), what a
write is on the stream (``messages``), the consumer that applies the stream to
the store (``consumer``, ``applier``), where the stream begins and whether a
jump lost messages (``streamstart``), checking a state's anchor against the
stream (``verification``), and waiting for an offset or one's own write
(``progress``).

Imports :mod:`gradesvc.state` and nothing above it.
"""
