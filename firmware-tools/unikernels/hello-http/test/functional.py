#!/usr/bin/env python3
"""Functional tests of the unikernel, run by the hub against each staged instance before
the release is signed (`[test] functional` in unifleet.toml). The hub sets UNIFLEET_URL
(http://GUEST:PORT), UNIFLEET_APP and UNIFLEET_VERSION; exit 0 passes the release."""
import os
import sys
import urllib.error
import urllib.request

URL = os.environ["UNIFLEET_URL"]
APP = os.environ["UNIFLEET_APP"]
VERSION = os.environ["UNIFLEET_VERSION"]


def get(path):
    try:
        with urllib.request.urlopen(URL + path, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def check(what, ok, detail):
    print(("ok   " if ok else "FAIL ") + what + ("" if ok else ": " + detail))
    return ok


status, body = get("/")
lines = dict(l.split(": ", 1) for l in body.splitlines() if ": " in l)
results = [
    check("GET / answers 200", status == 200, f"answered {status}"),
    check(f"GET / names app {APP}", lines.get("app") == APP, f"says {lines.get('app')!r}"),
    check(f"GET / names version {VERSION}", lines.get("version") == VERSION,
          f"says {lines.get('version')!r}"),
]
status, body = get("/health")
results.append(check("GET /health answers 200 ok", (status, body) == (200, "ok\n"),
                     f"answered {status} {body!r}"))
status, _ = get("/no-such-page")
results.append(check("GET /no-such-page answers 404", status == 404, f"answered {status}"))
status, body = get("/metrics")
results.append(check("GET /metrics counts requests", status == 200 and "requests_total" in body,
                     f"answered {status}"))
sys.exit(0 if all(results) else 1)
