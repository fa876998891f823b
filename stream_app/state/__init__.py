"""Customer and terminal state: the store interface, Redis and Redis Cluster, loss detection."""
