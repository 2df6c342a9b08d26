"""The Kafka edge and the embedded sources behind the same interface: raw batches in, bytes out."""

__all__: list[str] = []
