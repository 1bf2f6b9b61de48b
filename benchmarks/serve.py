"""``sicot serve`` under load on 127.0.0.1: micro-batching on and off, memory, hostile requests.

Run ``python -m benchmarks.serve [--quick] [--run DIR] [--threads 1]``. Everything stays on the
loopback interface and is bounded: a fixed number of requests per measurement, each measurement
cut at ``--point-seconds``, the whole run a few minutes at most (``--quick``: under one).

- The model: ``--run DIR``, or a run trained here for one epoch on a synthetic 120-class set (the
  demo's model: ResNet-18 at 32 px). The images: 32 JPEGs of 320 x 240 made here.
- Two ``sicot serve`` processes of the same run, started once: micro-batching on (``--max-batch 32
  --max-wait-ms 5``) and off (``--max-batch 1``), each with one model thread. Concurrency 1, 8 and
  32 against each, in interleaved rounds (a slow spell of the shared machine hits both):
  requests/s and p50/p95/p99 latency as the client sees them. Every answer is checked against
  :func:`sicot_cli.predict.predict` (``sicot predict``) for the same image.
- Reference: ``sicot predict --run DIR IMG`` per image (a process per call: start, load, answer),
  and for 32 images in one call.
- Memory: a third server's resident set (``/proc/<pid>/status``) after 100 requests and after
  10,000 (``--quick``: 1,000) at concurrency 8, with points between.
- Hostile: the same load with 10 % hostile requests mixed in (garbage bytes, an oversized upload,
  a slow client that sends 10 bytes of an announced 10 kB, a non-image content type): the status
  each gets, and whether every good request still answered correctly.

Goal (the issue's): at concurrency 32, micro-batching >= 2x the requests/s of batch 1, at a p95
no worse than batch 1's (within 10 %). Results: ``benchmarks/results/serve-cpu.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.common import benchmark_parser, parse, positive_int, start, write_results

USES_DEVICE = False  # a CPU service: `python -m benchmarks all --device cuda` still runs it here
GOAL = 2.0
P95_SLACK = 1.1
SERVER_TIMEOUT_S = 2  # the per-request limit of the servers: how long a slow client is held
ON = "batching on"
OFF = "batching off"


def make_images(folder: Path, n: int = 32, seed: int = 0) -> list[Path]:
    """``n`` smooth 320 x 240 JPEGs (product-photo-like: low-frequency colour, a little noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        big = np.asarray(small.resize((320, 240), Image.Resampling.BICUBIC), dtype=np.int16)
        big = np.clip(big + rng.integers(-8, 9, big.shape), 0, 255).astype(np.uint8)
        path = folder / f"img{i:02d}.jpg"
        Image.fromarray(big).save(path, quality=90)
        paths.append(path)
    return paths


def make_run(folder: Path) -> Path:
    """A run of the demo's model (ResNet-18, 32 px, 120 classes) trained one epoch on random images."""
    from benchmarks.train_step import synthetic_prepared
    from sicot_cli.config import load_recipe
    from sicot_cli.train import train

    data = folder / "serve.h5"
    synthetic_prepared(data, 600, 32, 120, n_train=480)
    recipe = load_recipe(
        None,
        [
            f"data.out={data}",
            "model.encoder=none",
            "model.backbone=resnet18",
            "train.epochs=1",
            "train.batch_size=32",
            "train.device=cpu",
        ],
    )
    return train(recipe, folder / "run", data=data).run_dir


def start_server(run: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """``sicot serve`` on 127.0.0.1, a free port; returns the process and its URL once it answers."""
    import httpx

    cmd = [
        sys.executable,
        "-m",
        "sicot_cli",
        "serve",
        "--run",
        str(run),
        "--port",
        "0",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--timeout",
        str(SERVER_TIMEOUT_S),
        "--max-upload-mb",
        "1",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "300"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:\d+", line)
    if not found:
        proc.kill()
        raise RuntimeError(f"sicot serve did not start: {line!r}")
    url = found.group(0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("sicot serve did not answer /healthz within 60 s")


def stop_server(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class RawClient:
    """One keep-alive HTTP/1.1 connection sending prebuilt requests: a load generator that costs a
    fraction of httpx's CPU, so on 2 cores the client does not become what is measured."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, data: bytes, timeout: float = 30.0) -> tuple[int, bytes]:
        """Send one request; the status and body of its answer (0 and b"" when the server closed)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(data)
            await self.writer.drain()
            head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            body = await self.reader.readexactly(int(length.group(1))) if length else b""
            if re.search(rb"(?i)connection: *close", head):
                self.close()
            return int(head.split(b" ", 2)[1]), body
        except (ConnectionError, asyncio.IncompleteReadError):
            self.close()
            return 0, b""

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def multipart_request(name: str, content: bytes, content_type: str, path: str = "/predict?k=1") -> bytes:
    boundary = b"sicotbenchboundary"
    body = (
        b"--"
        + boundary
        + b'\r\nContent-Disposition: form-data; name="image"; filename="'
        + name.encode()
        + b'"\r\nContent-Type: '
        + content_type.encode()
        + b"\r\n\r\n"
        + content
        + b"\r\n--"
        + boundary
        + b"--\r\n"
    )
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary.decode()}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


HOSTILE = ("garbage", "oversized", "slow", "non_image")
# A slow client announces 10 kB and sends 10 bytes: the server answers 408 at its deadline.
SLOW = b'POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 10000\r\n\r\n["aaaaaaa'


async def load(
    url: str,
    images: list[bytes],
    expected: list[tuple[str, float]],
    n: int,
    concurrency: int,
    max_seconds: float,
    hostile_every: int = 0,
) -> dict:
    """``n`` requests from ``concurrency`` keep-alive clients (stopped at ``max_seconds``); latencies of the good ones.

    ``hostile_every``: every k-th request is hostile (kinds in turn, each on a connection of its own); 0 = none.
    """
    good = [multipart_request(f"{j}.jpg", img, "image/jpeg") for j, img in enumerate(images)]
    bad = {
        "garbage": multipart_request("x.jpg", os.urandom(2000), "image/jpeg"),
        "oversized": multipart_request("big.jpg", b"\xff" * 2_000_000, "image/jpeg"),
        "non_image": multipart_request("a.txt", b"hello", "text/plain"),
        "slow": SLOW,
    }
    latencies: list[float] = []
    wrong: list[str] = []
    hostile: dict[str, dict[str, int]] = {k: {} for k in HOSTILE}
    counter = iter(range(n))
    t0 = time.perf_counter()
    deadline = t0 + max_seconds

    async def worker() -> None:
        client = RawClient(url)
        try:
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                if hostile_every and i % hostile_every == hostile_every - 1:
                    kind = HOSTILE[(i // hostile_every) % len(HOSTILE)]
                    other = RawClient(url)
                    status, _ = await other.request(bad[kind], SERVER_TIMEOUT_S + 10)
                    other.close()
                    hostile[kind][str(status or "closed")] = hostile[kind].get(str(status or "closed"), 0) + 1
                    continue
                j = i % len(images)
                s = time.perf_counter()
                status, body = await client.request(good[j])
                latencies.append(time.perf_counter() - s)
                if status != 200:
                    wrong.append(f"{i}: {status} {body[:80]!r}")
                    continue
                top = json.loads(body)["predictions"][0]["top"][0]
                if top["class"] != expected[j][0] or abs(top["score"] - expected[j][1]) > 1e-4:
                    wrong.append(f"{i}: {top} != {expected[j]}")
        finally:
            client.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return {"requests": len(latencies), "seconds": elapsed, "latencies": latencies, "wrong": wrong, "hostile": hostile}


def percentiles_ms(latencies: list[float]) -> dict[str, float]:
    a = np.asarray(latencies) * 1000
    return {f"p{q}_ms": round(float(np.percentile(a, q)), 1) for q in (50, 95, 99)} if len(a) else {}


def predict_reference(run: Path, images: list[Path], repeats: int) -> dict:
    """``sicot predict`` as a user runs it: a process per image, and one process for all images."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "sicot_cli", "predict", "--run", str(run), "--device", "cpu", "--json"]
    single = []
    for i in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([*base, str(images[i])], check=True, capture_output=True, env=env)
        single.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    subprocess.run([*base, *map(str, images)], check=True, capture_output=True, env=env)
    batch = time.perf_counter() - t0
    return {
        "one_image_per_call_ms": round(1000 * float(np.median(single)), 1),
        "one_image_per_call_per_s": round(1 / float(np.median(single)), 2),
        "all_images_one_call_ms_per_image": round(1000 * batch / len(images), 1),
        "images": len(images),
        "calls": repeats,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the tables and write the JSON results."""
    parser = benchmark_parser("serve", __doc__, quick="fewer requests (< 1 min on a 2-core CPU)")
    parser.add_argument("--run", type=Path, default=None, help="serve this run (default: one trained here, ~10 s)")
    parser.add_argument("--rounds", type=positive_int, default=None, help="interleaved rounds (default 2, quick 1)")
    parser.add_argument("--point-seconds", type=float, default=20.0, help="cut each measurement at this many seconds")
    parser.add_argument(
        "--memory-requests", type=int, default=None, help="requests of the memory run (default 10,000, quick 1,000)"
    )
    parser.add_argument(
        "--threads", type=positive_int, default=1, help="torch threads of this process (the servers use 1)"
    )
    args = parse(parser, argv)
    import torch

    torch.set_num_threads(args.threads)
    start()
    rounds = args.rounds or (1 if args.quick else 2)
    per_point = {1: 40, 8: 150, 32: 300} if args.quick else {1: 150, 8: 600, 32: 1200}
    memory_n = args.memory_requests or (1000 if args.quick else 10_000)
    hostile_n = 200 if args.quick else 1000
    console = Console()
    from sicot_cli.predict import predict

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        run = args.run or make_run(tmp_path)
        paths = make_images(tmp_path / "images")
        images = [p.read_bytes() for p in paths]
        expected = [(p.classes[0], p.scores[0]) for p in predict(run, paths, k=1, device="cpu")[0]]
        reference = predict_reference(run, paths, 1 if args.quick else 3)

        servers = {
            ON: start_server(run, "--max-batch", "32", "--max-wait-ms", "5"),
            OFF: start_server(run, "--max-batch", "1"),
        }
        points: dict[tuple[str, int], list[dict]] = {}
        try:
            for mode in servers:  # warm-up: first requests pay for lazy initialisation
                asyncio.run(load(servers[mode][1], images, expected, 64, 8, 30))
            for _ in range(rounds):
                for conc in (1, 8, 32):
                    for mode, (_, url) in servers.items():
                        points.setdefault((mode, conc), []).append(
                            asyncio.run(load(url, images, expected, per_point[conc], conc, args.point_seconds))
                        )
            batches = {}
            import httpx

            for mode, (_, url) in servers.items():
                h = httpx.get(f"{url}/healthz", timeout=5).json()
                batches[mode] = round(h["images"] / max(h["batches"], 1), 2)
        finally:
            exits = {mode: stop_server(proc) for mode, (proc, _) in servers.items()}

        rows = []
        for (mode, conc), runs in points.items():
            lat = [x for r in runs for x in r["latencies"]]
            done, secs = sum(r["requests"] for r in runs), sum(r["seconds"] for r in runs)
            rows.append(
                {
                    "mode": mode,
                    "concurrency": conc,
                    "requests": done,
                    "requests_per_s": round(done / secs, 1),
                    **percentiles_ms(lat),
                    "wrong": sum(len(r["wrong"]) for r in runs),
                    "wrong_examples": [w for r in runs for w in r["wrong"]][:3],
                }
            )
        by = {(r["mode"], r["concurrency"]): r for r in rows}
        on32, off32 = by[(ON, 32)], by[(OFF, 32)]
        ratio = on32["requests_per_s"] / off32["requests_per_s"]
        goal = {
            "ratio": round(ratio, 2),
            "p95_on_ms": on32["p95_ms"],
            "p95_off_ms": off32["p95_ms"],
            "met": bool(ratio >= GOAL and on32["p95_ms"] <= P95_SLACK * off32["p95_ms"]),
        }

        # memory: a fresh server, RSS after 100 requests and on to memory_n
        proc, url = start_server(run, "--max-batch", "32", "--max-wait-ms", "5")
        memory: list[dict] = []
        wrong_memory = 0
        try:
            done = 0
            for target in sorted({100, memory_n // 10, memory_n // 4, memory_n // 2, memory_n}):
                r = asyncio.run(load(url, images, expected, target - done, 8, 600))
                done += r["requests"]
                wrong_memory += len(r["wrong"])
                memory.append({"requests": done, "rss_mib": round(rss_mib(proc.pid), 1)})
            # hostile: 10 % of the requests, on the same server
            hostile = asyncio.run(load(url, images, expected, hostile_n, 8, 120, hostile_every=10))
        finally:
            exits["memory"] = stop_server(proc)
        growth = memory[-1]["rss_mib"] - memory[0]["rss_mib"]

    table = Table(
        "mode",
        "concurrency",
        "requests",
        "req/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "wrong",
        title=f"sicot serve on 127.0.0.1 (ResNet-18 32 px; {rounds} interleaved round(s))",
        title_justify="left",
    )
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["mode"])):
        table.add_row(
            r["mode"],
            str(r["concurrency"]),
            str(r["requests"]),
            f"{r['requests_per_s']:.1f}",
            f"{r.get('p50_ms', 0):.1f}",
            f"{r.get('p95_ms', 0):.1f}",
            f"{r.get('p99_ms', 0):.1f}",
            str(r["wrong"]),
        )
    console.print(table)
    console.print(f"mean images per forward pass: {batches}")
    console.print(
        f"sicot predict: {reference['one_image_per_call_ms']:.0f} ms per call with one image; {reference['all_images_one_call_ms_per_image']:.0f} ms per image with {reference['images']} in one call"
    )
    console.print(
        f"concurrency 32: batching on / off = {ratio:.2f}x requests/s (goal >= {GOAL}x), p95 {on32['p95_ms']} vs {off32['p95_ms']} ms: {'met' if goal['met'] else 'NOT MET'}"
    )
    console.print(
        f"memory (RSS MiB by requests served): {[(m['requests'], m['rss_mib']) for m in memory]}; growth {growth:+.1f} MiB; wrong answers {wrong_memory}"
    )
    good = len(hostile["latencies"])
    console.print(
        f"hostile 10 %: {hostile['hostile']}; good requests {good}, wrong or failed {len(hostile['wrong'])}, {percentiles_ms(hostile['latencies'])}"
    )
    console.print(f"server exit codes after SIGTERM: {exits}")
    payload = {
        "model": "resnet18 32 px 120 classes" if args.run is None else str(args.run),
        "images": "32 JPEG 320x240",
        "server_threads": 1,
        "rounds": rounds,
        "points": rows,
        "mean_batch": batches,
        "predict_reference": reference,
        "goal_batching_2x": goal,
        "memory": {"points": memory, "growth_mib": round(growth, 1), "wrong": wrong_memory},
        "hostile": {
            "every": 10,
            "requests": hostile_n,
            "statuses": hostile["hostile"],
            "good_answered": good,
            "good_wrong_or_failed": len(hostile["wrong"]),
            "good_all_correct": not hostile["wrong"],
            **percentiles_ms(hostile["latencies"]),
        },
        "server_exit_codes": exits,
    }
    path = write_results("serve", "cpu", payload)
    console.print(f"results: {path}")
    return payload


if __name__ == "__main__":
    from benchmarks.common import cli

    cli(main)
