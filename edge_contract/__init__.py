"""The wire contract shared by the box (``agent``) and the fleet (``edge_fleet``).

The bottom of the import graph: the messages that travel over MQTT (jobs, results,
status, telemetry, manifests, desired state), ``Topics`` (the only place a topic is
spelled), the error codes and the sampling parameters.  It imports pydantic and
nothing of the project; both sides import it.
"""

#: The version of edge-agent and of this contract (the box and the fleet ship together).
__version__ = "0.1.0"
