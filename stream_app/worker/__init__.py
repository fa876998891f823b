"""``fraudstream worker``: the Faust application, its one Kafka path, and its error policy."""
