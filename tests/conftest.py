"""Shared fixtures. Fixture modules live beside this file and are loaded as plugins so that
each area (processes, etcd, stores) keeps its own."""

pytest_plugins = ["tests.fixtures_etcd", "tests.fixtures_real"]
