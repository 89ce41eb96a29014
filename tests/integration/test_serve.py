"""``vlmad serve``: API, batching, bad input, a small load test, the web page in headless Chromium, folder watch
across a restart and SIGTERM with requests in flight.

One server (a subprocess on a free loopback port) serves one tiny export made once for the module; the folder-watch
test restarts it last.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmad import deploy
from vlmad.bench.serve import ServerProcess, load, multipart, post_images, request, rss_mb
from vlmad.config import compose
from vlmad.deploy.export import export

MAX_IMAGES = 4
MAX_QUEUE = 24


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, synthetic_roots) -> Path:
    """WinCLIP on the tiny CLIP cut to 4 blocks at 64 px, OpenVINO, an image threshold stored."""
    base = tmp_path_factory.mktemp("serve_export")
    shipped = Path(__file__).parents[2] / "vlmad" / "backbones" / "model_configs" / "vlmad-tiny.json"
    config = json.loads(shipped.read_text())
    config["vision_cfg"]["layers"] = 4
    (base / "vlmad-tiny-d4.json").write_text(json.dumps(config))
    overrides = [
        "backbone=tiny",
        "backbone.model_name=vlmad-tiny-d4",
        f"+backbone.model_config={base / 'vlmad-tiny-d4.json'}",
        "backbone.image_size=64",
        "class_name=bottle",
        "method=winclip",
        "format=openvino",
        f"output_dir={base / 'model'}",
    ]
    return export(compose("export", overrides, base / "run"))


@pytest.fixture(scope="module")
def test_images(synthetic_roots) -> list[Path]:
    return sorted((synthetic_roots["mvtec"] / "bottle_syn" / "test").glob("*/*.png"))


@pytest.fixture(scope="module")
def offline(tiny_export, test_images):
    """Scores and maps of the test images from the runtime in process: what the server must answer."""
    return deploy.load(tiny_export, "openvino").predict_files(test_images)


@pytest.fixture(scope="module")
def threshold(offline) -> float:
    """An image threshold between the test images' scores, so the answers hold both OK and NG."""
    return float(np.median(offline.scores))


@pytest.fixture(scope="module")
def server(tiny_export, threshold, tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    (base / "watch").mkdir()
    proc = ServerProcess(
        [
            f"model={tiny_export}",
            "backend=openvino",
            "threads=1",
            f"threshold.value={threshold}",
            "max_batch_size=8",
            "batch_timeout=0.05",
            f"max_queue={MAX_QUEUE}",
            f"max_images={MAX_IMAGES}",
            "max_pixels=4000000",
            f"watch={base / 'watch'}",
            "watch_interval=0.2",
        ],
        base,
    ).start()
    proc.watch = base / "watch"
    yield proc
    proc.stop()


def _files(paths: list[Path]) -> list[tuple[str, bytes]]:
    return [(f"{p.parent.name}_{p.name}", p.read_bytes()) for p in paths]


def test_health_info_and_predict_answer_as_the_runtime(server, tiny_export, test_images, offline, threshold):
    assert request(server.port, "GET", "/health")[1] == {"status": "ready"}
    status, info, _ = request(server.port, "GET", "/info")
    manifest = json.loads((tiny_export / deploy.MANIFEST).read_text())
    assert status == 200 and info["method"] == "WinCLIP" and info["backbone"] == "vlmad-tiny-d4"
    assert info["precision"] == "fp32" and info["vlmad_version"] and len(info["weights_sha256"]) == 64
    assert info["thresholds"]["image_threshold"] == threshold and info["thresholds"]["source"] == "value"
    assert info["class_name"] == manifest["class_name"] == "bottle"
    status, body, _ = post_images(server.port, _files(test_images), maps=True)
    assert status == 200 and body["model_id"] == info["model_id"] and len(body["results"]) == len(test_images)
    for i, r in enumerate(body["results"]):
        assert r["class_name"] == "bottle" and r["model_id"] == info["model_id"]
        assert r["score"] == pytest.approx(float(offline.scores[i]), abs=1e-5)
        assert r["max_pixel_score"] == pytest.approx(float(offline.maps[i].max()), abs=1e-5)
        assert r["decision"] == ("NG" if offline.scores[i] > threshold else "OK")
        assert r["thresholds"] == {"image": threshold, "pixel": threshold, "use": "score", "source": "value"}
        for key in ("anomaly_map_png", "overlay_png", "mask_png"):
            png = Image.open(io.BytesIO(base64.b64decode(r[key])))
            assert png.size == (64, 64)
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(r["mask_png"])))) > 0
        np.testing.assert_array_equal(mask, offline.maps[i] > threshold)
    assert {r["decision"] for r in body["results"]} == {"OK", "NG"}
    # raw bytes, no maps by default
    status, body, _ = request(server.port, "POST", "/predict", test_images[0].read_bytes(), "image/png")
    assert status == 200 and body["results"][0]["score"] == pytest.approx(float(offline.scores[0]), abs=1e-5)
    assert "overlay_png" not in body["results"][0]
    metrics = request(server.port, "GET", "/metrics")[1]
    assert 'vlmad_requests_total{path="/predict",code="200"}' in metrics and "vlmad_request_seconds_bucket" in metrics
    assert "vlmad_batch_size_bucket" in metrics and "vlmad_queue_depth 0" in metrics


