"""Accuracy and speed measurement of models and artifacts."""
