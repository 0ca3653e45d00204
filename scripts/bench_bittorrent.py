#!/usr/bin/python3
"""A real BitTorrent swarm as the fleet benchmark's baseline (`bench_fleet --modes bittorrent`).

One seeder (the hub) and N leechers (the devices), each its own libtorrent 2.0 session in
this process, on 127.0.0.1 with an opentracker; TCP only (no uTP, DHT, LSD, UPnP or
NAT-PMP; peer exchange, a default plugin, stays on), and every peer in libtorrent's global, rate-limited peer class: libtorrent exempts
local peers from its rate limits, so without that the caps would not hold on loopback.
The same image and caps as the mesh: the seeder uploads at --hub-up, each leecher at
--device-up and downloads at --device-down. 64 KiB pieces (the chunker's average).

Prints one JSON object: each leecher's completion (seconds from the moment the torrent
was added to every session, as the hub's announcement), the seeder's payload upload, the
BitTorrent messages the peers sent, the connections they opened, and the CPU seconds of this process and the tracker.
"""

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import libtorrent as lt

PIECE = 64 * 1024


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_of(pid):
    """User + system CPU seconds of a live process (/proc/PID/stat), 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / 100.0
    except (OSError, IndexError, ValueError):
        return 0.0


def session(up, down):
    settings = {
        "listen_interfaces": "127.0.0.1:0",
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "enable_outgoing_utp": False,
        "enable_incoming_utp": False,
        "enable_outgoing_tcp": True,
        "enable_incoming_tcp": True,
        # Every peer is 127.0.0.1.
        "allow_multiple_connections_per_ip": True,
        "upload_rate_limit": up,
        "download_rate_limit": down,
        "alert_mask": lt.alert.category_t.stats_notification,
        "aio_threads": 1,
        "hashing_threads": 1,
        "announce_ip": "127.0.0.1",
    }
    s = lt.session(settings)
    # Loopback peers would be in the local peer class (no rate limit): all global.
    f = lt.ip_filter()
    f.add_rule("0.0.0.0", "255.255.255.255", 1 << lt.session.global_peer_class_id)
    s.set_peer_class_filter(f)
    return s


def counters(ses):
    """The session's counters by name (one session_stats_alert)."""
    ses.post_session_stats()
    deadline = time.time() + 10
    while time.time() < deadline:
        ses.wait_for_alert(500)
        for a in ses.pop_alerts():
            if isinstance(a, lt.session_stats_alert):
                return a.values
    return {}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", required=True, help="the file to spread")
    ap.add_argument("--peers", type=int, required=True, help="leechers (devices)")
    ap.add_argument("--device-up", type=int, required=True, help="bytes per second")
    ap.add_argument("--device-down", type=int, required=True, help="bytes per second")
    ap.add_argument("--hub-up", type=int, required=True, help="the seeder's, bytes per second")
    ap.add_argument("--dir", required=True, help="where each leecher stores its copy")
    ap.add_argument("--limit", type=float, default=600, help="give up after this many seconds")
    a = ap.parse_args()

    port = free_port()
    fs = lt.file_storage()
    lt.add_files(fs, a.image)
    t = lt.create_torrent(fs, PIECE, flags=lt.create_torrent.v1_only)
    t.add_tracker(f"http://127.0.0.1:{port}/announce")
    lt.set_piece_hashes(t, os.path.dirname(os.path.abspath(a.image)))
    info = lt.torrent_info(t.generate())
    # Debian's opentracker serves whitelisted torrents only.
    os.makedirs(a.dir, exist_ok=True)
    whitelist = os.path.join(a.dir, "whitelist")
    with open(whitelist, "w") as f:
        f.write(f"{info.info_hash()}\n")
    os.chmod(a.dir, 0o755)
    os.chmod(whitelist, 0o644)
    tracker = subprocess.Popen(
        ["opentracker", "-i", "127.0.0.1", "-p", str(port), "-P", str(port)]
        # The tracker chroots into --dir first: the list is named from there.
        + ["-d", a.dir, "-w", "whitelist"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        return run(a, info, tracker)
    finally:
        tracker.send_signal(signal.SIGTERM)
        tracker.wait()


def run(a, info, tracker):
    seeder = session(a.hub_up, 0)
    seed = seeder.add_torrent(
        {"ti": info, "save_path": os.path.dirname(os.path.abspath(a.image))}
    )
    deadline = time.time() + 60
    while not seed.status().is_seeding:
        if time.time() > deadline:
            sys.exit("the seeder never finished checking the image")
        time.sleep(0.05)

    leechers = [session(a.device_up, a.device_down) for _ in range(a.peers)]
    handles = []
    t0 = time.time()
    for i, s in enumerate(leechers):
        path = os.path.join(a.dir, f"bt{i}")
        os.makedirs(path, exist_ok=True)
        handles.append(s.add_torrent({"ti": info, "save_path": path}))
    done = [None] * a.peers
    while None in done:
        now = time.time()
        if now - t0 > a.limit:
            sys.exit(f"{done.count(None)} of {a.peers} peers not done after {a.limit} s")
        for i, h in enumerate(handles):
            if done[i] is None and h.status().is_seeding:
                done[i] = now - t0
        time.sleep(0.05)

    messages = connections = 0
    # The seeder's payload sent, from its live counters (a torrent's status is updated
    # once a second, and a short run ends before that).
    seeder_upload = counters(seeder).get("net.sent_payload_bytes", 0)
    for s in leechers + [seeder]:
        c = counters(s)
        messages += sum(v for k, v in c.items() if k.startswith("ses.num_outgoing_"))
        # Each connection is accepted by exactly one side.
        connections += c.get("peer.incoming_connections", 0)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "completion": done,
                "seeder_upload": seeder_upload,
                "size": info.total_size(),
                "messages": messages,
                "connections": connections,
                "cpu_s": usage.ru_utime + usage.ru_stime + cpu_of(tracker.pid),
            }
        )
    )
    for p in range(a.peers):
        shutil.rmtree(os.path.join(a.dir, f"bt{p}"), ignore_errors=True)


if __name__ == "__main__":
    main()
