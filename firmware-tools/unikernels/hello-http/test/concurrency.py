#!/usr/bin/env python3
"""N clients, each on its own keep-alive connection, all connected at once (a barrier),
then each sends R requests over that one connection and checks every response.

usage: concurrency.py HOST [PORT] [--clients N] [--requests R] [--timeout S]
Exits 0 only if every response was right; bounded in time by --timeout per socket call.
"""
import argparse
import http.client
import sys
import threading
import time

PATHS = ["/", "/health", "/metrics", "/nope"]
EXPECT = {"/": 200, "/health": 200, "/metrics": 200, "/nope": 404}


def client(args, barrier, results, i):
    try:
        conn = http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
        conn.connect()
        barrier.wait(timeout=args.timeout)
        for r in range(args.requests):
            path = PATHS[(i + r) % len(PATHS)]
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != EXPECT[path]:
                raise RuntimeError(f"{path}: status {resp.status}")
            if int(resp.getheader("Content-Length")) != len(body):
                raise RuntimeError(f"{path}: Content-Length mismatch")
            if path == "/health" and body != b"ok\n":
                raise RuntimeError(f"/health body {body!r}")
            if resp.will_close:
                raise RuntimeError(f"{path}: server closed a keep-alive connection")
        conn.close()
        results[i] = None
    except Exception as e:  # noqa: BLE001 - reported per client
        results[i] = repr(e)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", nargs="?", type=int, default=80)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--timeout", type=float, default=20)
    args = p.parse_args()
    barrier = threading.Barrier(args.clients)
    results = ["not run"] * args.clients
    threads = [threading.Thread(target=client, args=(args, barrier, results, i)) for i in range(args.clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - start
    failed = [(i, r) for i, r in enumerate(results) if r is not None]
    total = args.clients * args.requests
    print(f"{args.clients} concurrent keep-alive clients x {args.requests} requests: "
          f"{total - sum(args.requests for _ in failed)} ok in {took:.2f}s")
    for i, r in failed[:10]:
        print(f"client {i}: {r}")
    print(f"{args.clients - len(failed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
