"""Serving: the same chat requests from 16 concurrent clients against one at a time, through ``vllm2 serve``.

Starts ``python -m vllm2.cli serve --model MODEL`` in a subprocess on a free loopback port (default model: the
shipped shapes model ``data/shapes-model``), then sends ``--requests`` chat completions (greedy, images as data
URLs): one at a time, then from ``--clients`` threads at once, ``--repeats`` times alternately (the machine's load
drifts; the median round of each mode is reported); then stops the server with SIGTERM.

Requests: the demo prompts of ``data/samples/demo.json`` that answer with text, boxes, masks or keypoints
(describe, count, detect, segment, find, pose), cycled; their images come from the shapes validation world
(``data/shapes/val/images/scenes`` and ``figures``) when it is there, so most requests carry a different image, and
from the demo images otherwise. ``--with-diffusion`` adds the draw and edit prompts: their diffusion decoders cost
about the same per image batched or not, so they pull the ratio down.

Usage: ``OMP_NUM_THREADS=2 python benchmarks/serve.py [--requests 64 --clients 16]``. Prints one JSON object:
``throughput_ratio`` (requests/s concurrent over one at a time), ``tokens_per_s_ratio`` (completion tokens),
``answers_match`` (in every round, every answer, text and route outputs, equals the first one-at-a-time answer), p50/p95
latency of both modes, and the batch settings.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DIFFUSION = ("draw", "edit")


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def build_requests(n: int, with_diffusion: bool) -> list[dict[str, Any]]:
    """``n`` chat messages: the demo prompts cycled, each with its own image where the validation world has one."""
    items = [i for i in json.loads((ROOT / "data/samples/demo.json").read_text())
             if with_diffusion or i["task"] not in DIFFUSION]
    val = ROOT / "data/shapes/val/images"
    pools = {kind: sorted((val / kind).glob("*.png")) for kind in ("scenes", "figures")} if val.is_dir() else {}
    requests = []
    for k in range(n):
        item = items[k % len(items)]
        pool = pools.get("figures" if item["task"] == "pose" else "scenes", [])
        if item["image"] is None:
            content: Any = item["prompt"]
        else:
            image = pool[k % len(pool)] if pool and item["task"] != "edit" else ROOT / "data/samples" / item["image"]
            content = [{"type": "image_url", "image_url": {"url": _data_url(image)}},
                       {"type": "text", "text": item["prompt"]}]
        requests.append({"task": item["task"], "messages": [{"role": "user", "content": content}]})
    return requests


def start_server(model: str, port: int, max_batch: int, wait_ms: float, replicas: int = 1) -> subprocess.Popen:
    """``vllm2 serve`` in a subprocess; returns once ``/health`` answers."""
    command = [sys.executable, "-m", "vllm2.cli", "serve", "--model", model, "--port", str(port), "--model-name",
               "bench", "--max-batch", str(max_batch), "--batch-wait-ms", str(wait_ms), "--replicas", str(replicas)]
    server = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("the server did not start within 300 s")


def ask(client: httpx.Client, request: dict[str, Any], max_tokens: int) -> tuple[dict[str, Any], float]:
    """One chat completion and its latency in seconds."""
    start = time.perf_counter()
    reply = client.post("/v1/chat/completions", json={"model": "bench", "messages": request["messages"],
                                                      "max_tokens": max_tokens})
    reply.raise_for_status()
    return reply.json(), time.perf_counter() - start


def run(client: httpx.Client, requests: list[dict[str, Any]], clients: int, max_tokens: int) -> dict[str, Any]:
    """Answer every request with ``clients`` threads (1: one at a time); answers, latencies, wall time."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(lambda r: ask(client, r, max_tokens), requests))
    wall = time.perf_counter() - start
    answers = [a for a, _ in done]
    latencies = [s for _, s in done]
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    return {"answers": answers, "latencies": latencies, "wall_s": wall, "tokens": tokens}


def same_answer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal text and route outputs (numbers within 1e-3)."""
    (ca,), (cb,) = a["choices"], b["choices"]
    if ca["message"]["content"] != cb["message"]["content"]:
        return False
    oa, ob = ca["vllm2_outputs"], cb["vllm2_outputs"]
    if [o["route"] for o in oa] != [o["route"] for o in ob]:
        return False
    for x, y in zip(oa, ob):
        for key in ("boxes", "scores", "keypoints"):
            if key in x and (np.shape(x[key]) != np.shape(y[key]) or not np.allclose(x[key], y[key], atol=1e-3)):
                return False
        if x.get("masks") != y.get("masks") or x.get("image") != y.get("image"):
            return False
    return True


def _median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median wall time."""
    return sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]


def _percentiles(latencies: list[float]) -> dict[str, float]:
    return {"p50": round(float(np.percentile(latencies, 50)), 3), "p95": round(float(np.percentile(latencies, 95)), 3)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "data" / "shapes-model"))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--replicas", type=int, default=1, help="model processes of the server (vllm2 serve "
                        "--replicas); one answers the one-at-a-time requests")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (one at a time, concurrent); the median "
                        "round of each mode is reported")
    parser.add_argument("--with-diffusion", action="store_true", help="add the draw and edit prompts")
    args = parser.parse_args(argv)

    requests = build_requests(args.requests, args.with_diffusion)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = start_server(args.model, port, args.max_batch, args.batch_wait_ms, args.replicas)
    try:
        limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits) as client:
            run(client, requests[: min(4, len(requests))], 1, args.max_tokens)  # warm-up
            rounds = [(run(client, requests, 1, args.max_tokens), run(client, requests, args.clients,
                                                                        args.max_tokens)) for _ in range(args.repeats)]
    finally:
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(60)
    alone = _median_round([a for a, _ in rounds])
    together = _median_round([b for _, b in rounds])
    reference = rounds[0][0]["answers"]
    matches = [all(same_answer(ref, run_["answers"][k]) for pair in rounds for run_ in pair)
               for k, ref in enumerate(reference)]
    result = {
        "throughput_ratio": round(alone["wall_s"] / together["wall_s"], 2),
        "tokens_per_s_ratio": round((together["tokens"] / together["wall_s"]) / (alone["tokens"] / alone["wall_s"]), 2),
        "answers_match": all(matches),
        "matching_answers": sum(matches),
        "requests": len(requests),
        "clients": args.clients,
        "requests_per_s": {"one_at_a_time": round(len(requests) / alone["wall_s"], 2),
                           "concurrent": round(len(requests) / together["wall_s"], 2)},
        "tokens_per_s": {"one_at_a_time": round(alone["tokens"] / alone["wall_s"], 1),
                         "concurrent": round(together["tokens"] / together["wall_s"], 1)},
        "latency_s": {"one_at_a_time": _percentiles(alone["latencies"]),
                      "concurrent": _percentiles(together["latencies"])},
        "tasks": sorted({r["task"] for r in requests}),
        "repeats": args.repeats,
        "max_batch": args.max_batch,
        "batch_wait_ms": args.batch_wait_ms,
        "replicas": args.replicas,
        "model": args.model,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "server_exit_code": exit_code,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
