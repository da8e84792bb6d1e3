"""The command line: the parser (:mod:`.parser`), what each command does (:mod:`.commands`),
the HTTP client of a running supervisor (:mod:`.client`) and how its answers are printed
(:mod:`.render`)."""

from corral.cli.commands import main
from corral.cli.parser import build_parser

__all__ = ["build_parser", "main"]
