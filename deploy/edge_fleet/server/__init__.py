"""edge-fleet server: the control plane as a long-running process (see ``docs/fleet-server.md``)."""
