"""The read side's benchmark rows (issue: list and download), each against a baseline in the run.

    .venv/bin/python bench/read_side.py [--seconds 8] [--concurrency 64] [--big-mib 1024]

  list   GET a system of 10 backups: bare aiohttp's GET of the same JSON, the gateway on
         local disk, the gateway on SeaweedFS beside aiobotocore alone doing the same
         ListObjectsV2 + 10 HeadObject, and an S3 delete for the CPU ratio
  big    one download of a --big-mib backup through a local link, beside nginx (sendfile
         on) serving the same file; the gateway's RSS sampled during the transfer
  many   64 concurrent downloads of a 10 MB backup, beside nginx

Needs wrk, curl and nginx (Debian packages). Prints a table and the ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench

LUA = bench.REPO / "bench" / "get.lua"


def wrk_script(
    script: Path, env: dict[str, str], port: int, c: int, seconds: float
) -> dict[str, Any]:
    """One wrk run of a script whose done() prints a WRKJSON line: its figures."""
    out = subprocess.run(
        ["wrk", "-t", "2", "-c", str(c), "-d", f"{max(1, round(seconds))}s", "--timeout", "30s",
         "-s", str(script), f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, env={**os.environ, **env}, check=True,
    ).stdout  # fmt: skip
    data = json.loads(next(ln for ln in out.splitlines() if ln.startswith("WRKJSON "))[8:])
    seconds_run = data["duration_us"] / 1e6
    return {
        "requests": data["requests"],
        "rps": data["requests"] / seconds_run,
        "non2xx": data["non2xx"] + data["socket_errors"],
        "p50_ms": data["p50_us"] / 1000,
        "p99_ms": data["p99_us"] / 1000,
        "mb_s": data["bytes"] / seconds_run / 1e6,
    }


def wrk_get(port: int, path: str, token: str, c: int, seconds: float) -> dict[str, Any]:
    return wrk_script(LUA, {"GET_PATH": path, "TOKEN": token}, port, c, seconds)


def row(name: str, result: dict[str, Any], cpu: bench.CpuReading | None = None) -> dict[str, Any]:
    return {"name": name, **result, **(cpu or {})}


def print_rows(rows: list[dict[str, Any]]) -> None:
    head = f"{'row':44} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'MB/s':>9}"
    print(head + f" {'CPU us/req':>11}")
    for r in rows:
        cpu = r.get("cpu_us_per_request")
        print(
            f"{r['name']:44} {r['rps']:9.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
            f"{r['non2xx']:8d} {r.get('mb_s', 0):9.1f} {'' if cpu is None else f'{cpu:11.0f}'}"
        )


class Gateway:
    def __init__(
        self, work: Path, storage: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> None:
        self.port = bench.free_port()
        self.config = bench.gateway_config(work, self.port, storage)
        if extra:
            import yaml

            data = yaml.safe_load(self.config.read_text())
            for key, value in extra.items():
                data[key] = {**data.get(key, {}), **value}
            data["storage"] = {**data["storage"], **extra.get("storage", {})}
            self.config.write_text(yaml.safe_dump(data))
        self.work = work

    def start(self) -> None:
        self.server = bench.Process(
            [str(bench.BIN / "backup-gateway"), "serve", "--config", str(self.config)],
            self.work / "gateway.log",
        )
        bench.wait_port(self.port, self.server.proc)
        bench.wait_ready(self.port, self.server.proc)
        self.token = bench.owner_token(self.config)

    def get_json(self, path: str) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())

    def loaded(
        self, name: str, path: str, c: int, seconds: float, token: str | None = None
    ) -> dict[str, Any]:
        meter = bench.CpuMeter.start(self.server.proc.pid)
        result = wrk_get(self.port, path, self.token if token is None else token, c, seconds)
        return row(name, result, meter.stop(result["requests"]))

    def stop(self) -> None:
        self.server.stop()


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def nginx(work: Path, root: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = bench.free_port()
    (work / "nginx").mkdir(exist_ok=True)
    conf = work / "nginx" / "nginx.conf"
    conf.write_text(
        f"""
