"""Seeing what Corral does: events and log lines (``events``), metrics, the audit log,
systemd notifications. The controller only emits events; everything here listens."""
