"""The cluster runtime: SessionWorkers as Ray Serve replicas behind a session- and prefix-aware router.

Importing this package imports Ray (and Ray Serve); `runtime` itself does not.
"""

from .cluster import Cluster
from .handle import ClusterSession
from .table import RoutingTable

__all__ = ["Cluster", "ClusterSession", "RoutingTable"]
