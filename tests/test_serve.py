"""`xraylens serve`: the API with real fixture images, good and bad; authentication; a live server under
concurrent requests; and the page in a real browser (Debian's Chromium driven by Playwright).

Set XRAYLENS_SCREENSHOTS=DIR to keep the browser test's screenshots."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from xraylens.errors import XraylensError
from xraylens.runs import open_run
from xraylens.serve.app import check_serve_options, create_app, is_loopback, read_token

TOKEN = "s3cret-token-0123456789"


@pytest.fixture(scope="module")
def run_dir(tiny_run) -> Path:
    return tiny_run


@pytest.fixture(scope="module")
def loaded(run_dir):
    return open_run(run_dir, device="cpu")


@pytest.fixture(scope="module")
def client(loaded):
    with TestClient(create_app(loaded)) as c:
        yield c


@pytest.fixture(scope="module")
def images(fixture_dir) -> dict[str, Path]:
    return {
        "png": sorted((fixture_dir / "cxr_bbox" / "images").glob("*.png"))[0],
        "png2": sorted((fixture_dir / "cxr_bbox" / "images").glob("*.png"))[1],
        "jpeg": sorted((fixture_dir / "pneumonia" / "PNEUMONIA").iterdir())[0],
        "jpeg2": sorted((fixture_dir / "pneumonia" / "NORMAL").iterdir())[0],
    }


def _dicom_bytes(pixels: np.ndarray, **patient) -> bytes:
    """A DICOM file built in memory, with patient fields set."""
    import warnings

    from pydicom import config

    from xraylens.data.phantom import dicom_phantom

    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("ignore")  # pydicom's warnings about the invalid values set on purpose
        mp.setattr(config.settings, "writing_validation_mode", config.IGNORE)
        ds = dicom_phantom(pixels)
        for k, v in patient.items():
            setattr(ds, k, v)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


PATIENT = {"PatientName": "SECRETNAME^Jane", "PatientID": "SECRETID-42", "PatientBirthDate": "SECRETDATE"}


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's calling card), with no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _map(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def _post(client, data: bytes, query: str = "", name: str = "x", **kw):
    return client.post(f"/predict{query}", files={"file": (name, data, "application/octet-stream")}, **kw)


# ------------------------------------------------------------------------------------------ the API


def test_health_model_page_and_docs(client, loaded):
    assert client.get("/health").json() == {"status": "ok", "auth": False}
    m = client.get("/model").json()
    assert m["classes"] == ["NORMAL", "PNEUMONIA"] and m["architecture"] == "tinyvgg"
    assert m["input_size"] == [32, 32] and m["formats"] == ["png", "jpeg", "dicom"]
    names = [x["name"] for x in m["cam_methods"]]
    assert "gradcam" in names and "scorecam" not in names and m["default_methods"] == ["gradcam"]
    assert m["max_upload_bytes"] == 50 * 2**20
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    # self-contained: nothing is loaded from another site
    assert "http://" not in page.text and "https://" not in page.text and "<script src" not in page.text
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/model", "/health"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]


def test_predict_png_and_jpeg_match_predict_command(client, images, loaded):
    from xraylens.evaluate.predict import predict_files

    for kind in ("png", "jpeg"):
        r = client.post("/predict?methods=gradcam,eigencam", files={"file": ("a", images[kind].read_bytes())})
        assert r.status_code == 200, r.text
        j = r.json()
        assert j["image"]["format"] == kind and j["class"] in j["probabilities"]
        assert abs(sum(j["probabilities"].values()) - 1) < 1e-5 and j["explained_class"] == j["class"]
        # the same preprocessing and model as `xraylens predict`
        (ref,) = predict_files(loaded, [images[kind]], device="cpu")
        for c, p in ref["probabilities"].items():
            assert abs(j["probabilities"][c] - p) < 1e-5
        w, h = Image.open(images[kind]).size
        assert (j["image"]["width"], j["image"]["height"]) == (w, h)
        assert _map(j["input"]["png"]).shape == (32, 32)
        assert set(j["cams"]) == {"gradcam", "eigencam"}
        for cam in j["cams"].values():
            m = _map(cam["png"])
            assert m.shape == (32, 32) and m.dtype == np.uint8
            if cam["constant"]:
                assert cam["peak"] is None and m.max() == 0
                continue
            assert m.max() == 255  # maps are normalised to [0, 1]
            (x, y), (ox, oy) = cam["peak"]["input"], cam["peak"]["original"]
            assert m[int(y), int(x)] == 255
            # the peak pixel's centre, mapped to the original image (no crop: a plain scale)
            assert ox == pytest.approx(x * w / 32, abs=0.01) and oy == pytest.approx(y * h / 32, abs=0.01)
        assert set(j["timing_ms"]) >= {"read", "decode", "model", "encode", "total"}


def test_raw_body_no_cam_and_target(client, images):
    data = images["jpeg"].read_bytes()
    r = client.post("/predict?methods=", content=data, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["cams"] == {}
    r = client.post("/predict?target=PNEUMONIA&methods=gradcam", content=data, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["explained_class"] == "PNEUMONIA"
    r = client.post("/predict?target=0", content=data, headers={"content-type": "image/jpeg"})
    assert r.json()["explained_class"] == "NORMAL"


def test_dicom_upload_never_returns_or_logs_patient_fields(client, caplog, recwarn):
    import logging

    ramp = np.add.outer(np.arange(64), np.arange(48)) * 40
    data = _dicom_bytes(ramp, **PATIENT)
    assert b"SECRETNAME" in data  # the upload does carry them
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        r = _post(client, data, "?methods=gradcam,layercam", name="SECRETNAME.dcm")
    assert r.status_code == 200, r.text
    assert r.json()["image"] | {"crop": None} == {"format": "dicom", "width": 48, "height": 64, "crop": None}
    said = r.text + caplog.text + " ".join(str(w.message) for w in recwarn)
    assert "SECRET" not in said


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_bad_uploads_are_clear_4xx(client, images):
    jpeg = images["jpeg"].read_bytes()
    cases = [
        (b"", 400, "empty upload"),
        (b"hello, this is plain text and not an image at all", 415, "PNG, JPEG or DICOM"),
        (b"GIF89a" + b"\0" * 200, 415, "unsupported file type"),
        (jpeg[: len(jpeg) // 2], 422, "not a readable image"),
        (jpeg[:3], 422, "upload: not a readable image"),
        (_png_header_only(50_000, 50_000), 422, "above the limit of 64,000,000 pixels"),  # header checked first
        (_png_header_only(4, 4), 422, "smaller than 8 pixels"),
        (b"\0" * 128 + b"DICM" + b"\xff" * 50, 422, "DICOM"),
    ]
    for data, status, words in cases:
        r = _post(client, data)
        assert r.status_code == status, (words, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, str) and words in detail and "\n" not in detail and "Traceback" not in detail
    for query, words in [
        ("?methods=nope", "unknown CAM method(s) nope; choose from gradcam"),
        ("?methods=scorecam", "scorecam not offered here"),
        ("?target=nope", "target 'nope' is not 'pred' or a class"),
        ("?target=7", "target '7'"),
    ]:
        r = _post(client, jpeg, query)
        assert r.status_code == 400 and words in r.json()["detail"], r.text
    # forms: no boundary, no file field, two files
    r = client.post("/predict", content=b"x", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and "boundary" in r.json()["detail"]
    r = client.post("/predict", data={"note": "hi"}, files={"other": (None, "x")})
    assert r.status_code == 400 and "no file" in r.json()["detail"]
    r = client.post("/predict", files=[("file", ("a", jpeg)), ("file", ("b", jpeg))])
    assert r.status_code == 400 and "one image per request" in r.json()["detail"]
    assert client.get("/nope").status_code == 404


def test_upload_limit_while_streaming(loaded, images):
    jpeg = images["jpeg"].read_bytes()  # ~10 kB
    with TestClient(create_app(loaded, max_upload_bytes=4000)) as small:
        assert small.get("/model").json()["max_upload_bytes"] == 4000
        for kw in (
            {"files": {"file": ("a", jpeg)}},  # multipart, declared length over the limit
            {"content": jpeg, "headers": {"content-type": "image/jpeg"}},  # raw body
            {"content": iter([jpeg[:3000], jpeg[3000:]]), "headers": {"content-type": "image/jpeg"}},  # chunked
        ):
            r = small.post("/predict", **kw)
            assert r.status_code == 413, r.text
            assert r.json() == {"detail": "upload is larger than the limit of 4,000 bytes; send a smaller file"}
        ok = Image.open(images["jpeg"]).convert("L").resize((64, 64))
        buf = io.BytesIO()
        ok.save(buf, format="PNG")
        assert len(buf.getvalue()) < 4000
        assert small.post("/predict", files={"file": ("a", buf.getvalue())}).status_code == 200


def test_token(loaded, images):
    with TestClient(create_app(loaded, token=TOKEN)) as c:
        assert c.get("/health").json()["auth"] is True and c.get("/").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            for r in (c.get("/model", headers=headers), _post(c, b"x", headers=headers)):
                assert r.status_code == 401 and "bearer token" in r.json()["detail"]
                assert r.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert c.get("/model", headers=good).status_code == 200
        assert _post(c, images["png"].read_bytes(), headers=good).status_code == 200


def test_serve_options(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.8.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    (tmp_path / "t").write_text(TOKEN + "\n")
    assert read_token(tmp_path / "t") == TOKEN
    assert check_serve_options("0.0.0.0", 8000, tmp_path / "t", False, 50, 4) == TOKEN
    assert check_serve_options("0.0.0.0", 8000, None, True, 50, 4) is None
    assert check_serve_options("127.0.0.1", 8000, None, False, 50, 4) is None
    with pytest.raises(XraylensError, match="--token-file"):
        check_serve_options("::", 8000, None, False, 50, 4)


def test_port_in_use_is_one_line(tmp_path):
    from xraylens.serve.app import _bind

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        with pytest.raises(XraylensError, match=r"cannot listen on 127.0.0.1:\d+ .*pick another --port"):
            _bind("127.0.0.1", s.getsockname()[1])


# ------------------------------------------------------------------------------------------ a live server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    """`xraylens serve RUN` in a subprocess on a free loopback port; its log is checked at the end."""
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "xraylens", "serve", str(run_dir), "--port", str(port), "--device", "cpu"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if json.load(r)["status"] == "ok":
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.3)
    yield {"url": url, "log": log, "proc": proc}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    assert "SECRET" not in log.read_text(), "a patient field reached the server log"


@contextlib.contextmanager
def _thread_server(app):
    """The app under uvicorn in a thread of this process, on a free loopback port."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield server.config.port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "xraylens-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _live_post(url: str, data: bytes, query: str = "?methods=gradcam,layercam") -> tuple[int, dict]:
    body, ctype = _multipart(data)
    req = urllib.request.Request(url + "/predict" + query, data=body, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_live_server_concurrent_requests_match_sequential(server, images):
    files = [images[k].read_bytes() for k in ("png", "png2", "jpeg", "jpeg2")]
    seq = [_live_post(server["url"], f) for f in files]
    assert all(s == 200 for s, _ in seq)
    jobs = files * 4 + [b"not an image"] * 4
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda f: _live_post(server["url"], f), jobs))
    for i, (status, body) in enumerate(got):
        if i >= 16:
            assert status == 415
            continue
        _, ref = seq[i % 4]
        assert status == 200
        for c, p in ref["probabilities"].items():
            assert abs(body["probabilities"][c] - p) < 1e-5
        for m in ("gradcam", "layercam"):
            a, b = _map(body["cams"][m]["png"]).astype(int), _map(ref["cams"][m]["png"]).astype(int)
            assert np.abs(a - b).max() <= 1  # a batch of several may round differently than one alone
    # DICOM through the real server: its log is checked for the patient fields when the server stops
    status, body = _live_post(server["url"], _dicom_bytes(np.arange(64 * 64).reshape(64, 64), **PATIENT))
    assert status == 200 and "SECRET" not in json.dumps(body)


