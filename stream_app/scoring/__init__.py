"""One micro-batch scored: the pipeline, decisions, operators' controls and alert reasons."""
