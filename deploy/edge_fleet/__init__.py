"""edge-fleet: the operator's side of edge-agent (submit jobs, and later rollouts and fleet views)."""

from .submit import JobFailed, Submitter

__all__ = ["JobFailed", "Submitter"]
