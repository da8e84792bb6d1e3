"""Shared fixtures. Fixture modules live beside this file and are loaded as plugins so that
each area (processes, etcd, stores) keeps its own."""

from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

pytest_plugins = ["tests.fixtures_etcd", "tests.fixtures_real"]


# Generation speed is not what the property tests check: on a loaded machine (make test runs
# several workers) the default too_slow health check fails tests that are otherwise fine.
hypothesis_settings.register_profile(
    "corral", suppress_health_check=[HealthCheck.too_slow], deadline=None)
hypothesis_settings.load_profile("corral")
