"""The supervisor of one llama-server, as a unit: a second supervisor in the same process
needs nothing but a second :class:`Controller`.

- :mod:`.controller` -- :class:`Controller`, the one owner (and the only writer) of a
  llama-server's state: applies, revivals and shutdown, one at a time.
- :mod:`.apply` -- carries out an apply's plan of steps and says what happened.
- :mod:`.slots`, :mod:`.liveness` -- the servers it owns; the health probe of the active one.
- :mod:`.seams` -- what it needs from the world (clock, launcher, checks, front door).
- :mod:`.changes`, :mod:`.status`, :mod:`.settings` -- submitted changes and their outcomes;
  what it reports; what it is started with.
- :mod:`.view` -- :class:`Supervisor`, the narrow view everything outside reads it through
  and sends it commands by.
- :mod:`.startup`, :mod:`.operate` -- which config to start with; revert and reload.
"""
