#!/usr/bin/env bash
# A second libvirtd with Debian's stock QEMU settings, beside the one scripts/setup.sh runs
# (which runs QEMU as root): QEMU as `libvirt-qemu`, dynamic ownership, the DAC security
# driver, and Debian's socket permissions (group `libvirt`, 0770). It runs in a mount
# namespace of its own, so its state, logs, sockets and pid files are apart from the
# first daemon's; clients reach it at
#   qemu+unix:///system?socket=DIR/run/libvirt-sock
#
#   scripts/stock-libvirt.sh start DIR    starts virtlogd and libvirtd with their files in DIR
#   scripts/stock-libvirt.sh stop DIR     destroys its domains and stops both daemons
#
# It also gives /dev/kvm Debian's udev permissions (root:kvm 0660, libvirt-qemu in group
# kvm; put back at stop): without them libvirt probes QEMU's capabilities again before
# every domain start (~45 s each here). `scripts/packages.sh --check` boots a release with
# the packaged agent against it.
set -euo pipefail
cmd="${1:-}"
dir="${2:-}"
if [ -z "$cmd" ] || [ -z "$dir" ]; then
  echo "usage: $0 start|stop DIR" >&2
  exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "stock-libvirt: run as root (it mounts over /run and /etc/libvirt in its own namespace)" >&2
  exit 1
fi
uri="qemu+unix:///system?socket=$dir/run/libvirt-sock"

case "$cmd" in
  start)
    mkdir -p "$dir"/{etc,run,lib,cache,log}
    cp -a /etc/libvirt/. "$dir/etc/"
    # Empty: Debian's compiled-in defaults (user and group libvirt-qemu, dynamic
    # ownership, remember_owner, security driver dac).
    : > "$dir/etc/qemu.conf"
    cat > "$dir/etc/libvirtd.conf" <<'EOF'
unix_sock_group = "libvirt"
unix_sock_ro_perms = "0777"
unix_sock_rw_perms = "0770"
auth_unix_ro = "none"
auth_unix_rw = "none"
EOF
    getent group libvirt >/dev/null || groupadd -r libvirt
    getent group kvm >/dev/null || groupadd -r kvm
    if [ -e /dev/kvm ] && [ ! -f "$dir/kvm.before" ]; then
      stat -c '%a %G' /dev/kvm > "$dir/kvm.before"
      id -nG libvirt-qemu | grep -w kvm >/dev/null || echo added >> "$dir/kvm.before"
      # Put back by `stop`, or here if starting fails.
      trap '"$0" stop "$dir" >/dev/null 2>&1' ERR
      chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
      usermod -aG kvm libvirt-qemu
    fi
    # A tmpfs on /run keeps the first daemon's pid files and sockets out of sight.
    unshare --mount --propagation private bash -c '
      set -e
      dir="$1"
      mount -t tmpfs tmpfs /run
      mkdir -p /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt
      mount --bind "$dir/run" /run/libvirt
      mount --bind "$dir/etc" /etc/libvirt
      mount --bind "$dir/lib" /var/lib/libvirt
      mount --bind "$dir/cache" /var/cache/libvirt
      mount --bind "$dir/log" /var/log/libvirt
      virtlogd -d -p "$dir/virtlogd.pid"
      libvirtd -d -p "$dir/libvirtd.pid"
    ' stock-libvirt "$dir"
    for _ in $(seq 100); do
      virsh -c "$uri" version >/dev/null 2>&1 && break
      sleep 0.1
    done
    virsh -c "$uri" version >/dev/null
    echo "stock-libvirt: libvirtd (QEMU as libvirt-qemu) at $uri"
    ;;
  stop)
    for d in $(virsh -c "$uri" list --all --name 2>/dev/null); do
      virsh -c "$uri" destroy "$d" >/dev/null 2>&1 || true
      virsh -c "$uri" undefine "$d" >/dev/null 2>&1 || true
    done
    for pid in "$dir/libvirtd.pid" "$dir/virtlogd.pid"; do
      [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
    done
    if [ -f "$dir/kvm.before" ]; then
      read -r mode group < "$dir/kvm.before"
      chgrp "$group" /dev/kvm && chmod "$mode" /dev/kvm
      if grep -x added "$dir/kvm.before" >/dev/null; then
        gpasswd -d libvirt-qemu kvm >/dev/null || true
      fi
      rm -f "$dir/kvm.before"
    fi
    echo "stock-libvirt: stopped"
    ;;
  *)
    echo "usage: $0 start|stop DIR" >&2
    exit 2
    ;;
esac
