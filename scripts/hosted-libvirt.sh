#!/usr/bin/env bash
# A hosted libvirt host for bursting tests: "another machine" in a network namespace with a
# mount namespace of its own, running its own virtlogd and libvirtd (own sockets, state,
# config and images, all in DIR; the system libvirtd at /run/libvirt is left alone), which
# listens on libvirt's TLS transport (16514). The root namespace reaches it over a routed
# veth link on TEST-NET-3 addresses, all in 203.0.113.192/26 (kept free for it):
#
#   link           root side 203.0.113.193/30, hosted host 203.0.113.194/30
#   guest network  a bridge in the hosted namespace, 203.0.113.225/27, libvirt network
#                  `unifleet` over it (forward mode bridge: no DHCP, no DNS, no firewall
#                  rules); guests take static addresses (`ip=203.0.113.226/27
#                  gw=203.0.113.225`); the hosted namespace forwards (ip_forward=1 there)
#   root ns        one route, 203.0.113.224/27 via 203.0.113.194; nothing else changes
#   storage        pool `unifleet` (dir, DIR/images)
#   TLS            a CA, a server certificate for IP 203.0.113.194, client certificates in
#                  pkipath layout: DIR/client (good) and DIR/wrong-client (certificate and
#                  cacert.pem of another CA: the handshake fails); made once, kept
#
#   scripts/hosted-libvirt.sh up DIR             bring it up; prints a [hosted] table
#                                                (the device's settings) on stdout
#   scripts/hosted-libvirt.sh down DIR           destroy its domains, stop everything, remove
#                                                the link, route and namespace (idempotent)
#   scripts/hosted-libvirt.sh link DIR down|up   take the hosted host's side of the link down
#                                                (connects from the root ns fail: no route to
#                                                host) or up again (routes put back)
#   scripts/hosted-libvirt.sh restart DIR        stop the hosted libvirtd (SIGTERM) and start
#                                                it again in the same namespaces: running
#                                                domains survive and are re-attached (waits
#                                                for TLS unless the link is down)
#   scripts/hosted-libvirt.sh exec DIR CMD...    run CMD in the hosted host's namespaces
#
# From the root namespace:
#   virsh -c 'qemu+tls://203.0.113.194/system?pkipath=DIR/client' list
# Administration without TLS (also while the link is down):
#   virsh -c 'qemu+unix:///system?socket=DIR/run/libvirt-sock' list
#
# A holder process (`sleep infinity`, pid in DIR/holder.pid) keeps the namespaces; both
# daemons run in them (pid files DIR/virtlogd.pid, DIR/libvirtd.pid, logs in DIR/log). The
# namespace is named ufh-TAG and the root side of the link is ufh-TAG, TAG a hash of DIR's
# path; the addresses are fixed, so `up` refuses while something else holds them (and
# first cleans up what a killed run of the same DIR left). Needs root. DIR must not be
# under /run or libvirt's own directories (they are mounted over in the namespace).
set -euo pipefail

ROOT_ADDR=203.0.113.193
HOST_ADDR=203.0.113.194
LINK_PREFIX=30
GUEST_NET=203.0.113.224/27
GUEST_GW=203.0.113.225
GUEST_PREFIX=27
GUEST_RANGE="203.0.113.226-203.0.113.238/27 via $GUEST_GW"
SLICE=203.0.113.192/26
UPLINK=uplink   # the hosted host's side of the link
BRIDGE=unifleet0
NAME=unifleet   # libvirt network and storage pool

usage() {
  cat >&2 <<EOF
usage: $0 up DIR | down DIR | link DIR down|up | restart DIR | exec DIR CMD...

  up       start the hosted host (namespace, link, libvirtd on TLS, network, pool) and
           print the device's [hosted] settings on stdout
  down     stop it and remove everything up made (idempotent)
  link     take the link down (hosted host unreachable) or up
  restart  restart the hosted libvirtd in the same namespaces (domains keep running)
  exec     run a command in the hosted host's namespaces
EOF
  exit "${1:-2}"
}

say() { echo "hosted-libvirt: $*" >&2; }
die() { say "$*"; exit 1; }

