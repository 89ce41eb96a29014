"""``vlmad serve``: an inspection service on LitServe, with a web page, metrics and a folder watch.

    vlmad serve model=exports/bottle backend=openvino             # an export folder, torch-free runtime
    vlmad serve method=anomalyclip ckpt_path=model.ckpt class_name=bottle threshold.calibration.dir=good/

Endpoints: ``POST /predict`` (multipart field ``file``, repeated, or raw image bytes), ``GET /health``,
``GET /info``, ``GET /metrics`` (Prometheus text) and ``GET /`` (a self-contained page). LitServe runs the
model in ``workers_per_device`` inference processes and batches images across requests (``max_batch_size``,
``batch_timeout``). The HTTP side is this module's: uploads are read, validated and resized to the model's input
in the API process (a bad image is a 4xx naming the cause and never reaches a worker), each image is then one
LitServe request, so one upload of several images and many single-image clients batch alike. The torch-free path
never imports torch.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.request
import uuid
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
from PIL import Image, UnidentifiedImageError

import vlmad
from vlmad.data.imageio import to_rgb
from vlmad.deploy.runtime import BACKENDS, MANIFEST, DeployError, load, read_manifest
from vlmad.errors import VlmadError
from vlmad.outputs.heatmaps import JET_LUT  # the panels' jet colours (numpy / PIL only)

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WATCH_FIELDS = ["file", "size", "mtime_ns", "score", "max_pixel_score", "threshold", "decision", "overlay", "error"]


class ServeError(VlmadError, ValueError):
    """A bad serve setting (model folder, backend, port ...)."""


class BadInputError(Exception):
    """A request refused before inference: HTTP ``status``, a metrics ``kind`` and a message naming the cause."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


# ------------------------------------------------------------------ images
@dataclass
class Limits:
    """What one request may carry."""

    max_images: int = 16
    max_upload_bytes: int = 32 << 20
    max_pixels: int = 40_000_000


