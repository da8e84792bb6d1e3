"""Shared fixtures. Fixture modules live beside this file and are loaded as plugins so that
each area (processes, etcd, stores) keeps its own."""

import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

# The code under test is the code that ships: an editable install compiles the front door
# beside its source (setup.py), and Python imports the compiled module first, so one whose
# source changed is rebuilt before anything imports it (scripts/compiled_front.py).
subprocess.run([sys.executable, "scripts/compiled_front.py"],
               cwd=Path(__file__).resolve().parent.parent, check=True)

pytest_plugins = ["tests.fixtures_etcd", "tests.fixtures_real"]


# Generation speed is not what the property tests check: on a loaded machine (make test runs
# several workers) the default too_slow health check fails tests that are otherwise fine.
hypothesis_settings.register_profile(
    "corral", suppress_health_check=[HealthCheck.too_slow], deadline=None)
hypothesis_settings.load_profile("corral")
