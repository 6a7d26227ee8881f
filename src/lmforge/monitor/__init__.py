"""Training metrics: writing them (metrics), reading any trainer's logs (logparse), reports."""

from lmforge.monitor.metrics import MetricsWriter, flops_per_token, mfu

__all__ = ["MetricsWriter", "flops_per_token", "mfu"]
