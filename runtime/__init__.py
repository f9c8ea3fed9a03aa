"""Runs models and sessions on a TieredStore: the model, KV manager, sessions, CLI and cluster."""
