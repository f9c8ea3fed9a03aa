"""`tiered simulate`: trace-driven simulation of a cluster's KV tiers with the registry's policies."""

from .config import SimConfig, sweep
from .engine import Simulation, simulate
from .profile import HardwareProfile, Link, load_profile, shipped_profiles
from .trace import Trace, TraceRequest, parse_trace, read_trace, write_trace

__all__ = [
    "HardwareProfile",
    "Link",
    "SimConfig",
    "Simulation",
    "Trace",
    "TraceRequest",
    "load_profile",
    "parse_trace",
    "read_trace",
    "shipped_profiles",
    "simulate",
    "sweep",
    "write_trace",
]
