"""Deploying a trained model: export (SavedModel, TFLite) and an HTTP service with a web page."""
