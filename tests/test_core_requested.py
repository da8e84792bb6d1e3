"""Which model a client request names (corral serve's edge), pure."""

from __future__ import annotations

from corral.core.requested import model_in_body, model_in_query, upstream_path


def test_json_body_model() -> None:
    """The OpenAI body's "model"; none for other JSON, garbage or an empty model."""
    assert model_in_body("application/json", b'{"model": "qwen", "messages": []}') == "qwen"
    assert model_in_body("application/json; charset=utf-8", b' {"model":"a"}') == "a"
    assert model_in_body("application/json", b'{"prompt": "x"}') is None
    assert model_in_body("application/json", b'{"model": ""}') is None
    assert model_in_body("application/json", b'{"model": 3}') is None
    assert model_in_body("application/json", b"{not json") is None
    assert model_in_body("application/json", b"[1, 2]") is None


def test_multipart_form_model() -> None:
    """Audio and image uploads name the model in a form part."""
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\nRIFF....\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n"
            b"--XyZ--\r\n")
    assert model_in_body("multipart/form-data; boundary=XyZ", body) == "whisper"
    assert model_in_body("multipart/form-data; boundary=XyZ", b"--XyZ--\r\n") is None


def test_query_and_upstream_path() -> None:
    """?model= on GET; /upstream/<id>/<path> reaches one model's server directly."""
    assert model_in_query("model=beta&x=1") == "beta"
    assert model_in_query("x=1") is None
    assert upstream_path("/upstream/alpha/props") == ("alpha", "/props")
    assert upstream_path("/upstream/alpha") == ("alpha", "/")
    assert upstream_path("/upstream/") is None
    assert upstream_path("/v1/chat/completions") is None
