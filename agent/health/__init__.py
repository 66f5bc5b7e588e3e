"""Health: telemetry models and thresholds, system readings (``probe``), systemd notification."""
