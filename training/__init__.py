"""Offline side: transaction simulator, LSTM and GAN training, Handbook evaluation, ONNX export.

Imports the serving core in :mod:`stream_app` (event contract, features, ONNX scorer);
never the reverse.
"""
