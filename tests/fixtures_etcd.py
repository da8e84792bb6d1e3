"""Placeholder: the etcd fixtures are written with the etcd driver."""
