#!/usr/bin/env bash
# Builds (or removes) a small internet of homes in network namespaces, for the home-network
# tests (tests/tests/homes.rs) and for trying a fleet behind NAT by hand:
#
#   internet  PREFIXi: a bridge, 198.51.100.0/24 (TEST-NET-2: never routed anywhere real)
#   hub       PREFIXhub: 198.51.100.1
#   home a    PREFIXra: router, WAN 198.51.100.10, LAN 192.168.1.1/24, cone NAT (masquerade)
#   home b    PREFIXrb: router, WAN 198.51.100.20, symmetric NAT (masquerade random)
#   home c    PREFIXrc: router, WAN 198.51.100.30, cone NAT
#   devices   PREFIXa1 … : 192.168.1.11, .12, … on their home's LAN (every home uses the
#             same LAN range, as real homes do)
#
# Each router drops new connections from the WAN, to its LAN or to itself (only replies and
# hole punches pass; silently, as home routers do: a reset would end a punch before the
# other side's packet went out) and caps its uplink with tbf. Usage:
#
#   scripts/netns.sh up PREFIX [DEVICES_PER_HOME] [UPLINK_RATE]   (defaults 2, 20mbit)
#   scripts/netns.sh down PREFIX
#   scripts/netns.sh cut PREFIX HOME                               (HOME's router refuses the hub)
#   ip netns exec PREFIXa1 CMD…                                    (run a device in home a)
#
# PREFIX: a few letters and digits (namespace names are PREFIX + up to 3 characters).
# Needs root (CAP_NET_ADMIN) and nftables. `down` removes everything `up` made, and is
# safe to run when part (or none) of it exists.
set -euo pipefail

usage() { echo "usage: $0 up PREFIX [DEVICES_PER_HOME] [UPLINK_RATE] | down PREFIX | cut PREFIX HOME" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1 p=$2
per_home=${3:-2}
rate=${4:-20mbit}
homes=(a b c)

down() {
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^${p}(i|hub|r[abc]|[abc][0-9]+)$" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
}

nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

up() {
  if ! command -v nft >/dev/null; then
    echo "netns.sh: nft not found: apt-get install nftables (scripts/setup.sh does)" >&2
    exit 1
  fi
  down
  ip netns add "${p}i"
  nsx "${p}i" ip link set lo up
  nsx "${p}i" ip link add name br0 type bridge
  nsx "${p}i" ip link set br0 up

  ip netns add "${p}hub"
  nsx "${p}hub" ip link set lo up
  ip -n "${p}i" link add name hub type veth peer name eth0 netns "${p}hub"
  ip -n "${p}i" link set hub master br0 up
  nsx "${p}hub" ip addr add 198.51.100.1/24 dev eth0
  nsx "${p}hub" ip link set eth0 up

  local n=1
  for h in "${homes[@]}"; do
    local r="${p}r$h" wan="198.51.100.$((n * 10))"
    ip netns add "$r"
    nsx "$r" ip link set lo up
    ip -n "${p}i" link add name "r$h" type veth peer name wan netns "$r"
    ip -n "${p}i" link set "r$h" master br0 up
    nsx "$r" ip addr add "$wan/24" dev wan
    nsx "$r" ip link set wan up
    nsx "$r" ip link add name lan type bridge
    nsx "$r" ip addr add 192.168.1.1/24 dev lan
    nsx "$r" ip link set lan up
    nsx "$r" sysctl -qw net.ipv4.ip_forward=1
    local nat="masquerade"
    [ "$h" = b ] && nat="masquerade random"
    nsx "$r" nft -f - <<EOF
table ip nat {
  chain postrouting { type nat hook postrouting priority srcnat; oifname "wan" $nat; }
}
table inet filter {
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname "wan" ct state new drop
  }
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "wan" ct state new drop
  }
}
EOF
    nsx "$r" tc qdisc add dev wan root tbf rate "$rate" burst 64kb latency 100ms
    for k in $(seq 1 "$per_home"); do
      local d="${p}$h$k"
      ip netns add "$d"
      nsx "$d" ip link set lo up
      ip -n "$r" link add name "$h$k" type veth peer name eth0 netns "$d"
      ip -n "$r" link set "$h$k" master lan up
      nsx "$d" ip addr add "192.168.1.$((10 + k))/24" dev eth0
      nsx "$d" ip link set eth0 up
      nsx "$d" ip route add default via 192.168.1.1
    done
    n=$((n + 1))
  done
}

# The hub is gone for one home (its uplink to the hub fails; other homes still reach it):
# connections to the hub are reset and new ones refused, as a dead hub's host would.
cut() {
  local h=${1:?cut needs a home: a, b or c}
  nsx "${p}r$h" nft -f - <<EOF
table inet cut {
  chain forward {
    type filter hook forward priority filter - 10; policy accept;
    ip daddr 198.51.100.1 meta l4proto tcp reject with tcp reset
    ip daddr 198.51.100.1 reject
    ip saddr 198.51.100.1 drop
  }
}
EOF
}

case $cmd in
  up) up ;;
  down) down ;;
  cut) cut "${3:-}" ;;
  *) usage ;;
esac