def test_keep_alive_answers_are_not_held_by_delayed_acks(server):
    """Responses go out as two writes (headers, body): without TCP_NODELAY on the accepted sockets each
    answer on a kept-alive connection waits ~40 ms for the client's delayed ACK."""
    import http.client

    from xraylens.serve.app import _bind

    with _bind("127.0.0.1", 0) as srv, socket.create_connection(srv.getsockname()[:2]):
        conn, _ = srv.accept()
        with conn:
            assert conn.proto == socket.IPPROTO_TCP  # what asyncio checks before it sets TCP_NODELAY
    c = http.client.HTTPConnection("127.0.0.1", int(server["url"].rsplit(":", 1)[1]), timeout=10)
    times = []
    for _ in range(6):
        t = time.perf_counter()
        c.request("GET", "/model")
        c.getresponse().read()
        times.append(time.perf_counter() - t)
    c.close()
    assert min(times[1:]) < 0.035, times  # a stall is >= 40 ms on every kept-alive request


def test_loopback_server_refuses_foreign_host_header(server):
    req = urllib.request.Request(server["url"] + "/health", headers={"Host": "evil.example"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400


# ------------------------------------------------------------------------------------------ the page


def test_page_in_a_real_browser(server, images, tmp_path, chromium_launch):
    from playwright.sync_api import sync_playwright

    # which method's map differs from Grad-CAM's for this image: switching to it must change the overlay
    _, ref = _live_post(server["url"], images["png"].read_bytes(), "?methods=" + ",".join(_offered(server)))
    other = next(m for m, c in ref["cams"].items() if m != "gradcam" and c["png"] != ref["cams"]["gradcam"]["png"])

    shots = [tmp_path]
    if os.environ.get("XRAYLENS_SCREENSHOTS"):
        shots.append(Path(os.environ["XRAYLENS_SCREENSHOTS"]))
        shots[-1].mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(**chromium_launch)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server["url"] + "/")
            # (no wait_for_function: its string is evaluated in the page, which the page's CSP forbids)
            page.wait_for_selector("#method option:nth-child(2)", state="attached")
            assert page.input_value("#method") == "gradcam"
            page.set_input_files("#file", str(images["png"]))
            page.wait_for_selector("body[data-state=ready]", timeout=30_000)
            probs = page.inner_text("#probs")
            assert "NORMAL" in probs and "PNEUMONIA" in probs and "%" in probs
            assert page.inner_text("#verdict").split(" ")[0] == ref["class"]
            assert page.locator("#view").is_visible()
            drawn = _canvas(page)
            assert page.get_attribute("#view", "data-method") == "gradcam"
            page.screenshot(path=str(tmp_path / "serve_page_gradcam.png"))

            page.select_option("#method", other)
            assert page.get_attribute("#view", "data-method") == other
            assert _canvas(page) != drawn, "the overlay did not change with the method"
            page.select_option("#method", "gradcam")
            assert _canvas(page) == drawn  # and back: drawn from the one answer, no new request

            page.locator("#opacity").fill("90")
            assert page.inner_text("#opacityval") == "90%"
            assert _canvas(page) != drawn, "the overlay did not change with the opacity"
            peak = page.inner_text("#peak")
            assert "Peak" in peak or "constant" in peak
            page.locator("#opacity").fill("50")
            for d in shots:
                page.screenshot(path=str(d / "serve_page.png"))

            # a bad file: the server's reason on the page, the last picture kept
            page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hi"}])
            page.wait_for_selector("body[data-state=error]", timeout=30_000)
            assert "PNG, JPEG or DICOM" in page.inner_text("#status")
            for d in shots:
                page.screenshot(path=str(d / "serve_page_error.png"))
            assert not errors, errors
        finally:
            browser.close()
    for d in shots:
        assert (d / "serve_page.png").stat().st_size > 10_000


def _offered(server) -> list[str]:
    with urllib.request.urlopen(server["url"] + "/model", timeout=10) as r:
        return [m["name"] for m in json.load(r)["cam_methods"]]


def _canvas(page) -> str:
    return page.evaluate("document.getElementById('view').toDataURL('image/png')")


def test_queued_images_share_a_pass_with_the_same_results(loaded, images):
    from xraylens.serve.predictor import Predictor

    prepared = [loaded.inputs.prepare(images[k])[0] for k in ("png", "png2", "jpeg", "jpeg2")]
    alone = Predictor(loaded, max_batch=1, warm_up=False)
    batched = Predictor(loaded, max_batch=4, warm_up=False)
    try:
        ref = [alone.submit(x, ["gradcam", "eigencam"]).result() for x in prepared]
        futures = [batched.submit(x, ["gradcam", "eigencam"]) for x in prepared * 3]  # queued faster than served
        got = [f.result() for f in futures]
    finally:
        alone.close()
        batched.close()
    assert max(g.batch_size for g in got) > 1 and all(r.batch_size == 1 for r in ref)
    for i, g in enumerate(got):
        r = ref[i % 4]
        np.testing.assert_allclose(g.probabilities, r.probabilities, atol=1e-5)
        assert g.target == r.target
        for m in ("gradcam", "eigencam"):
            np.testing.assert_allclose(g.maps[m], r.maps[m], atol=1e-4)


def test_page_with_a_token_in_a_real_browser(loaded, images, chromium_launch):
    from playwright.sync_api import sync_playwright

    with _thread_server(create_app(loaded, token=TOKEN)) as port:
        with sync_playwright() as p:
            browser = p.chromium.launch(**chromium_launch)
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_selector("#auth:not([hidden])")
                assert "token" in page.inner_text("#modelinfo")
                page.fill("#token", "wrong-token-0123456789")
                page.set_input_files("#file", str(images["jpeg"]))  # no model yet: asks for it with the token
                page.wait_for_selector("#status.error")
                assert "bearer token" in page.inner_text("#status")
                page.fill("#token", TOKEN)
                page.set_input_files("#file", str(images["jpeg"]))
                page.wait_for_selector("body[data-state=ready]", timeout=30_000)
                assert "tinyvgg" in page.inner_text("#modelinfo") and "%" in page.inner_text("#probs")
            finally:
                browser.close()


def test_internal_errors_are_500_without_a_traceback(loaded, images, monkeypatch):
    app = create_app(loaded)

    def broken(*a, **k):
        raise RuntimeError("boom: internal detail")

    monkeypatch.setattr(app.state.predictor, "submit", broken)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = _post(c, images["jpeg"].read_bytes())
    assert r.status_code == 500 and r.json() == {"detail": "internal server error; see the server log"}


def _read_response(s: socket.socket) -> str:
    """Headers and the whole body: the server may send them in separate segments (TCP_NODELAY)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(v) for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n"))
                   if k.strip().lower() == b"content-length"), 0)  # fmt: skip
    while len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode("latin-1")


def test_a_trickled_upload_times_out(loaded, monkeypatch):
    import xraylens.serve.app as serve_app

    monkeypatch.setattr(serve_app, "UPLOAD_SECONDS", 0.5)
    with _thread_server(create_app(loaded)) as port, socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n")
        s.sendall(b"Content-Length: 5000\r\n\r\n\x89PNG\r\n\x1a\n")  # ... and nothing more
        s.settimeout(10)
        answer = _read_response(s)
    assert answer.startswith("HTTP/1.1 408") and "did not arrive within 0.5 s" in answer, answer
