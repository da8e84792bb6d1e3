"""Fleets through etcd: registration, rollouts (one slot at a time, canary first), views.

- :mod:`.keys` -- where the facts live in etcd; a config's digest.
- :mod:`.rollout` -- :class:`RolloutAgent`, one supervisor's part in rollouts (the decisions
  are :mod:`corral.core.rollout`'s).
- :mod:`.sync` -- :class:`FleetSync` (registration, API changes as canaries, status) and
  :class:`PublishingStore`.
- :mod:`.view` -- ``corral fleet``.
"""

from corral.fleet.sync import FleetSync, PublishingStore, load_for_start

__all__ = ["FleetSync", "PublishingStore", "load_for_start"]