user root;
worker_processes 1;
daemon off;
error_log {work}/nginx/error.log;
pid {work}/nginx/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  default_type application/octet-stream;
  client_body_temp_path {work}/nginx/body;
  proxy_temp_path {work}/nginx/proxy;
  fastcgi_temp_path {work}/nginx/fastcgi;
  uwsgi_temp_path {work}/nginx/uwsgi;
  scgi_temp_path {work}/nginx/scgi;
  server {{
    listen 127.0.0.1:{port};
    root {root};
  }}
}}
"""
    )
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work / "nginx")])
    bench.wait_port(port, proc)
    return proc, port


def curl_seconds(url: str) -> float:
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{time_total} %{http_code}", url],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert out[1] in ("200",), out
    return float(out[0])


def put_local_backup(root: Path, system_index: int, backup_id: str, size: int) -> None:
    folder = root / f"org_cust_{system_index:06d}" / f"SEED-{system_index:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / backup_id
    chunk = os.urandom(1 << 20)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        written = 0
        while written < size:
            part = chunk[: min(len(chunk), size - written)]
            f.write(part)
            digest.update(part)
            written += len(part)
    (folder / (backup_id + ".meta.json")).write_text(
        json.dumps(
            {
                "filename": "big.tar.gz",
                "sha256": digest.hexdigest(),
                "uploaded_at": "2026-12-01T00:00:00Z",
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--only", choices=["list", "big", "many"], action="append")
    args = parser.parse_args()
    only = set(args.only or ["list", "big", "many"])
    c, seconds = args.concurrency, args.seconds
    work = Path(tempfile.mkdtemp(prefix="gateway-read-bench-"))
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    list_path = "/api/systems/sys_000000/backups"
    try:
        if "list" in only:
            bare = bench.Process([bench.PY, str(bench.REPO / "bench" / "bare_app.py"),
                                  str(port := bench.free_port())], work / "bare.log")  # fmt: skip
            bench.wait_port(port, bare.proc)
            meter = bench.CpuMeter.start(bare.proc.pid)
            result = wrk_get(port, list_path, "", c, seconds)
            rows.append(
                row("a bare aiohttp GET (same JSON)", result, meter.stop(result["requests"]))
            )
            bare.stop()

            local = Gateway(
                work / "list-local",
                {"backend": "local", "local": {"root": str(work / "list-local" / "backups")}},
            )
            bench.seed(local.config, 1, 10, work / "ids-local.txt")
            local.start()
            assert local.get_json(list_path)["data"]["slots_used"] == 10
            rows.append(local.loaded("l gateway list, local (10 backups)", list_path, c, seconds))
            local.stop()

            weed = bench.seaweedfs()
            try:
                bench.make_bucket(weed.endpoint, "list")
                s3 = Gateway(work / "list-s3", bench.s3_storage(weed.endpoint, "list"))
                bench.seed(s3.config, 1, 10, work / "ids-s3.txt")
                s3.start()
                assert s3.get_json(list_path)["data"]["slots_used"] == 10
                rows.append(
                    s3.loaded("l gateway list, s3 [seaweedfs] (10 backups)", list_path, c, seconds)
                )
                s3.stop()
                out = subprocess.run(
                    [bench.PY, str(bench.REPO / "bench" / "raw_s3_list.py"), weed.endpoint, "list",
                     "org_cust_000000/SEED-000000/", str(c), str(seconds)],
                    capture_output=True, text=True, check=True,
                ).stdout  # fmt: skip
                raw = json.loads(
                    next(ln for ln in out.splitlines() if ln.startswith("RAWJSON "))[8:]
                )
                rows.append(row("c aiobotocore list+10 heads [seaweedfs]", raw))
                # an S3 delete in the same run, for "CPU per list <= 5x a delete's"
                bench.make_bucket(weed.endpoint, "del")
                storage = bench.s3_storage(weed.endpoint, "del")
                d = bench.row_gateway(
                    "d gateway s3 delete [seaweedfs]",
                    work / "del",
                    storage,
                    c,
                    seconds,
                    "wrk",
                    1,
                    50,
                    200,
                    lambda: bench.count_s3(weed.endpoint, "del"),
                )
                rows.append(
                    {
                        "name": d.name,
                        "rps": d.rps,
                        "p50_ms": d.p50_ms,
                        "p99_ms": d.p99_ms,
                        "non2xx": d.non2xx,
                        "cpu_us_per_request": d.cpu_us_per_request,
                    }
                )
            finally:
                weed.stop()

        if "big" in only or "many" in only:
            root = work / "dl" / "backups"
            big_id = "01934fab-bc33-7890-a1b2-c3d4e5f6a7b8.tar.gz"
            ten_id = "01934fab-bc33-7890-a1b2-c3d4e5f6a7b9.tar.gz"
            gw = Gateway(work / "dl", {"backend": "local", "local": {"root": str(root)}},
                         {"storage": {"download": {"ttl_seconds": 900}}})  # fmt: skip
            bench.seed(gw.config, 1, 1, work / "ids-dl.txt")  # the directory and the system
            if "big" in only:
                put_local_backup(root, 0, big_id, args.big_mib << 20)
            put_local_backup(root, 0, ten_id, 10 * 1000 * 1000)
            os.sync()
            gw.start()
            ng, ng_port = nginx(work, root)
            try:

                def link(bid: str) -> str:
                    answer = gw.get_json(f"/api/systems/sys_000000/backups/{bid}/download")
                    return str(answer["data"]["download_url"])

                if "big" in only:
                    url = f"http://127.0.0.1:{gw.port}{link(big_id)}"
                    ng_url = f"http://127.0.0.1:{ng_port}/org_cust_000000/SEED-000000/{big_id}"
                    curl_seconds(ng_url)  # page cache warm for both
                    pids = bench.process_tree(gw.server.proc.pid)
                    samples: list[int] = []
                    stop = threading.Event()

                    def sample() -> None:
                        while not stop.is_set():
                            samples.append(rss_kb(pids))
                            time.sleep(0.05)

                    before = rss_kb(pids)
                    gw_times, ng_times = [], []
                    for _ in range(3):
                        sampler = threading.Thread(target=sample)
                        sampler.start()
                        gw_times.append(curl_seconds(url))
                        stop.set()
                        sampler.join()
                        stop.clear()
                        ng_times.append(curl_seconds(ng_url))
                    size_mb = (args.big_mib << 20) / 1e6
                    gw_best, ng_best = min(gw_times), min(ng_times)
                    notes.append(
                        f"big: {args.big_mib} MiB, best of 3: gateway {size_mb / gw_best:.0f} MB/s "
                        f"({gw_best:.2f} s), nginx {size_mb / ng_best:.0f} MB/s ({ng_best:.2f} s): "
                        f"gateway/nginx = {ng_best / gw_best:.3f} (target >= 0.8); gateway RSS "
                        f"{before / 1024:.1f} MB before, {min(samples) / 1024:.1f}-"
                        f"{max(samples) / 1024:.1f} MB during ({len(samples)} samples; "
                        "target flat within 10 MB)"
                    )
                if "many" in only:
                    path = link(ten_id)
                    meter = bench.CpuMeter.start(gw.server.proc.pid)
                    result = wrk_get(gw.port, path, "", c, seconds)
                    rows.append(row(f"download 10 MB x {c} conns, gateway link", result,
                                    meter.stop(result["requests"])))  # fmt: skip
                    result = wrk_get(
                        ng_port, f"/org_cust_000000/SEED-000000/{ten_id}", "", c, seconds
                    )
                    rows.append(row(f"download 10 MB x {c} conns, nginx", result))
            finally:
                ng.terminate()
                ng.wait(10)
                gw.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_rows(rows)
    by = {r["name"]: r for r in rows}
    if "a bare aiohttp GET (same JSON)" in by:
        bare_row = by["a bare aiohttp GET (same JSON)"]
        local_row = by["l gateway list, local (10 backups)"]
        s3_row = by["l gateway list, s3 [seaweedfs] (10 backups)"]
        raw_row = by["c aiobotocore list+10 heads [seaweedfs]"]
        delete_row = by["d gateway s3 delete [seaweedfs]"]
        print(f"list local / bare = {local_row['rps'] / bare_row['rps']:.3f} (target >= 0.25)")
        print(f"list s3 / raw list+heads = {s3_row['rps'] / raw_row['rps']:.3f}")
        print(
            f"s3 CPU per list {s3_row['cpu_us_per_request']:.0f} us = "
            f"{s3_row['cpu_us_per_request'] / delete_row['cpu_us_per_request']:.2f} x a "
            f"delete's {delete_row['cpu_us_per_request']:.0f} (target <= 5)"
        )
    many = [r for r in rows if r["name"].startswith("download 10 MB")]
    if len(many) == 2:
        print(f"64 x 10 MB: gateway/nginx = {many[0]['rps'] / many[1]['rps']:.3f} in req/s")
    for note in notes:
        print(note)
    bad = [r["name"] for r in rows if r["non2xx"]]
    for name in bad:
        print("ERROR: non-2xx in", name)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
