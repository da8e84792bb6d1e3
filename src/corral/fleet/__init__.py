"""Fleets through etcd: registration, rollouts (one slot at a time, canary first), views.

- :mod:`.keys` -- where the facts live in etcd; a config's digest.
- :mod:`.rollout` -- :class:`RolloutAgent`, one supervisor's part in rollouts (the decisions
  are :mod:`corral.core.rollout`'s).
- :mod:`.sync` -- :class:`FleetSync` (registration, API changes as canaries, status) and
  :class:`PublishingStore`.
- :mod:`.view` -- ``corral fleet``.
- :mod:`.balance` -- ``corral balance``: an HAProxy backend kept equal to the fleet
  (:mod:`.haproxy` speaks the Runtime API, :mod:`.drain` is the drain-before-apply
  hand-shake in etcd, :mod:`.balance_app` the command's composition root).
"""

from corral.fleet.sync import FleetSync, PublishingStore, load_for_start

__all__ = ["FleetSync", "PublishingStore", "load_for_start"]
