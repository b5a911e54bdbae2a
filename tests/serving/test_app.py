"""dogtl serve's API through FastAPI's TestClient: predictions, batching, and every bad input."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import _tiny
from conftest import assert_clean_error, run_cli

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'dogtl[serve]'")


@pytest.fixture(scope="module")
def app():
    from dogtl.serving.app import create_app

    # A long batching window so that concurrent requests surely meet; a 1 MB limit to test 413.
    return create_app(_tiny.serving_model(), max_batch=8, max_upload_mb=1, batch_wait_ms=150)


@pytest.fixture(scope="module")
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def expected():
    return _tiny.predicted()


def _assert_answer(answer, row):
    classes = _tiny.CLASSES
    order = np.argsort(-row)[:4]
    assert [p["class"] for p in answer["predictions"]] == [classes[j] for j in order]
    np.testing.assert_allclose([p["probability"] for p in answer["predictions"]], row[order], rtol=1e-3, atol=2e-4)
    assert answer["model"] == "tiny" and answer["ms"] > 0


def test_health_and_page(client):
    assert client.get("/health").json() == {"status": "ok", "model": "tiny", "classes": 4, "runtime": "tensorflow"}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'id="file"' in html and "predict" in html and "tiny" in html
    assert "http://" not in html and "https://" not in html and "<script src" not in html  # no CDN


def test_predict_multipart_and_raw(client, expected):
    paths = _tiny.images()
    for k, path in enumerate(paths[:4]):
        data = path.read_bytes()
        if k % 2:
            r = client.post("/predict", content=data, headers={"content-type": "image/jpeg"})
        else:
            r = client.post("/predict", files={"file": (path.name, data, "image/jpeg")})
        assert r.status_code == 200, r.text
        _assert_answer(r.json(), expected[k])


def test_concurrent_requests_share_model_calls(client, app, expected):
    paths = _tiny.images()
    batcher = app.state.batcher
    calls, images = batcher.calls, batcher.images
    answers = [None] * len(paths)

    def send(k):
        answers[k] = client.post("/predict", content=paths[k].read_bytes(),
                                 headers={"content-type": "application/octet-stream"})

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, r in enumerate(answers):
        assert r.status_code == 200, r.text
        _assert_answer(r.json(), expected[k])
    assert batcher.images - images == len(paths)
    assert batcher.calls - calls < len(paths)  # batched: fewer model calls than requests


def _bomb():
    return (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + (100_000).to_bytes(4, "big") * 2
            + b"\x08\x02\x00\x00\x00" + bytes(16))


@pytest.mark.parametrize("name, make, status, needle", [
    ("not an image", lambda good: b"id,breed\nthis is a CSV file\n", 400, "not an image"),
    ("truncated", lambda good: good[: len(good) // 2], 400, "truncated"),
    ("zero bytes", lambda good: b"", 400, "empty upload"),
    ("over the limit", lambda good: good + bytes(1_200_000), 413, "over the limit"),
    ("decompression bomb", lambda good: _bomb(), 413, "too large"),
])
def test_bad_upload_gets_json_error_and_server_goes_on(client, expected, name, make, status, needle):
    good = _tiny.images()[0].read_bytes()
    for send in ("multipart", "raw"):
        data = make(good)
        if send == "multipart":
            r = client.post("/predict", files={"file": ("x.jpg", data, "image/jpeg")})
        else:
            r = client.post("/predict", content=data, headers={"content-type": "image/jpeg"})
        assert r.status_code == status, (name, send, r.text)
        assert needle in r.json()["error"], r.json()
    r = client.post("/predict", content=good, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200
    _assert_answer(r.json(), expected[0])


def test_wrong_content_type_and_missing_field(client):
    r = client.post("/predict", content=b'{"image": 1}', headers={"content-type": "application/json"})
    assert r.status_code == 415 and "not an image" in r.json()["error"]
    r = client.post("/predict", files={"photo": ("x.jpg", b"abc", "image/jpeg")})
    assert r.status_code == 400 and "field named 'file'" in r.json()["error"]
    r = client.get("/nowhere")
    assert r.status_code == 404 and "error" in r.json()


def test_declared_size_over_limit_is_refused_before_reading(client):
    r = client.post("/predict", content=b"x" * 10, headers={"content-type": "image/jpeg",
                                                            "content-length": str(50 * 1024 * 1024)})
    assert r.status_code == 413 and "50.0 MB" in r.json()["error"]


def test_client_disconnect_mid_upload(app, client, expected):
    """An upload cut off after its first chunk: no answer is owed, nothing breaks, the next request works."""
    good = _tiny.images()[0].read_bytes()
    sent = []
    messages = iter([{"type": "http.request", "body": good[:100], "more_body": True}, {"type": "http.disconnect"}])

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"image/jpeg"), (b"content-length", str(len(good)).encode())],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "app": app}
    client.portal.call(app, scope, receive, send)  # on the running server's event loop
    assert all(m.get("status", 400) >= 400 for m in sent if m["type"] == "http.response.start")
    r = client.post("/predict", content=good, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200
    _assert_answer(r.json(), expected[0])


def test_serve_refuses_model_that_cannot_load(tmp_path):
    assert_clean_error(run_cli("serve", tmp_path / "nope.keras"), "no such model file")
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip")
    (tmp_path / "broken.json").write_text((_tiny.model_path().with_suffix(".json")).read_text())
    assert_clean_error(run_cli("serve", broken), "broken.keras: damaged")  # its content hash differs


def test_several_images_per_request_each_with_its_answer_and_an_access_log_line(client, expected, caplog):
    """POST /predict/batch: one result per file in order, a bad file its own error, the
    oversized one as a plain sentence; every request a line on dogtl.access."""
    import logging

    caplog.set_level(logging.INFO, logger="dogtl.access")
    paths = _tiny.images()
    files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in paths[:3]]
    files.insert(1, ("file", ("notes.txt", b"not an image at all", "text/plain")))
    files.append(("file", ("bomb.png", _bomb(), "image/png")))
    r = client.post("/predict/batch", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["file"] for x in results] == [paths[0].name, "notes.txt", paths[1].name, paths[2].name, "bomb.png"]
    for x, k in zip([results[0], results[2], results[3]], range(3)):
        _assert_answer({"model": r.json()["model"], "ms": r.json()["ms"], **x}, expected[k])
    assert results[1]["error"].startswith("cannot read the image (not an image")
    assert results[4]["error"] == "image too large (10,000,000,000 pixels, at most 40,000,000): send a smaller image"
    single = client.post("/predict", content=_bomb(), headers={"content-type": "image/png"})
    assert single.status_code == 413 and single.json()["error"] == results[4]["error"]
    too_many = client.post("/predict/batch", files=[("file", (f"{k}.jpg", b"x", "image/jpeg")) for k in range(17)])
    assert too_many.status_code == 400 and "at most 16 files" in too_many.json()["error"]
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "dogtl.access"]
    assert any(line.startswith('testclient "POST /predict/batch" 200 3 images') and line.endswith(" ms")
               for line in lines), lines
    assert any('"POST /predict" 413' in line for line in lines), lines
