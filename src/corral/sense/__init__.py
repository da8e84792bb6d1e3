"""Facts about this machine that decisions need (memory now; GPUs and estimates later)."""
