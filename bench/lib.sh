# Shared helpers of the bench/ scripts (sourced, not run).

# Prints the build host's Debian mirror for SUITE (default bookworm), read from its apt sources at
# run time: deb822 stanzas in /etc/apt/sources.list.d/*.sources whose Suites: list the suite,
# then one-line "deb URI SUITE ..." entries in sources.list and sources.list.d/*.list.
bench_mirror() {
  local suite=${1:-bookworm}
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    awk -v suite="$suite" '
      function flush() {
        if (uris != "" && (" " suites " ") ~ (" " suite " ") && (" " types " ") ~ / deb /) {
          split(uris, u, " "); print u[1]; found = 1; exit
        }
        uris = ""; suites = ""; types = ""
      }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      tolower($1) == "uris:"   { $1 = ""; uris = $0 }
      tolower($1) == "suites:" { $1 = ""; suites = $0 }
      tolower($1) == "types:"  { $1 = ""; types = $0 }
      END { if (!found) flush() }
    ' "$f" | grep -m1 . && return 0
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    # deb [options] URI SUITE COMPONENT...
    sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" |
      awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2; exit }' | grep -m1 . && return 0
  done
  echo "bench: no apt source for $suite on this host" >&2
  return 1
}

# Installs the Debian packages given whose status is not "installed", with apt-get.
bench_need() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "bench: installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
  fi
}

# Detaches every loop device backed by FILE (losetup -j), if any.
bench_detach_loops_of() {
  local file=$1 dev
  [ -e "$file" ] || return 0
  for dev in $(losetup -j "$file" -O NAME -n 2>/dev/null); do
    losetup -d "$dev" 2>/dev/null || true
  done
}

# Fails unless DIR has no mount point at or under it (in this mount namespace).
bench_no_mounts_under() {
  local dir
  dir=$(readlink -f "$1")
  if findmnt -rn -o TARGET | awk -v d="$dir" '$0 == d || index($0, d "/") == 1 { bad = 1 } END { exit !bad }'; then
    echo "bench: refusing to delete $dir: something is mounted under it" >&2
    return 1
  fi
}

# Removes DIR recursively, refusing when anything is mounted under it, never crossing a file system.
bench_rm_tree() {
  local dir=$1
  [ -e "$dir" ] || return 0
  bench_no_mounts_under "$dir" || return 1
  rm -rf --one-file-system -- "$dir"
}

# Prints the PIDs of every descendant of PID (children first), by walking /proc's parent links.
bench_descendants() {
  ps -e -o pid=,ppid= | awk -v root="$1" '
    { parent[$1] = $2; pids[NR] = $1 }
    END {
      for (i = 1; i <= NR; i++) {
        p = pids[i]; q = parent[p]
        while (q != "" && q != 0 && q != 1) { if (q == root) { print p; break } q = parent[q] }
      }
    }'
}
