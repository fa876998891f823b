"""The analyst review console: alerts become cases, analysts' verdicts become labels.

Layout, one module per concern:

* :mod:`~stream_app.console.settings`: ``FRAUDSTREAM_CONSOLE_*`` settings, validated at start-up.
* :mod:`~stream_app.console.store`: the case store (SQLite by default, PostgreSQL by URL):
  cases, the append-only verdict trail, the label outbox, users.
* :mod:`~stream_app.console.ingest`: the ``alerts`` consumer that opens cases.
* :mod:`~stream_app.console.labels`: publishes verdicts as ``Label`` records on ``labels``.
* :mod:`~stream_app.console.auth`: passwords (argon2), roles, CSRF tokens, the login rate limit.
* :mod:`~stream_app.console.app`: the server-rendered web pages (Starlette + Jinja2).
* :mod:`~stream_app.console.metrics`: the console's Prometheus metrics.
* :mod:`~stream_app.console.service`: runs the consumer, the label publisher and the web
  server together; :mod:`~stream_app.console.commands` is its ``fraudstream console`` CLI.

Nothing here is imported by the worker: the console is an optional extra
(``pip install fraudstream[console]``).
"""