def test_concurrent_requests_are_batched(server, test_images, offline):
    files = _files(test_images)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: post_images(server.port, [files[i % len(files)]]), range(8)))
    assert all(status == 200 for status, _, _ in answers)
    results = [body["results"][0] for _, body, _ in answers]
    for i, r in enumerate(results):
        assert r["score"] == pytest.approx(float(offline.scores[i % len(files)]), abs=1e-5)
    assert max(r["batch_size"] for r in results) > 1  # single-image requests shared an inference batch
    assert len({r["batch_id"] for r in results}) < 8


def _png_header(width: int, height: int, bit_depth: int, rows: int) -> bytes:
    """A grey PNG claiming width x height with ``rows`` rows of zero pixels compressed (a bomb when rows == height)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width * bit_depth + 7) // 8)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * rows, 9)) + chunk(b"IEND", b"")
    )


def _disconnect_mid_upload(port: int) -> None:
    body, ctype = multipart([("big.png", b"\x00" * 200_000)])
    with socket.create_connection(("127.0.0.1", port)) as s:
        head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
        s.sendall(head.encode() + body[:5000])
        time.sleep(0.2)


def test_bad_input_is_a_4xx_naming_the_cause_and_costs_nothing(server, test_images, offline):
    good = test_images[0].read_bytes()
    rss_before = rss_mb(server.proc.pid)
    bomb = _png_header(20000, 20000, 1, 20000)  # 50 MB of pixels in a ~50 kB file
    cases = [
        ("not_an_image", 415, [("notes.png", b"this is not an image")], "notes.png"),
        ("truncated", 422, [("half.png", good[: len(good) // 2])], "half.png"),
        ("empty_file", 400, [("empty.png", b"")], "empty.png"),
        ("too_many_pixels", 413, [("bomb.png", bomb)], "bomb.png"),
        ("too_many_pixels", 413, [("big.png", _png_header(20000, 20000, 8, 2))], "20000x20000"),
        ("too_many_pixels", 413, [("wide.png", _png_header(4000, 1001, 1, 1001))], "max_pixels=4000000"),
        ("too_many_images", 413, [("a.png", good)] * (MAX_IMAGES + 1), f"max_images={MAX_IMAGES}"),
    ]
    for _ in range(3):  # repeated: memory must not climb
        for kind, code, files, named in cases:
            status, body, _ = post_images(server.port, files)
            assert (status, body["error"]) == (code, kind), body
            assert named in body["detail"]
        status, body, _ = request(server.port, "POST", "/predict", b"hello", "text/plain")
        assert (status, body["error"]) == (415, "wrong_content_type") and "text/plain" in body["detail"]
        body_, ctype = multipart([("x.txt", good)], content_type="text/plain")
        status, body, _ = request(server.port, "POST", "/predict", body_, ctype)
        assert (status, body["error"]) == (415, "wrong_content_type") and "x.txt" in body["detail"]
        _disconnect_mid_upload(server.port)
    # the server kept serving, counted the causes, and its memory is back at its level
    status, body, _ = post_images(server.port, _files(test_images[:1]))
    assert status == 200 and body["results"][0]["score"] == pytest.approx(float(offline.scores[0]), abs=1e-5)
    deadline = time.monotonic() + 10
    while 'kind="client_disconnected"} 3' not in request(server.port, "GET", "/metrics")[1]:
        assert time.monotonic() < deadline, "the disconnects were not counted"
        time.sleep(0.1)
    metrics = request(server.port, "GET", "/metrics")[1]
    assert 'vlmad_errors_total{kind="too_many_pixels"} 9' in metrics and "vlmad_queue_depth 0" in metrics
    assert rss_mb(server.proc.pid) - rss_before < 60


def test_small_load_every_request_answered_once_and_full_queue_is_503(server, test_images):
    files = _files(test_images)
    stats = load(server.port, files, clients=6, per_client=6)  # at most 6 images queued < MAX_QUEUE
    assert stats["statuses"] == {200: 36} and not stats["errors"]
    assert stats["answered_once"] == 36 and stats["answered_twice_or_more"] == 0
    # past the bounded queue: 503 + Retry-After, never a pile-up
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: post_images(server.port, [files[0]] * MAX_IMAGES), range(16)))
    codes = [a[0] for a in answers]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes
    refused = next(a for a in answers if a[0] == 503)
    assert refused[1]["error"] == "queue_full" and refused[2]["retry-after"] == "1"
    assert "vlmad_queue_depth 0" in request(server.port, "GET", "/metrics")[1]


def test_web_page_in_headless_chromium(server, test_images, offline, threshold, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromedriver = shutil.which("chromedriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromedriver and chromium, "apt-get install chromium chromium-driver (.ci/run does)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=chromedriver), options=options)
    try:
        driver.get(f"http://127.0.0.1:{server.port}/")
        WebDriverWait(driver, 20).until(lambda d: "WinCLIP" in d.find_element(By.ID, "info").text)
        picks = [test_images[0], test_images[-1]]  # a good and a defective image
        driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in picks))
        WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result")) == 2)
        cards = {c.get_attribute("data-file"): c for c in driver.find_elements(By.CSS_SELECTOR, ".result")}
        for i, path in ((0, picks[0]), (len(test_images) - 1, picks[1])):
            card = cards[path.name]
            assert float(card.find_element(By.CSS_SELECTOR, ".score").text) == pytest.approx(
                float(offline.scores[i]), abs=1e-4
            )
            decision = card.find_element(By.CSS_SELECTOR, ".decision").text
            assert decision == ("NG" if offline.scores[i] > threshold else "OK")
            overlay = card.find_element(By.CSS_SELECTOR, "img.overlay")
            assert driver.execute_script("return arguments[0].naturalWidth", overlay) == 64
        assert "bottle" in driver.find_element(By.ID, "info").text
        driver.save_screenshot(str(tmp_path / "page.png"))
    finally:
        driver.quit()


def _rows(table: Path) -> list[dict]:
    if not table.exists():
        return []
    with table.open(newline="") as f:
        return list(csv.DictReader(f))


def _wait_rows(table: Path, n: int, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(rows := _rows(table)) < n:
        assert time.monotonic() < deadline, f"{len(rows)} rows of {n}: {rows}"
        time.sleep(0.1)
    return rows


def test_folder_watch_across_a_restart_and_sigterm_answers_in_flight(server, test_images, offline):
    """Runs last: it stops and restarts the module's server."""
    watch, table = server.watch, server.watch / "scored" / "predictions.csv"
    shutil.copy(test_images[0], watch / "a.png")
    # a file written slowly: scored once, complete (its score is the full image's)
    data = test_images[1].read_bytes()
    with (watch / "b.png").open("wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(0.6)
        f.write(data[len(data) // 2 :])
    rows = _wait_rows(table, 2)
    by_name = {r["file"]: r for r in rows}
    assert float(by_name["a.png"]["score"]) == pytest.approx(float(offline.scores[0]), abs=1e-5)
    assert float(by_name["b.png"]["score"]) == pytest.approx(float(offline.scores[1]), abs=1e-5)
    assert (watch / "scored" / by_name["a.png"]["overlay"]).is_file()

    # SIGTERM with requests in flight: every one is answered, then the server exits cleanly
    files = _files(test_images)
    answers: list = []

    def client() -> None:
        try:
            answers.append(post_images(server.port, files[:2])[0])
        except ConnectionRefusedError:  # arrived after the listening socket closed: never accepted
            answers.append("refused")
        except OSError as err:  # accepted, then dropped: what a graceful stop must never do
            answers.append(repr(err))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while "vlmad_queue_depth 0" in request(server.port, "GET", "/metrics")[1] and time.monotonic() < deadline:
        time.sleep(0.005)
    assert server.stop() == 0
    for t in threads:
        t.join()
    assert 200 in answers and set(answers) <= {200, 503, "refused"}, answers  # 503: "stopping", with Retry-After
    assert "vlmad serve: stopped" in server.read_log()

    shutil.copy(test_images[2], watch / "c.png")  # arrives while the server is down
    server.start()
    rows = _wait_rows(table, 3)
    time.sleep(1.0)  # a few more polls: nothing is scored twice
    rows = _rows(table)
    assert sorted(r["file"] for r in rows) == ["a.png", "b.png", "c.png"]
    assert float(rows[2]["score"]) == pytest.approx(float(offline.scores[2]), abs=1e-5)


def test_torch_path_method_and_checkpoint_in_a_worker(synthetic_roots, tmp_path, test_images):
    """``method=... (ckpt_path=...)``: the worker builds the torch method as vlmad predict does (in process here)."""
    import torch

    from vlmad.data import Preprocess, load_image
    from vlmad.deploy.predict import build_method
    from vlmad.deploy.serve import InspectionAPI, Limits, describe, read_upload, resolve

    cfg = compose(
        "serve",
        ["backbone=tiny", "backbone.image_size=64", "method=winclip", "class_name=bottle", "threshold.value=0.44"],
        tmp_path,
    )
    spec = resolve(cfg)
    info = describe(spec)
    assert info["method"] == "WinCLIP" and info["source"]["backend"] == "torch" and info["precision"] == "torch fp32"
    api = InspectionAPI(spec, info, 8, 0.0)
    api.setup("cpu")
    pixels = [read_upload(p.read_bytes(), p.name, 64, Limits()) for p in test_images[:2]]
    out = api.predict([{"pixels": p, "maps": True} for p in pixels])
    method, _ = build_method(cfg)
    method.prepare("bottle", None)
    pre = Preprocess(64, method.backbone.mean, method.backbone.std)
    with torch.no_grad():
        ref = method(torch.stack([pre(load_image(p), None)[0] for p in test_images[:2]]), ["bottle"] * 2)
    for r, score in zip(out, ref.pred_score.tolist(), strict=True):
        assert r["score"] == pytest.approx(score, abs=1e-5) and r["decision"] == ("NG" if score > 0.44 else "OK")
        assert r["batch_size"] == 2 and "overlay_png" in r
