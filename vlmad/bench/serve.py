"""``vlmad serve`` under load on loopback, its faults, and INT8 / fp32 speed (``make bench`` sections serve, int8).

Load: N clients x M single-image requests (bounded; it stops by itself) at concurrency 1, 8 and 32: every request
must be answered exactly once; p50 / p99 latency, images/s, and the ratio to the offline rate of the same export
and backend (``vlmad.deploy`` in batches of ``max_batch_size``, what ``vlmad predict backend=openvino`` runs).
Faults: one inference worker SIGKILLed mid-load (what the clients see, whether it recovers) and SIGTERM mid-load
(the requests in flight are answered, then the server exits). RSS of the server's processes before and after.
The client helpers here (multipart encoding, a server subprocess) are also used by tests/integration/test_serve.py.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np


# ------------------------------------------------------------------ client helpers
def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(files: list[tuple[str, bytes]], content_type: str = "image/png") -> tuple[bytes, str]:
    """Encode files as the multipart field ``file`` (repeated) -> (body, Content-Type header)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        )
        parts += [head.encode(), data, b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def request(
    port: int, method: str, path: str, body: bytes | None = None, ctype: str | None = None, timeout: float = 120
) -> tuple[int, Any, dict[str, str]]:
    """One HTTP request on loopback -> (status, parsed JSON or text, headers)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": ctype} if ctype else {})
        resp = conn.getresponse()
        raw = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    try:
        data: Any = json.loads(raw)
    except ValueError:
        data = raw.decode(errors="replace")
    return resp.status, data, headers


def post_images(port: int, files: list[tuple[str, bytes]], maps: bool = False) -> tuple[int, Any, dict[str, str]]:
    """POST /predict with the files as multipart."""
    body, ctype = multipart(files)
    return request(port, "POST", "/predict" + ("?maps=true" if maps else ""), body, ctype)


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (MiB), from /proc."""
    total = 0
    for p in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def children(pid: int) -> list[int]:
    """Every descendant pid (from /proc/*/stat)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, stack = [], [pid]
    while stack:
        for c in parents.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


class ServerProcess:
    """``python -m vlmad.deploy.serve`` in a subprocess on a free loopback port.

    Args:
        overrides: Hydra overrides (model=..., watch=...).
        workdir: the run directory and log file location.
    """

    def __init__(self, overrides: list[str], workdir: Path, port: int | None = None) -> None:
        self.overrides, self.workdir = overrides, Path(workdir)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240) -> ServerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = (self.workdir / f"serve-{self.port}-{time.time_ns()}.log").open("w")
        cmd = [
            sys.executable,
            "-m",
            "vlmad.deploy.serve",
            *self.overrides,
            f"port={self.port}",
            f"hydra.run.dir={self.workdir / 'run'}",
        ]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.read_log()[-3000:]}")
            try:
                if request(self.port, "GET", "/health", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s: {self.read_log()[-3000:]}")

    def read_log(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        """The LitServe inference worker processes (spawned children running the model)."""
        assert self.proc is not None
        out = []
        for pid in children(self.proc.pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmd:
                out.append(pid)
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        """Signal the server and wait for it to exit; returns its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid in children(self.proc.pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.log.close()


def load(port: int, images: list[tuple[str, bytes]], clients: int, per_client: int) -> dict[str, Any]:
    """``clients`` threads each sending ``per_client`` single-image requests; bounded, stops by itself.

    Returns:
        statuses (Counter), latencies (s) of the 200s, wall seconds, and every request's id -> answers seen.
    """
    statuses: Counter = Counter()
    latencies: list[float] = []
    answered: dict[str, int] = {}
    errors: Counter = Counter()
    lock = threading.Lock()

    def client(c: int) -> None:
        for i in range(per_client):
            name, data = images[(c * per_client + i) % len(images)]
            rid = f"{c}-{i}-{name}"
            t0 = time.perf_counter()
            try:
                status, body, _ = post_images(port, [(rid, data)])
            except OSError as err:
                with lock:
                    errors[type(err).__name__] += 1
                continue
            with lock:
                statuses[status] += 1
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                    for r in body["results"]:
                        answered[r["file"]] = answered.get(r["file"], 0) + 1
                elif isinstance(body, dict):
                    errors[body.get("error", str(status))] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    return {
        "clients": clients,
        "requests": clients * per_client,
        "statuses": dict(statuses),
        "errors": dict(errors),
        "answered_once": sum(n == 1 for n in answered.values()),
        "answered_twice_or_more": sum(n > 1 for n in answered.values()),
        "p50_ms": float(np.percentile(lat, 50) * 1000),
        "p99_ms": float(np.percentile(lat, 99) * 1000),
        "images_per_s": statuses[200] / wall,
        "wall_s": wall,
    }


# ------------------------------------------------------------------ benchmark
def _export(folder: Path, quick: bool, method: str = "winclip", precision: str = "fp32") -> Path:
    from vlmad.config import compose
    from vlmad.deploy.export import export

    backbone = (
        ["backbone=tiny", "backbone.image_size=64"]
        if quick
        else {
            "winclip": ["backbone=vit_b16_plus_240"],
            "anomalyclip": ["backbone=vit_l14_336", "backbone.image_size=518"],
            "aprilgan": ["backbone=vit_l14_336", "backbone.image_size=518"],
        }[method]
    )
    small = {"anomalyclip": ["method.feature_layers=[1,3]", "method.dpam_start=1", "method.deep_prompt_depth=2"]}
    extra = small.get(method, []) + (["method.feature_layers=[1,3]"] if quick and method == "aprilgan" else [])
    overrides = [
        *backbone,
        "backbone.pretrained=null",
        f"method={method}",
        *(extra if quick else []),
        "format=openvino",
        f"output_dir={folder}",
        "threshold.value=0.5",
    ]
    if precision == "int8":
        overrides += ["precision=int8", f"int8.calibration_dir={folder.parent / 'good'}", "int8.force=true"]
    return export(compose("export", overrides, folder.parent / f"run-{method}-{precision}"))


def _images(folder: Path, n: int, size: int) -> list[tuple[str, bytes]]:
    """n generated PNGs (noise with a bright square) at the model size, also written to folder/good."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    (folder / "good").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(90, 160, (size, size, 3), dtype=np.uint8)
        pixels[size // 4 : size // 2, size // 4 : size // 2] = 230
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out.append((f"img{i:03d}.png", buf.getvalue()))
        (folder / "good" / f"img{i:03d}.png").write_bytes(buf.getvalue())
    return out


def offline_rate(folder: Path, images: list[tuple[str, bytes]], batch: int, repeats: int = 3) -> float:
    """Images/s of the export scored in process (decode + preprocess + run), batches of ``batch``."""
    import io

    from PIL import Image

    from vlmad import deploy

    model = deploy.load(folder, "openvino")
    model.predict([Image.open(io.BytesIO(images[0][1]))])
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            model.predict([Image.open(io.BytesIO(d)) for _, d in images[i : i + batch]])
        best = max(best, len(images) / (time.perf_counter() - t0))
    return best


def run_serve(quick: bool = False, per_client: int = 10) -> dict[str, Any]:
    """Load test at concurrency 1, 8, 32 and the two faults; prints a table, returns the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        size = 64 if quick else 240
        images = _images(base, 32, size)
        folder = _export(base / "model", quick)
        batch = 8
        offline = offline_rate(folder, images, batch)
        server = ServerProcess(
            [f"model={folder}", "backend=openvino", f"max_batch_size={batch}", "batch_timeout=0.005", "max_queue=256"],
            base / "serve",
        ).start()
        rows = []
        try:
            rss0 = rss_mb(server.proc.pid)
            for clients in (1, 8, 32):
                r = load(server.port, images, clients, per_client)
                r["ratio_to_offline"] = r["images_per_s"] / offline
                rows.append(r)
            rss1 = rss_mb(server.proc.pid)
            # SIGKILL one worker mid-load
            result: dict[str, Any] = {}
            t = threading.Thread(target=lambda: result.update(load(server.port, images, 8, per_client)))
            t.start()
            time.sleep(1.0)
            killed = server.worker_pids()
            if killed:
                os.kill(killed[0], signal.SIGKILL)
            t.join()
            time.sleep(3)
            after = load(server.port, images, 2, 5)
            kill = {"during": result, "after_recovery": after, "killed_pid": killed[:1]}
            # SIGTERM mid-load
            result2: dict[str, Any] = {}
            t = threading.Thread(target=lambda: result2.update(load(server.port, images, 8, per_client)))
            t.start()
            time.sleep(1.0)
            code = server.stop(signal.SIGTERM)
            t.join()
            term = {"during": result2, "exit_code": code}
        finally:
            server.stop()
    print(f"offline (vlmad.deploy, openvino, batch {batch}): {offline:.1f} img/s")
    print(
        f"{'clients':>8} {'requests':>8} {'200':>5} {'other':>12} {'p50 ms':>8} {'p99 ms':>8} {'img/s':>7} {'ratio':>6}"
    )
    for r in rows:
        other = {k: v for k, v in r["statuses"].items() if k != 200}
        print(
            f"{r['clients']:>8} {r['requests']:>8} {r['statuses'].get(200, 0):>5} {other!s:>12} {r['p50_ms']:>8.1f} "
            f"{r['p99_ms']:>8.1f} {r['images_per_s']:>7.1f} {r['ratio_to_offline']:>6.2f}"
        )
    print(f"RSS of the server's processes: {rss0:.0f} MiB before, {rss1:.0f} MiB after the load")
    print(
        f"SIGKILL a worker mid-load: statuses {kill['during']['statuses']}, errors {kill['during']['errors']}; "
        f"after recovery: {kill['after_recovery']['statuses']}"
    )
    print(
        f"SIGTERM mid-load: statuses {term['during']['statuses']}, errors {term['during']['errors']}, "
        f"exit code {term['exit_code']}"
    )
    return {"offline_images_per_s": offline, "load": rows, "rss_mb": [rss0, rss1], "sigkill": kill, "sigterm": term}


def run_int8(quick: bool = False, methods: tuple[str, ...] = ("winclip", "anomalyclip", "aprilgan")) -> list[dict]:
    """INT8 / fp32 OpenVINO images/s per exportable method (batch 1, best of interleaved calls)."""
    from vlmad import deploy

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        size = 64 if quick else None
        for method in methods:
            fp32 = _export(base / f"{method}-fp32", quick, method)
            s = size or deploy.read_manifest(fp32)["preprocess"]["image_size"]
            _images(base / f"{method}-int8", 8, s)
            int8 = _export(base / f"{method}-int8" / "model", quick, method, "int8")
            x = np.random.default_rng(0).standard_normal((1, 3, s, s)).astype(np.float32)
            models = {"fp32": deploy.load(fp32, "openvino"), "int8": deploy.load(int8, "openvino")}
            best = {k: float("inf") for k in models}
            for _ in range(10):
                for k, m in models.items():
                    t0 = time.perf_counter()
                    m.run(x)
                    best[k] = min(best[k], time.perf_counter() - t0)
            rows.append({"method": method, "size": s, "fp32_ms": best["fp32"] * 1e3, "int8_ms": best["int8"] * 1e3})
    print(f"{'method':>12} {'size':>5} {'fp32 ms':>8} {'int8 ms':>8} {'speed-up':>8}")
    for r in rows:
        print(
            f"{r['method']:>12} {r['size']:>5} {r['fp32_ms']:>8.1f} {r['int8_ms']:>8.1f} "
            f"{r['fp32_ms'] / r['int8_ms']:>8.2f}"
        )
    return rows


def run(quick: bool = False) -> list[dict]:
    """``make bench`` section ``serve``: the load rows, then one row per fault."""
    out = run_serve(quick)
    rows = [
        {k: r[k] for k in ("clients", "requests", "statuses", "p50_ms", "p99_ms", "images_per_s", "ratio_to_offline")}
        for r in out["load"]
    ]
    rows.append({"fault": "SIGKILL worker", **{k: out["sigkill"]["during"][k] for k in ("statuses", "errors")}})
    rows.append({"fault": "SIGTERM", **{k: out["sigterm"]["during"][k] for k in ("statuses", "errors")}})
    return rows


def format_rows(rows: list[dict]) -> str:
    """Rows as aligned text (any keys)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    width = {k: max(len(k), *(len(cell(r.get(k, ""))) for r in rows)) for k in keys}
    lines = ["  ".join(k.rjust(width[k]) for k in keys)]
    lines += ["  ".join(cell(r.get(k, "")).rjust(width[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m vlmad.bench.serve [--quick] [--int8]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny backbone at 64 px: checks the harness")
    parser.add_argument("--per-client", type=int, default=10)
    parser.add_argument("--int8", action="store_true", help="only the INT8 / fp32 speed table")
    args = parser.parse_args(argv)
    if args.int8:
        run_int8(args.quick)
    else:
        run_serve(args.quick, args.per_client)


if __name__ == "__main__":
    main()
