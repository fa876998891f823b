"""Kafka: client configuration, start-up checks, the producer's outputs, zombie fencing."""
