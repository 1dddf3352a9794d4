"""Events on the wire and what flows through Kafka: contracts, the embedded broker, replay."""


class StreamsError(Exception):
    """Root of every error raised by the ``streams`` package."""
