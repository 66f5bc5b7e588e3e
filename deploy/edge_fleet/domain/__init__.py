"""The fleet domain: pure rules shared by the lab mode and the server (no I/O, no clock)."""
