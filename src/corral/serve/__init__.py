"""``corral serve``: many models behind one front door, each a full Corral supervisor.

- :mod:`.app` -- the composition root (signals, sockets, lifetimes).
- :mod:`.catalog`, :mod:`.models` -- which models there are; each one's supervisor.
- :mod:`.model` -- one model: its door on loopback and, while loaded, its supervisor.
- :mod:`.scheduler` -- carries out :func:`corral.core.placement.plan` (loads, evictions).
- :mod:`.edge` -- the public port: each request to the door of the model it names.
- :mod:`.api` -- the management API, the models page and ``/metrics``.
"""
