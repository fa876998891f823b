"""Offline commands of the ``fraudstream`` CLI, one module per command.

* :mod:`~training.commands.simulate`: ``simulate``, labelled transactions;
* :mod:`~training.commands.train`: ``train``, the LSTM, its thresholds and its export;
* :mod:`~training.commands.export`: ``export``, a trained model to ONNX again, parity checked;
* :mod:`~training.commands.evaluate`: ``evaluate``, the Handbook's protocol over every model;
* :mod:`~training.commands.score_file`: ``score-file``, offline scoring as the worker would;
* :mod:`~training.commands.options`: the options, settings and error output they share;
* :mod:`~training.commands.progress`: the epoch progress bars of train and evaluate.

Only typer is imported at module level; each command imports what it needs when it runs, so
``--help`` works without torch or pandas. ``stream_app.cli.COMMANDS`` registers them.
"""
