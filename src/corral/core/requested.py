"""Which model a client request names: pure, for ``corral serve``'s edge.

The OpenAI API names it in the JSON body's ``model`` field (a multipart form's ``model``
part for audio and images); GET requests in ``?model=``; ``/upstream/<id>/<path>`` reaches
one model's server directly (llama-swap's spelling, so its users' scripts keep working).
"""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qs

_FORM_MODEL = re.compile(rb'name="model"\r\n(?:[^\r\n]*\r\n)*?\r\n([^\r\n]*)\r\n')


def model_in_body(content_type: str, body: bytes) -> str | None:
    """The ``model`` of a JSON body or of a multipart form; None if it names none."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        found = _FORM_MODEL.search(body)
        return found.group(1).decode(errors="replace").strip() or None if found else None
    if not body or body.lstrip()[:1] != b"{":
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) and model else None


def model_in_query(query: str) -> str | None:
    values = parse_qs(query).get("model")
    return values[0] if values and values[0] else None


def upstream_path(path: str) -> tuple[str, str] | None:
    """``/upstream/<id>/rest`` -> (id, ``/rest``); None for any other path."""
    if not path.startswith("/upstream/"):
        return None
    model, _, rest = path[len("/upstream/"):].partition("/")
    return (model, "/" + rest) if model else None
