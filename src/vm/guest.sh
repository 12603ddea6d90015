#!/bin/sh
# Runs inside a `debimg build --vm` machine as its init's child, from the input disk: prepares
# the machine, runs the build, writes the result onto the output disk. The host reads that disk
# as data only. Whatever happens here, the init powers the machine off afterwards.
#
# /run/debimg-in holds: debimg (the host's binary), args (one argument per line), cwd, and
# root/ (files placed at the same paths as on the host: the spec, its files, apt sources).
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
in=/run/debimg-in
say() { echo "debimg-vm: $*" > /dev/ttyS0; }
disk() {
  for d in /sys/block/vd*; do
    if [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ]; then echo "/dev/${d##*/}"; return 0; fi
  done
  return 1
}
port() {
  for p in /sys/class/virtio-ports/*; do
    if [ "$(cat "$p/name" 2>/dev/null)" = "$1" ]; then echo "/dev/${p##*/}"; return 0; fi
  done
  return 1
}
# The result: `status` (the build's exit code, or why there is none) and the output directory.
finish() {
  mkdir -p /run/debimg-result
  printf '%s\n' "$1" > /run/debimg-result/status
  if [ -n "${2:-}" ]; then printf '%s\n' "$2" > /run/debimg-result/reason; fi
  output=$(disk debimg-output) || { say "no output disk"; exit 1; }
  if [ -d /scratch/out ]; then
    tar -cf "$output" --format=gnu --sparse -C /run/debimg-result . -C /scratch out || say "writing the output disk failed"
  else
    tar -cf "$output" --format=gnu -C /run/debimg-result . || say "writing the output disk failed"
  fi
  sync
  exit 0
}
say up
modprobe -a virtio_net virtio_console loop 9pnet_virtio 9p overlay 2>/dev/ttyS0
# devtmpfs makes the ports' nodes once the module is in.
n=0
while ! events=$(port debimg.events) || ! log=$(port debimg.log); do
  n=$((n + 1)); [ "$n" -gt 100 ] && finish 125 "the VM's console ports did not appear"
  sleep 0.1
done
mountpoint -q /tmp || mount -t tmpfs -o mode=1777 tmpfs /tmp
scratch=$(disk debimg-scratch) || finish 125 "no scratch disk"
mkfs.ext4 -q -F -m 0 -E nodiscard "$scratch" 2>/dev/ttyS0 || finish 125 "formatting the scratch disk failed"
mkdir -p /scratch && mount -o noatime "$scratch" /scratch || finish 125 "mounting the scratch disk failed"
mkdir -p /scratch/build /scratch/out
# The network of qemu's user mode: the guest is 10.0.2.15, the host's resolver 10.0.2.3.
ip link set lo up
for i in /sys/class/net/*; do
  i=${i##*/}; [ "$i" = lo ] && continue
  ip link set "$i" up && ip addr add 10.0.2.15/24 dev "$i" && ip route add default via 10.0.2.2 && break
done
rm -f /etc/resolv.conf; echo "nameserver 10.0.2.3" > /etc/resolv.conf
# The host's cache, read-only; what this build adds stays on the scratch disk and goes with it.
if grep -qx cache "$in/features" 2>/dev/null; then
  mkdir -p /run/cache-host /scratch/cache/upper /scratch/cache/work /var/cache/debimg
  mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=1048576 debimg.cache /run/cache-host \
    && mount -t overlay overlay -o lowerdir=/run/cache-host,upperdir=/scratch/cache/upper,workdir=/scratch/cache/work /var/cache/debimg \
    || finish 125 "mounting the package cache failed"
  chmod 0755 /var/cache/debimg
fi
if [ -d "$in/root" ]; then cp -a "$in/root/." / || finish 125 "placing the build's files failed"; fi
set --
while IFS= read -r a; do set -- "$@" "$a"; done < "$in/args"
cd "$(cat "$in/cwd")" 2>/dev/null || cd /
say "building"
"$in/debimg" "$@" > "$events" 2> "$log" < /dev/null
status=$?
# The guest's own lock is no output.
rm -f /scratch/out/.debimg.lock
say "build exited $status"
used=$(df -P /scratch | awk 'NR == 2 { sub("%", "", $5); print $5 }')
if [ "$status" -ne 0 ] && [ "${used:-0}" -ge 99 ]; then
  finish "$status" "disk-full"
fi
finish "$status"
