"""Corral: a supervisor for llama.cpp's llama-server."""

from corral.core.args import Change, FlagCatalog, LlamaConfig, parse_change, parse_help
from corral.errors import CorralError

__version__ = "0.1.0"

__all__ = [
    "Change",
    "CorralError",
    "FlagCatalog",
    "LlamaConfig",
    "__version__",
    "parse_change",
    "parse_help",
]