def read_upload(data: bytes, name: str, size: int, limits: Limits) -> np.ndarray:
    """Validate and decode one uploaded image, resized (squash, bicubic) to the model's input.

    Args:
        data: the file's bytes.
        name: its name (for messages).
        size: the model input side S.
        limits: ``max_pixels`` is checked on the header, before anything is decoded.

    Returns:
        (S, S, 3) uint8 RGB.

    Raises:
        BadInputError: empty (400), not an image (415), too many pixels / decompression bomb (413), truncated or
            undecodable pixel data (422).
    """
    if not data:
        raise BadInputError(400, "empty_file", f"{name}: empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise BadInputError(413, "too_many_pixels", f"{name}: decompression bomb refused ({err})") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise BadInputError(415, "not_an_image", f"{name}: not an image PIL can read ({err})") from None
    with img:
        w, h = img.size
        if w * h > limits.max_pixels:
            raise BadInputError(
                413,
                "too_many_pixels",
                f"{name}: {w}x{h} pixels is more than max_pixels={limits.max_pixels} (a decompression bomb or an "
                "image too large to inspect; checked on the header, nothing decoded)",
            )
        try:
            img.load()
            rgb = to_rgb(img)
        except (OSError, SyntaxError, ValueError) as err:
            raise BadInputError(422, "truncated", f"{name}: truncated or corrupt image data ({err})") from None
    return np.asarray(rgb.resize((size, size), Image.BICUBIC), dtype=np.uint8)


def normalise(pixels: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 CLIP-normalised, as ``vlmad.deploy.preprocess``."""
    x = pixels.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return (x - np.asarray(mean, np.float32).reshape(1, 3, 1, 1)) / np.asarray(std, np.float32).reshape(1, 3, 1, 1)


def png_b64(array: np.ndarray) -> str:
    """uint8 (H, W) or (H, W, 3) -> base64 PNG."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()


def colour(anomaly_map: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """(S, S) map -> (S, S) uint8 indices into the jet colour scale, clipped to ``scale`` = (low, high)."""
    low, high = scale
    return np.clip(np.rint((anomaly_map - low) / max(high - low, 1e-12) * 255), 0, 255).astype(np.uint8)


def overlay(pixels: np.ndarray, anomaly_map: np.ndarray, scale: tuple[float, float], alpha: float = 0.5) -> np.ndarray:
    """(S, S, 3) uint8 image blended with its jet-coloured map -> (S, S, 3) uint8."""
    heat = JET_LUT[colour(anomaly_map, scale)].astype(np.float32)
    return np.rint((1 - alpha) * pixels.astype(np.float32) + alpha * heat).astype(np.uint8)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------ model description
def describe(cfg: dict[str, Any]) -> dict[str, Any]:
    """What /info shows and every worker loads: method, backbone, weights fingerprint, thresholds, precision.

    Args:
        cfg: the resolved serve config (a plain dict).
    """
    if cfg.get("model"):
        folder = Path(cfg["model"])
        info = read_manifest(folder)
        backend = cfg.get("backend") or "openvino"
        if backend not in BACKENDS:
            raise ServeError(f"backend={backend} cannot serve model={folder}; use one of {BACKENDS}")
        files = info.get("files", {})
        if backend not in files:
            raise ServeError(f"{folder} has no {backend} model (exported: {', '.join(files) or 'none'})")
        weights = folder / files[backend]
        weight_files = [weights, weights.with_suffix(".bin")] if backend == "openvino" else [weights]
        digest = hashlib.sha256("".join(sha256_file(p) for p in weight_files if p.is_file()).encode()).hexdigest()
        thresholds = info.get("thresholds")
        use = info.get("threshold_use", "score")
        precision = info.get("precision", "fp32")
        out = {
            "method": info["method"],
            "backbone": info["backbone"]["model_name"],
            "pretrained": info["backbone"].get("pretrained"),
            "class_name": info["class_name"],
            "k_shot": info.get("k_shot"),
            "image_size": int(info["preprocess"]["image_size"]),
            "mean": info["preprocess"]["mean"],
            "std": info["preprocess"]["std"],
            "precision": precision.get(backend, "fp32") if isinstance(precision, dict) else precision,
            "agreement": info.get("int8"),
            "source": {"model": str(folder.resolve()), "backend": backend},
        }
    else:
        if not cfg.get("method"):
            raise ServeError("give model=<folder written by vlmad export> or method=... (ckpt_path=...)")
        ckpt = cfg.get("ckpt_path")
        digest = sha256_file(Path(ckpt)) if ckpt else f"random/pretrained weights, seed {cfg.get('seed', 0)}"
        if ckpt is None:
            digest = hashlib.sha256(json.dumps([cfg["method"], cfg["backbone"], cfg.get("seed")]).encode()).hexdigest()
        thresholds, use = None, cfg["threshold"]["use"]
        out = {
            "method": str(cfg["method"]["_target_"]).rsplit(".", 1)[-1],
            "backbone": cfg["backbone"].get("model_name"),
            "pretrained": cfg["backbone"].get("pretrained"),
            "class_name": cfg["class_name"],
            "k_shot": cfg["method"].get("k_shot", 0),
            "image_size": int(cfg["backbone"]["image_size"]),
            "mean": None,
            "std": None,
            "precision": "torch fp32",
            "agreement": None,
            "source": {"method": cfg["method"]["_target_"], "ckpt_path": ckpt, "backend": "torch"},
        }
    t = cfg.get("threshold", {})
    if t.get("value") is not None:  # a serve-time override
        pixel = t["value"] if t.get("pixel_value") is None else t["pixel_value"]
        thresholds = {"image_threshold": float(t["value"]), "pixel_threshold": float(pixel), "source": "value"}
    out.update(
        {
            "weights_sha256": digest,
            "model_id": f"{out['method']}-{out['class_name']}-{digest[:12]}",
            "thresholds": thresholds,
            "threshold_use": use,
            "vlmad_version": vlmad.__version__,
        }
    )
    scale = cfg.get("colour_scale")
    out["colour_scale"] = list(scale) if scale else [0.0, 1.0]
    return out


# ------------------------------------------------------------------ inference side (LitServe workers)
class _TorchRunner:
    """method + ckpt_path scored with torch (imported only here)."""

    def __init__(self, cfg: dict[str, Any], device: str) -> None:
        from omegaconf import OmegaConf

        from vlmad.deploy.predict import build_method, load_references, resolve_threshold

        conf = OmegaConf.create(cfg)
        if device != "cpu" and conf.get("device", "cpu") in ("auto", "cuda"):
            conf.device = device
        method, preprocess = build_method(conf)
        refs, ref_paths = None, []
        if method.k_shot > 0:
            refs, ref_paths = load_references(conf, preprocess, method.reference_draw(conf.class_name))
        method.prepare(conf.class_name, None if refs is None else refs.to(next(method.parameters()).device))
        t = conf.threshold
        given = t.value is not None or t.file is not None or t.calibration.dir is not None
        beside = conf.get("ckpt_path") and Path(f"{conf.ckpt_path}.threshold.json").exists()
        self.thresholds = resolve_threshold(conf, method, preprocess, ref_paths) if given or beside else None
        self.method, self.class_name = method, conf.class_name
        self.mean = preprocess.mean.flatten().tolist()
        self.std = preprocess.std.flatten().tolist()

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        device = next(self.method.parameters()).device
        with torch.inference_mode():
            pred = self.method(torch.from_numpy(images).to(device), [self.class_name] * len(images))
        return pred.pred_score.float().cpu().numpy(), pred.anomaly_map.float().cpu().numpy()


class InspectionAPI(ls.LitAPI):
    """One worker: the model, and per image score, map, decision, optional PNGs."""

    def __init__(self, cfg: dict[str, Any], model_info: dict[str, Any], max_batch_size: int, timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=timeout, api_path="/predict")
        self.cfg, self.model_info = cfg, model_info

    def setup(self, device: str) -> None:
        cfg, info = self.cfg, self.model_info
        if cfg.get("model"):
            model = load(cfg["model"], cfg.get("backend") or "openvino", cfg.get("threads"))
            self.run, self.mean, self.std = model.run, model.mean, model.std
            stored = model.thresholds
        else:
            runner = _TorchRunner(cfg, device)
            self.run, self.mean, self.std, stored = runner, runner.mean, runner.std, runner.thresholds
        self.thresholds = info["thresholds"] if info["thresholds"] is not None else stored
        self.use = info["threshold_use"]
        self.scale = tuple(info["colour_scale"])
        self.pid = os.getpid()

    def decode_request(self, request: dict[str, Any]) -> dict[str, Any]:
        return request

    def batch(self, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return inputs

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def predict(self, inputs: Any) -> Any:
        single = isinstance(inputs, dict)
        items = [inputs] if single else inputs
        pixels = np.stack([it["pixels"] for it in items])  # (B, S, S, 3) uint8
        scores, maps = self.run(normalise(pixels, self.mean, self.std))
        batch_id = uuid.uuid4().hex[:8]
        out = [
            self.answer(it, float(s), m, len(items), i, batch_id)
            for i, (it, s, m) in enumerate(zip(items, scores, maps, strict=True))
        ]
        return out[0] if single else out

    def answer(
        self, item: dict[str, Any], score: float, amap: np.ndarray, batch: int, index: int, batch_id: str
    ) -> dict[str, Any]:
        t = self.thresholds
        peak = float(amap.max())
        decision, mask = None, None
        if t is not None:
            value = score if self.use == "score" else peak
            limit = float(t["image_threshold"] if self.use == "score" else t["pixel_threshold"])
            decision = "NG" if value > limit else "OK"
            mask = amap > float(t["pixel_threshold"])
        out: dict[str, Any] = {
            "score": score,
            "max_pixel_score": peak,
            "decision": decision,
            "batch_size": batch,
            "batch_index": index,
            "batch_id": batch_id,
            "worker_pid": self.pid,
            "thresholds": None
            if t is None
            else {
                "image": float(t["image_threshold"]),
                "pixel": float(t["pixel_threshold"]),
                "use": self.use,
                "source": t.get("source"),
            },
        }
        if item.get("maps"):
            out["anomaly_map_png"] = png_b64(colour(amap, self.scale))
            out["overlay_png"] = png_b64(overlay(item["pixels"], amap, self.scale))
            if mask is not None:
                out["mask_png"] = png_b64(mask.astype(np.uint8) * 255)
        return out

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


# ------------------------------------------------------------------ metrics
class Metrics:
    """Prometheus counters and histograms kept in the API process (text format written by hand)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.batches: dict[int, int] = defaultdict(int)
        self.images = 0
        self.queue_depth = 0

    def request(self, path: str, status: int, seconds: float, kind: str | None = None) -> None:
        with self.lock:
            self.requests[(path, status)] += 1
            if kind:
                self.errors[kind] += 1
            if path == "/predict":
                self.latency_sum += seconds
                i = next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
                self.latency[i] += 1

    def batch(self, size: int) -> None:
        with self.lock:
            self.batches[size] += 1

    def text(self) -> str:
        with self.lock:
            lines = [
                "# HELP vlmad_requests_total HTTP requests by path and status.",
                "# TYPE vlmad_requests_total counter",
            ]
            lines += [
                f'vlmad_requests_total{{path="{p}",code="{c}"}} {n}' for (p, c), n in sorted(self.requests.items())
            ]
            lines += [
                "# HELP vlmad_errors_total Refused or failed requests by cause.",
                "# TYPE vlmad_errors_total counter",
            ]
            lines += [f'vlmad_errors_total{{kind="{k}"}} {n}' for k, n in sorted(self.errors.items())]
            lines += ["# HELP vlmad_images_total Images scored.", "# TYPE vlmad_images_total counter"]
            lines += [f"vlmad_images_total {self.images}"]
            lines += ["# HELP vlmad_request_seconds POST /predict latency.", "# TYPE vlmad_request_seconds histogram"]
            cumulative = 0
            for bound, n in zip([*LATENCY_BUCKETS, "+Inf"], self.latency, strict=True):
                cumulative += n
                lines.append(f'vlmad_request_seconds_bucket{{le="{bound}"}} {cumulative}')
            lines += [f"vlmad_request_seconds_sum {self.latency_sum:.6f}", f"vlmad_request_seconds_count {cumulative}"]
            lines += ["# HELP vlmad_batch_size Inference batch sizes.", "# TYPE vlmad_batch_size histogram"]
            cumulative, total = 0, 0
            top = max([1, 2, 4, 8, 16, 32, 64, *self.batches])
            for bound in sorted({1, 2, 4, 8, 16, 32, 64, top}):
                cumulative = sum(n for s, n in self.batches.items() if s <= bound)
                lines.append(f'vlmad_batch_size_bucket{{le="{bound}"}} {cumulative}')
            total = sum(s * n for s, n in self.batches.items())
            lines += [f'vlmad_batch_size_bucket{{le="+Inf"}} {cumulative}']
            lines += [f"vlmad_batch_size_sum {total}", f"vlmad_batch_size_count {cumulative}"]
            lines += [
                "# HELP vlmad_queue_depth Images accepted and not yet answered.",
                "# TYPE vlmad_queue_depth gauge",
            ]
            lines += [f"vlmad_queue_depth {self.queue_depth}"]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ HTTP side
def _json_error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": kind, "detail": message}, status_code=status, headers=headers)


async def _read_body(request: Any, limit: int) -> bytes:
    """The raw body, refused past ``limit`` bytes; BadInputError on a client that disconnects mid-upload."""
    from starlette.requests import ClientDisconnect

    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise BadInputError(413, "upload_too_large", f"request body over max_upload_mb ({limit} bytes)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadInputError(400, "client_disconnected", "client disconnected mid-upload") from None
    return b"".join(chunks)


async def _uploads(request: Any, limits: Limits) -> list[tuple[str, bytes]]:
    """(name, bytes) of each uploaded image: multipart ``file`` fields, or the raw body of an image request."""
    from starlette.requests import ClientDisconnect

    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limits.max_upload_bytes:
        raise BadInputError(413, "upload_too_large", f"Content-Length {length} is over max_upload_bytes")
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=limits.max_images + 1, max_fields=limits.max_images + 8)
        except ClientDisconnect:
            raise BadInputError(400, "client_disconnected", "client disconnected mid-upload") from None
        except Exception as err:  # starlette's HTTPException(400) for a malformed body or too many parts
            detail = getattr(err, "detail", str(err))
            if "too many" in str(detail).lower():
                raise BadInputError(
                    413, "too_many_images", f"too many files (max_images={limits.max_images})"
                ) from None
            raise BadInputError(400, "bad_multipart", f"malformed multipart body: {detail}") from None
        try:
            files = form.getlist("file")
            if not files:
                raise BadInputError(400, "no_file", f"multipart body has no field 'file' (fields: {list(form.keys())})")
            if len(files) > limits.max_images:
                raise BadInputError(413, "too_many_images", f"{len(files)} images, max_images={limits.max_images}")
            out = []
            for i, f in enumerate(files):
                if isinstance(f, str):
                    raise BadInputError(400, "no_file", f"field 'file' #{i} is text, not a file upload")
                name = f.filename or f"file#{i}"
                fctype = (f.content_type or "").split(";")[0].lower()
                if fctype and not (fctype.startswith("image/") or fctype == "application/octet-stream"):
                    raise BadInputError(
                        415, "wrong_content_type", f"{name}: content type {fctype} is not an image type"
                    )
                out.append((name, await f.read()))
            return out
        finally:
            await form.close()
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return [("body", await _read_body(request, limits.max_upload_bytes))]
    raise BadInputError(
        415,
        "wrong_content_type",
        f"content type {ctype or '(none)'}: send multipart/form-data with field 'file', or image/* bytes",
    )


class InspectionServer:
    """The LitServer, this module's routes and the graceful stop.

    Args:
        cfg: the resolved serve config (a plain dict).
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.info = describe(cfg)
        # max_pixels (checked on every header before decoding) is this server's guard; PIL's own bomb check would
        # refuse at open without the image size, so it is turned off in this process only
        Image.MAX_IMAGE_PIXELS = None
        self.limits = Limits(
            int(cfg["max_images"]), int(float(cfg["max_upload_mb"]) * (1 << 20)), int(cfg["max_pixels"])
        )
        self.max_queue = int(cfg["max_queue"])
        self.metrics = Metrics()
        self.draining = False
        api = InspectionAPI(cfg, self.info, int(cfg["max_batch_size"]), float(cfg["batch_timeout"]))
        self.lit = ls.LitServer(
            api,
            accelerator=cfg.get("accelerator", "cpu"),
            devices=cfg.get("devices", "auto"),
            workers_per_device=int(cfg["workers_per_device"]),
            timeout=float(cfg["timeout"]),
            restart_workers=True,
            disable_openapi_url=True,
        )
        self.lit.monitor_internal = 0.5
        self.lit._start_server = self._start_server  # one uvicorn thread we can stop gracefully
        self.handler = None
        self.uvicorn = None
        self._routes()

    # -------------------------------------------------------------- routes
    def _routes(self) -> None:
        from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
        from litserve.server import RegularRequestHandler

        app = self.lit.app
        app.router.routes = [
            r for r in app.router.routes if getattr(r, "path", None) not in ("/", "/health", "/info", "/predict")
        ]
        self.handler = RegularRequestHandler(self.lit.lit_api, self.lit)
        page = (STATIC / "index.html").read_text()

        @app.get("/")
        async def index() -> HTMLResponse:
            return HTMLResponse(page)

        @app.get("/health")
        async def health() -> JSONResponse:
            status = self.lit.workers_setup_status if hasattr(self.lit, "workers_setup_status") else {}
            ready = bool(status) and all(
                str(v) == "ready" or getattr(v, "value", v) == "ready" for v in status.values()
            )
            if self.draining:
                return JSONResponse({"status": "stopping"}, status_code=503)
            return JSONResponse({"status": "ready" if ready else "loading"}, status_code=200 if ready else 503)

        @app.get("/info")
        async def info() -> JSONResponse:
            server = {k: self.cfg[k] for k in ("max_batch_size", "batch_timeout", "workers_per_device", "max_queue")}
            return JSONResponse({**self.info, "server": {**server, **self.limits.__dict__}})

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse(self.metrics.text(), media_type="text/plain; version=0.0.4")

        @app.post("/predict")
        async def predict(request: Any) -> Any:
            return await self.predict(request)

        # FastAPI reads the annotation: the endpoint takes the raw starlette Request
        from starlette.requests import Request

        predict.__annotations__["request"] = Request
        app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/predict"]
        app.add_api_route("/predict", predict, methods=["POST"])

    async def predict(self, request: Any) -> Any:
        """``POST /predict``: validate, decode, score every image through LitServe's queue, answer JSON."""
        from fastapi import HTTPException
        from fastapi.responses import JSONResponse
        from starlette.concurrency import run_in_threadpool

        start = time.perf_counter()
        accepted = 0
        try:
            if self.draining:
                raise BadInputError(503, "stopping", "server is stopping", {"Retry-After": "5"})
            want_maps = request.query_params.get("maps", str(self.cfg.get("maps", False))).lower() in ("1", "true")
            uploads = await _uploads(request, self.limits)
            if self.metrics.queue_depth + len(uploads) > self.max_queue:
                raise BadInputError(
                    503,
                    "queue_full",
                    f"queue full ({self.metrics.queue_depth} images waiting, max_queue={self.max_queue}); retry",
                    {"Retry-After": "1"},
                )
            accepted = len(uploads)
            with self.metrics.lock:
                self.metrics.queue_depth += accepted
            size = self.info["image_size"]
            pixels = await run_in_threadpool(lambda: [read_upload(d, n, size, self.limits) for n, d in uploads])
            try:
                results = await asyncio.gather(
                    *(self.handler.handle_request({"pixels": p, "maps": want_maps}, dict) for p in pixels)
                )
            except HTTPException as err:
                if err.status_code == 504:
                    raise BadInputError(504, "timeout", f"inference timed out ({self.cfg['timeout']} s)") from None
                raise BadInputError(
                    503, "worker_error", f"inference worker failed ({err.detail}); retry", {"Retry-After": "1"}
                ) from None
            answers = []
            for (name, _), res in zip(uploads, results, strict=True):
                if res.get("batch_index") == 0:
                    self.metrics.batch(res["batch_size"])
                if self.info["thresholds"] is None and res["thresholds"] is not None:  # method=: set by the worker
                    t = res["thresholds"]
                    self.info["thresholds"] = {
                        "image_threshold": t["image"],
                        "pixel_threshold": t["pixel"],
                        "source": t["source"],
                    }
                answers.append(
                    {"file": name, "class_name": self.info["class_name"], "model_id": self.info["model_id"], **res}
                )
            with self.metrics.lock:
                self.metrics.images += len(answers)
            body = {"model_id": self.info["model_id"], "class_name": self.info["class_name"], "results": answers}
            self.metrics.request("/predict", 200, time.perf_counter() - start)
            return JSONResponse(body)
        except BadInputError as err:
            self.metrics.request("/predict", err.status, time.perf_counter() - start, err.kind)
            return _json_error(err.status, err.kind, err.message, err.headers)
        finally:
            if accepted:
                with self.metrics.lock:
                    self.metrics.queue_depth -= accepted

    # -------------------------------------------------------------- lifecycle
    def _start_server(self, port: int, num: int, log_level: str, sockets: list, worker_type: str, **kwargs: Any):
        """LitServer._start_server for one API server in a thread, kept so SIGTERM can stop it gracefully."""
        import uvicorn
        from litserve.server import _Server

        self.lit.app.response_queue_id = 0
        config = uvicorn.Config(app=self.lit.app, log_level=log_level, timeout_graceful_shutdown=30, **kwargs)
        self.uvicorn = _Server(config=config)
        thread = threading.Thread(target=self.uvicorn.run, args=(0, sockets), name="vlmad-serve-http")
        thread.start()
        self._http_thread = thread
        return {}

    def stop(self, *_: Any) -> None:
        """SIGTERM/SIGINT: refuse new requests, let uvicorn finish those in flight, then stop the workers."""
        if self.draining:
            return
        self.draining = True
        log.warning("stopping: finishing %d queued images", self.metrics.queue_depth)

        def _drain() -> None:
            deadline = time.monotonic() + float(self.cfg["timeout"])
            while self.metrics.queue_depth > 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.uvicorn is not None:
                self.uvicorn.should_exit = True
                self._http_thread.join(timeout=30)
            if self.lit._shutdown_event is not None:
                self.lit._shutdown_event.set()

        threading.Thread(target=_drain, name="vlmad-serve-drain", daemon=True).start()

    def run(self) -> None:
        """Serve until SIGTERM / SIGINT (blocks)."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        watcher = None
        if self.cfg.get("watch"):
            watcher = FolderWatch(
                self.cfg["watch"], self.cfg.get("watch_output"), self.url, float(self.cfg["watch_interval"])
            )
            threading.Thread(target=watcher.run, name="vlmad-serve-watch", daemon=True).start()
        print(f"vlmad serve: {self.info['model_id']} on {self.url} (workers loading)", flush=True)
        self.lit.run(
            host=self.cfg["host"],
            port=int(self.cfg["port"]),
            num_api_servers=1,
            api_server_worker_type="thread",
            generate_client_file=False,
            log_level=self.cfg.get("log_level", "warning"),
        )
        if watcher is not None:
            watcher.stop_event.set()
        print("vlmad serve: stopped", flush=True)

    @property
    def url(self) -> str:
        return f"http://{self.cfg['host']}:{self.cfg['port']}"


# ------------------------------------------------------------------ folder watch
class FolderWatch:
    """Score each new complete image of a folder once, through the server's own /predict.

    A file is complete when its size and mtime have not changed over one poll interval and it is not empty; one
    that still reads as truncated is retried until it has not changed for ``max(2 s, 10 intervals)``.
    ``predictions.csv`` (in ``output``, default ``<folder>/scored``) is the memory: a file listed there (by name,
    size and mtime) is never scored again, so a restart picks up exactly the files that arrived while down.

    Args:
        folder: the folder to watch (not recursive).
        output: where predictions.csv and ``<stem>_overlay.png`` go.
        url: the server's base URL.
        interval: seconds between polls.
    """

    def __init__(self, folder: str | Path, output: str | Path | None, url: str, interval: float = 0.5) -> None:
        self.folder = Path(folder)
        self.output = Path(output) if output else self.folder / "scored"
        self.url, self.interval = url, interval
        self.stop_event = threading.Event()
        self.output.mkdir(parents=True, exist_ok=True)
        self.table = self.output / "predictions.csv"
        self.done: set[tuple[str, int, int]] = set()
        if self.table.exists():
            with self.table.open(newline="", encoding="utf-8") as f:
                self.done = {(r["file"], int(r["size"]), int(r["mtime_ns"])) for r in csv.DictReader(f)}
        self.seen: dict[str, tuple[int, int]] = {}
        self.failing: dict[tuple[str, int, int], float] = {}
        self.settle = max(2.0, 10 * interval)

    def candidates(self) -> list[tuple[Path, int, int]]:
        """Files complete since the last poll and not yet scored."""
        ready = []
        for path in sorted(self.folder.iterdir()):
            if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTS:
                continue
            st = path.stat()
            key = (st.st_size, st.st_mtime_ns)
            if (path.name, *key) in self.done:
                continue
            if self.seen.get(path.name) == key and st.st_size > 0:
                ready.append((path, *key))
            self.seen[path.name] = key
        return ready

    def score(self, path: Path, size: int, mtime: int) -> None:
        """POST one file, write its overlay, append its row (flushed)."""
        row: dict[str, Any] = {"file": path.name, "size": size, "mtime_ns": mtime}
        request = urllib.request.Request(
            f"{self.url}/predict?maps=true",
            data=path.read_bytes(),
            headers={"Content-Type": "application/octet-stream"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as resp:
                res = json.loads(resp.read())["results"][0]
        except urllib.error.HTTPError as err:
            body = json.loads(err.read() or b"{}")
            if err.code >= 500:  # queue full / stopping / worker lost: retried on the next poll
                self.seen.pop(path.name, None)
                return
            # a file still being written can read as truncated/empty: retried while it changes, and recorded as
            # an error only once it has stayed the same for `settle` seconds
            first = self.failing.setdefault((path.name, size, mtime), time.monotonic())
            if err.code in (400, 422) and time.monotonic() - first < self.settle:
                self.seen.pop(path.name, None)
                return
            row["error"] = body.get("detail", str(err))
        else:
            overlay_path = self.output / f"{path.stem}_overlay.png"
            overlay_path.write_bytes(base64.b64decode(res["overlay_png"]))
            t = res.get("thresholds")
            row.update(
                score=res["score"],
                max_pixel_score=res["max_pixel_score"],
                threshold=None if t is None else (t["image"] if t["use"] == "score" else t["pixel"]),
                decision=res["decision"],
                overlay=overlay_path.name,
            )
        new = not self.table.exists()
        with self.table.open("a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, WATCH_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())
        self.done.add((path.name, size, mtime))

    def run(self) -> None:
        """Poll until stopped (waits for the server to be ready first)."""
        while not self.stop_event.is_set():
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
            self.stop_event.wait(0.2)
        while not self.stop_event.is_set():
            try:
                for path, size, mtime in self.candidates():
                    if self.stop_event.is_set():
                        break
                    self.score(path, size, mtime)
            except OSError as err:  # server going away, a file vanishing: next poll
                log.warning("folder watch: %s", err)
            self.stop_event.wait(self.interval)


# ------------------------------------------------------------------ command
def resolve(cfg: Any) -> dict[str, Any]:
    """The Hydra config as a plain dict; the method/backbone nodes only for the torch path."""
    from omegaconf import OmegaConf

    out = OmegaConf.to_container(cfg, resolve=False)
    out.pop("hydra", None)
    if cfg.get("model"):
        out.pop("method", None)
        out.pop("backbone", None)
    else:
        out["method"] = OmegaConf.to_container(cfg.method, resolve=True)
        out["backbone"] = OmegaConf.to_container(cfg.backbone, resolve=True)
    out["paths"] = {"data_dir": str(cfg.paths.data_dir)}
    out.pop("run_name", None)
    for key in ("model", "watch", "watch_output", "ckpt_path", "references"):
        if out.get(key):
            out[key] = str(Path(str(out[key])).resolve())
    return json.loads(json.dumps(out))


def serve(cfg: Any) -> None:
    """Build the server from a composed config and run it until stopped."""
    spec = resolve(cfg)
    if spec.get("model") and not (Path(spec["model"]) / MANIFEST).is_file():
        raise DeployError(f"model={spec['model']}: no {MANIFEST} there (a folder written by vlmad export)")
    InspectionServer(spec).run()


def main() -> None:
    """Entry point of ``vlmad serve`` / ``python -m vlmad.deploy.serve``."""
    import hydra

    from vlmad.config import CONF_DIR
    from vlmad.errors import exit_on_user_error

    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="serve")(exit_on_user_error(serve))()


if __name__ == "__main__":
    sys.exit(main())
