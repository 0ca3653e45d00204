#!/usr/bin/env python3
"""Starts a VM command, echoes its console, and reports the time from start to the
unikernel's `listening on ADDR:PORT` line (or to `unikernel: ...` errors). Then either
stops the VM (default) or keeps it running for --hold seconds so tests can use it.

usage: boot_time.py [--timeout S] [--hold S] -- qemu-system-... args
Prints `boot-to-listening: X.XXXs ADDR:PORT` and exits 0, or exits 1 on timeout/error.
"""
import argparse
import os
import re
import select
import subprocess
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--hold", type=float, default=0)
    p.add_argument("--expect", default=r"listening on (\S+)")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    start = time.monotonic()
    vm = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    result = 1
    try:
        deadline = start + args.timeout
        pending = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([vm.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                continue
            chunk = os.read(vm.stdout.fileno(), 4096)
            if not chunk:
                break  # the VM exited
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").rstrip()
                print(f"[{time.monotonic() - start:7.3f}] {text}", flush=True)
                m = re.search(args.expect, text)
                if m and result:
                    print(f"boot-to-match: {time.monotonic() - start:.3f}s {m.group(0)}", flush=True)
                    result = 0
                    # Keep echoing the console while the VM is held for tests.
                    deadline = time.monotonic() + args.hold
    finally:
        vm.terminate()
        try:
            vm.wait(timeout=5)
        except subprocess.TimeoutExpired:
            vm.kill()
    sys.exit(result)


if __name__ == "__main__":
    main()
