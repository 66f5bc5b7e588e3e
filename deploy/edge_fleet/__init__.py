"""edge-fleet: the operator's side of edge-agent.

The ``edge-fleet`` command (``cli``) signs and deploys model releases, rolls
them out in waves, watches the fleet, submits jobs, issues certificates and
simulates fleets for testing.  Scripts can use the pieces it is made of, listed in ``__all__``.
"""

from .broker import BrokerOptions, FleetError
from .fleet_view import DeviceRow, FleetView
from .simulate import Simulator
from .submit import JobFailed, Submitter

__all__ = ["BrokerOptions", "DeviceRow", "FleetError", "FleetView", "JobFailed", "Simulator", "Submitter"]
