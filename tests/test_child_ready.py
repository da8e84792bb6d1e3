"""Why a start failed, in one line taken from llama-server's own output."""

from __future__ import annotations

from corral.child.ready import telling_line


def test_out_of_memory_wins_over_later_noise() -> None:
    """An allocation failure is the reason even when other lines follow it."""
    lines = ["load_tensors: loading model", "ggml: failed to allocate CPU buffer (out of memory)",
             "llama_model_load: error loading model", "main: exiting due to model loading error"]
    assert telling_line(lines) == "ggml: failed to allocate CPU buffer (out of memory)"


def test_the_last_error_line_otherwise_and_none_without_one() -> None:
    """The last line naming an error; nothing when no line says why."""
    assert telling_line(["a", "error: invalid argument: --bogus", "b"]) == \
        "error: invalid argument: --bogus"
    assert telling_line(["loading", "listening"]) is None
    assert telling_line([]) is None
