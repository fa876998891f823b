"""Running the service locally: bench, demo, replay, and the services they start."""
