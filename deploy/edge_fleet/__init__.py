"""edge-fleet: the operator's side of edge-agent.

The ``edge-fleet`` command (``cli``) signs and deploys model releases, rolls
them out in waves, watches the fleet, submits jobs, issues certificates and
simulates fleets for testing; its state file holds the inventory, every desired-state
assignment and the rollouts.  Scripts can use the pieces it is made of, listed in ``__all__``.
"""

from .assignments import Assignment, Assignments
from .broker import BrokerOptions, FleetError
from .fleet_view import DeviceRow, FleetView
from .inventory import Inventory, InventoryRow
from .profile import Profile, load_profile
from .simulate import Simulator
from .submit import JobFailed, Submitter

__all__ = [
    "Assignment",
    "Assignments",
    "BrokerOptions",
    "DeviceRow",
    "FleetError",
    "FleetView",
    "Inventory",
    "InventoryRow",
    "JobFailed",
    "Profile",
    "Simulator",
    "Submitter",
    "load_profile",
]