cmd="${1:-}"
case "$cmd" in
  -h|--help|help) usage 0 ;;
  "") usage ;;
esac
[ $# -ge 2 ] || usage
if [ "$(id -u)" -ne 0 ]; then
  die "run as root (it makes network and mount namespaces)"
fi
dir=$(realpath -m -- "$2")
shift 2
case "$dir/" in
  /run/*|/var/run/*|/etc/libvirt/*|/var/lib/libvirt/*|/var/cache/libvirt/*|/var/log/libvirt/*)
    die "DIR $dir is hidden inside the namespace (under /run or libvirt's directories): pick another" ;;
esac
tag=$(printf '%s' "$dir" | sha256sum | cut -c1-8)
ns="ufh-$tag"
veth="ufh-$tag"
local_uri="qemu+unix:///system?socket=$dir/run/libvirt-sock"
tls_uri="qemu+tls://$HOST_ADDR/system?pkipath=$dir/client"

ns_exists() { [ -e "/run/netns/$ns" ]; }

# The pid in FILE if that process is alive and its command line contains WORD.
live_pid() {
  local file=$1 word=$2 pid
  [ -f "$file" ] || return 1
  pid=$(cat "$file" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$word" || return 1
  echo "$pid"
}

holder() { live_pid "$dir/holder.pid" hosted-libvirt-holder; }

# Runs a command in the hosted host's network and mount namespaces.
nsx() {
  local h
  h=$(holder) || die "the hosted host is not up (no holder process; run: $0 up $dir)"
  nsenter -t "$h" -m -n -- "$@"
}

# Waits until `virsh -c URI version` answers, at most SECONDS.
wait_for() {
  local uri=$1 deadline=$((SECONDS + $2))
  while [ "$SECONDS" -lt "$deadline" ]; do
    # A daemon still starting (probing QEMU: ~8 s) answers late: no short timeout.
    timeout "$((deadline - SECONDS + 1))" virsh -c "$uri" version >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  virsh -c "$uri" version >/dev/null
}

start_libvirtd() {
  nsx libvirtd -d --listen -p "$dir/libvirtd.pid" </dev/null >&2
  wait_for "$local_uri" 60 || die "libvirtd did not come up (see $dir/log/libvirtd.log)"
}

# TERM, then (after SECS) KILL, the processes given; waits until they are gone.
stop_pids() {
  local secs=$1 i p left
  shift
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  for ((i = 0; i < secs * 10; i++)); do
    left=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && left=1; done
    [ "$left" = 0 ] && return 0
    sleep 0.1
  done
  kill -KILL "$@" 2>/dev/null || true
  sleep 0.2
}

# ---- certificates -----------------------------------------------------------------------

# sign NAME SUBJECT EXTENSIONS CA_NAME: DIR/pki/NAME-{key,cert}.pem, signed by CA_NAME's
# key (CA_NAME = NAME: self-signed).
sign() {
  local name=$1 subj=$2 ext=$3 ca=$4 p="$dir/pki"
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$p/$name-key.pem" 2>/dev/null
  openssl req -new -key "$p/$name-key.pem" -subj "$subj" -out "$p/$name.csr"
  printf '%s\n' "$ext" | tr ';' '\n' > "$p/$name.ext"
  if [ "$ca" = "$name" ]; then
    openssl x509 -req -in "$p/$name.csr" -signkey "$p/$name-key.pem" -days 3650 \
      -set_serial "0x$(openssl rand -hex 8)" -extfile "$p/$name.ext" -out "$p/$name-cert.pem" 2>/dev/null
  else
    openssl x509 -req -in "$p/$name.csr" -CA "$p/$ca-cert.pem" -CAkey "$p/$ca-key.pem" -days 3650 \
      -set_serial "0x$(openssl rand -hex 8)" -extfile "$p/$name.ext" -out "$p/$name-cert.pem" 2>/dev/null
  fi
  rm -f "$p/$name.csr" "$p/$name.ext"
  chmod 0600 "$p/$name-key.pem"
}

make_pki() {
  local p="$dir/pki"
  if [ -f "$p/server-cert.pem" ] && [ -f "$dir/client/clientkey.pem" ] && [ -f "$dir/wrong-client/clientkey.pem" ]; then
    return 0
  fi
  say "making certificates in $p"
  rm -rf "$p" "$dir/client" "$dir/wrong-client"
  mkdir -p "$p" "$dir/client" "$dir/wrong-client"
  chmod 0700 "$p"
  local ca_ext="basicConstraints=critical,CA:TRUE;keyUsage=critical,keyCertSign,cRLSign;subjectKeyIdentifier=hash"
  local leaf="basicConstraints=critical,CA:FALSE;keyUsage=critical,digitalSignature,keyEncipherment;subjectKeyIdentifier=hash;authorityKeyIdentifier=keyid"
  sign ca "/O=unifleet/CN=unifleet hosted test CA" "$ca_ext" ca
  sign server "/O=unifleet/CN=$HOST_ADDR" "$leaf;extendedKeyUsage=serverAuth;subjectAltName=IP:$HOST_ADDR" ca
  sign client "/O=unifleet/CN=unifleet device" "$leaf;extendedKeyUsage=clientAuth" ca
  sign other-ca "/O=elsewhere/CN=another CA" "$ca_ext" other-ca
  sign wrong-client "/O=elsewhere/CN=unifleet device" "$leaf;extendedKeyUsage=clientAuth" other-ca
  # libvirt's pkipath layout. wrong-client is a consistent set from another CA (a device
  # holding another host's credentials): it passes libvirt's own check of the client's
  # files, and the TLS handshake with the hosted host fails (each side rejects the other).
  # (With the right CA's cacert.pem beside that certificate instead, libvirt would refuse
  # locally before connecting: "Our own certificate ... failed validation against ...".)
  cp "$p/ca-cert.pem" "$dir/client/cacert.pem"
  cp "$p/client-cert.pem" "$dir/client/clientcert.pem"
  cp "$p/client-key.pem" "$dir/client/clientkey.pem"
  cp "$p/other-ca-cert.pem" "$dir/wrong-client/cacert.pem"
  cp "$p/wrong-client-cert.pem" "$dir/wrong-client/clientcert.pem"
  cp "$p/wrong-client-key.pem" "$dir/wrong-client/clientkey.pem"
  chmod 0600 "$dir/client/clientkey.pem" "$dir/wrong-client/clientkey.pem"
  # The client directories belong to whoever owns DIR (the device may not run as root).
  chown -R --reference="$dir" "$dir/client" "$dir/wrong-client"
}

# ---- commands ---------------------------------------------------------------------------

down() {
  local pids=() p h
  if [ -S "$dir/run/libvirt-sock" ] && live_pid "$dir/libvirtd.pid" libvirtd >/dev/null; then
    for d in $(timeout 10 virsh -q -c "$local_uri" list --all --name 2>/dev/null || true); do
      timeout 20 virsh -q -c "$local_uri" destroy "$d" >/dev/null 2>&1 || true
      timeout 10 virsh -q -c "$local_uri" undefine "$d" >/dev/null 2>&1 || true
    done
  fi
  for p in "libvirtd.pid libvirtd" "virtlogd.pid virtlogd" "holder.pid hosted-libvirt-holder"; do
    set -- $p
    h=$(live_pid "$dir/$1" "$2") && pids+=("$h")
  done
  stop_pids 15 "${pids[@]}"
  if ns_exists; then
    # Whatever else runs in the namespace (QEMU left by a killed run).
    mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null || true)
    stop_pids 5 "${pids[@]}"
    ip netns del "$ns" 2>/dev/null || true
  fi
  ip link show "$veth" >/dev/null 2>&1 && ip link del "$veth" 2>/dev/null || true
  ip route show root "$GUEST_NET" | grep -q "dev $veth" && ip route del "$GUEST_NET" 2>/dev/null || true
  rm -f "$dir"/{holder,libvirtd,virtlogd}.pid
  [ -d "$dir/run" ] && find "$dir/run" -mindepth 1 -delete 2>/dev/null || true
  return 0
}

up() {
  local t0=$SECONDS h i
  for c in libvirtd virtlogd virsh openssl ip nsenter unshare setsid; do
    command -v "$c" >/dev/null || die "$c not found (scripts/setup.sh installs libvirt)"
  done
  if ns_exists || ip link show "$veth" >/dev/null 2>&1 || holder >/dev/null; then
    say "cleaning up what an earlier run for $dir left"
    down
  fi
  # The addresses are fixed: refuse while anything else uses the slice.
  local taken
  taken=$( (ip -o addr show to "$SLICE" 2>/dev/null; ip route show root "$SLICE" 2>/dev/null;
          ip route show match "$HOST_ADDR" 2>/dev/null | grep -v "^default" || true) | sort -u)
  if [ -n "$taken" ]; then
    say "$SLICE is in use in the root namespace (another hosted host? a test's guest network?):"
    echo "$taken" >&2
    ip netns list | grep -o '^ufh-[0-9a-f]*' | sed 's/^/  namespace: /' >&2 || true
    exit 1
  fi

  mkdir -p "$dir"
  up_ok=0
  trap '[ "$up_ok" = 1 ] || { say "up failed; cleaning up"; down; }' EXIT

  make_pki

  # The daemons' files: fresh config and state, kept capabilities cache and images.
  rm -rf "$dir"/{etc,run,lib,log}
  mkdir -p "$dir"/{etc,run,lib,cache,log,images}
  # A copy of the system daemon's QEMU capabilities cache spares the first start's probe
  # of every QEMU binary (~12 s); libvirtd checks it (binaries, kernel, CPU) and re-probes
  # if it does not fit.
  local caps=/var/cache/libvirt/qemu/capabilities f
  if [ -d "$caps" ] && [ ! -d "$dir/cache/qemu/capabilities" ]; then
    mkdir -p "$dir/cache/qemu"
    cp -a "$caps" "$dir/cache/qemu/"
  fi
  for f in /etc/libvirt/*.conf; do [ -f "$f" ] && cp -a "$f" "$dir/etc/"; done
  [ -d /etc/libvirt/nwfilter ] && cp -a /etc/libvirt/nwfilter "$dir/etc/"
  # QEMU as root, as scripts/setup.sh sets up the system daemon.
  touch "$dir/etc/qemu.conf"
  grep -qs '^user = "root"' "$dir/etc/qemu.conf" ||
    printf '\n# hosted-libvirt: QEMU as root, as scripts/setup.sh sets up\nuser = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\nsecurity_driver = "none"\n' >> "$dir/etc/qemu.conf"
  cat > "$dir/etc/libvirtd.conf" <<EOF
# hosted-libvirt: TLS on 16514 with client certificates, no TCP; local socket for root
listen_tls = 1
listen_tcp = 0
tls_port = "16514"
auth_tls = "none"
tls_no_verify_certificate = 0
ca_file = "$dir/pki/ca-cert.pem"
cert_file = "$dir/pki/server-cert.pem"
key_file = "$dir/pki/server-key.pem"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF

  # The network: the link, the guests' bridge, the route.
  say "namespace $ns, link $veth $ROOT_ADDR/$LINK_PREFIX <-> $UPLINK $HOST_ADDR/$LINK_PREFIX"
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip link add "$veth" type veth peer name "$UPLINK" netns "$ns"
  ip addr add "$ROOT_ADDR/$LINK_PREFIX" dev "$veth"
  ip link set "$veth" up
  ip -n "$ns" addr add "$HOST_ADDR/$LINK_PREFIX" dev "$UPLINK"
  ip -n "$ns" link set "$UPLINK" up
  ip -n "$ns" route add default via "$ROOT_ADDR"
  ip -n "$ns" link add "$BRIDGE" type bridge stp_state 0 forward_delay 0
  ip -n "$ns" addr add "$GUEST_GW/$GUEST_PREFIX" dev "$BRIDGE"
  ip -n "$ns" link set "$BRIDGE" up
  ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
  ip route add "$GUEST_NET" via "$HOST_ADDR" dev "$veth"

  # The mount namespace, kept by a holder; a tmpfs on /run hides the system daemon's
  # sockets and pid files (and dbus, systemd, udev: the hosted daemon finds none).
  rm -f "$dir/holder.pid"
  setsid ip netns exec "$ns" unshare --mount --propagation private bash -c '
    set -e
    dir="$1"
    mount -t tmpfs tmpfs /run
    mkdir -p /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt
    mount --bind "$dir/run" /run/libvirt
    mount --bind "$dir/etc" /etc/libvirt
    mount --bind "$dir/lib" /var/lib/libvirt
    mount --bind "$dir/cache" /var/cache/libvirt
    mount --bind "$dir/log" /var/log/libvirt
    echo $$ > "$dir/holder.pid"
    exec -a hosted-libvirt-holder sleep infinity
  ' hosted-libvirt "$dir" </dev/null >"$dir/log/holder.log" 2>&1 &
  for ((i = 0; i < 50; i++)); do
    h=$(holder) && break
    sleep 0.1
  done
  h=$(holder) || die "the namespace holder did not start (see $dir/log/holder.log)"

  say "starting virtlogd and libvirtd"
  nsx virtlogd -d -p "$dir/virtlogd.pid" </dev/null >&2
  start_libvirtd

  # The guest network over the bridge and the storage pool.
  cat > "$dir/network.xml" <<EOF
<network><name>$NAME</name><forward mode='bridge'/><bridge name='$BRIDGE'/></network>
EOF
  virsh -q -c "$local_uri" net-define "$dir/network.xml" >/dev/null
  virsh -q -c "$local_uri" net-start "$NAME" >/dev/null
  virsh -q -c "$local_uri" net-autostart "$NAME" >/dev/null
  virsh -q -c "$local_uri" pool-define-as "$NAME" dir --target "$dir/images" >/dev/null
  virsh -q -c "$local_uri" pool-build "$NAME" >/dev/null
  virsh -q -c "$local_uri" pool-start "$NAME" >/dev/null
  virsh -q -c "$local_uri" pool-autostart "$NAME" >/dev/null

  say "waiting for $tls_uri"
  wait_for "$tls_uri" 30 || die "libvirtd does not answer on TLS (see $dir/log/libvirtd.log)"
  up_ok=1
  say "up in $((SECONDS - t0)) s; down with: $0 down $dir"
  # Its guests under KVM where this machine has it (a hosted host's own default), else TCG.
  local domain_type=kvm
  [ -w /dev/kvm ] || domain_type=qemu
  cat <<EOF
[hosted]
uri = "qemu+tls://$HOST_ADDR/system"
pki = "$dir/client"
pool = "$NAME"
nic = "network=$NAME"
guest_addresses = "$GUEST_RANGE"
domain_type = "$domain_type"
EOF
}

link() {
  ns_exists || die "the hosted host is not up (no namespace $ns)"
  case "${1:-}" in
    down)
      ip -n "$ns" link set "$UPLINK" down
      say "link down: $HOST_ADDR unreachable from the root namespace"
      ;;
    up)
      ip link set "$veth" up
      ip -n "$ns" link set "$UPLINK" up
      ip -n "$ns" route replace default via "$ROOT_ADDR"
      ip route replace "$GUEST_NET" via "$HOST_ADDR" dev "$veth"
      say "link up"
      ;;
    *) usage ;;
  esac
}

restart() {
  holder >/dev/null || die "the hosted host is not up (run: $0 up $dir)"
  local p
  if p=$(live_pid "$dir/libvirtd.pid" libvirtd); then
    say "stopping libvirtd ($p)"
    stop_pids 30 "$p"
  fi
  say "starting libvirtd"
  start_libvirtd
  if ip -n "$ns" -o link show "$UPLINK" | grep -q '[<,]UP[,>]'; then
    wait_for "$tls_uri" 30 || die "libvirtd does not answer on TLS (see $dir/log/libvirtd.log)"
    say "libvirtd restarted"
  else
    say "libvirtd restarted (the link is down: TLS not checked)"
  fi
}

case "$cmd" in
  up) [ $# -eq 0 ] || usage; up ;;
  down) [ $# -eq 0 ] || usage; down; say "down" ;;
  link) [ $# -eq 1 ] || usage; link "$1" ;;
  restart) [ $# -eq 0 ] || usage; restart ;;
  exec) [ $# -ge 1 ] || usage; nsx "$@" ;;
  *) usage ;;
esac
