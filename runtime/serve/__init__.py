"""`tiered serve`: an OpenAI-compatible HTTP front (FastAPI on Ray Serve) on the cluster runtime.

    runtime.serve.app:build(args)   the Serve application: an ingress deployment that routes every
                                    request through the cluster's SessionRouter to a SessionReplica

Importing this package imports nothing heavy; runtime.serve.app imports Ray Serve.
"""
