"""The command line: the parser (:mod:`.parser`), what each command does (:mod:`.commands`,
whose ``main`` is the ``corral`` entry point), the HTTP client of a running supervisor
(:mod:`.client`) and how its answers are printed (:mod:`.render`)."""
