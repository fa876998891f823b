"""The models that serve: ONNX Runtime scoring, model cards, the champion and its challenger."""
