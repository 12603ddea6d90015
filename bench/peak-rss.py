#!/usr/bin/env python3
"""Peak memory of one debimg build, two ways.

    bench/peak-rss.py DEBIMG_BINARY OUT.json -- COMMAND...

Runs `/usr/bin/time -v -o TIMEFILE COMMAND...` and, while it runs, samples /proc every 50 ms for
every descendant process: its VmHWM (the kernel's per-process peak resident set size).

- `time_maxrss_kib`: GNU time's "Maximum resident set size". time gets it from wait4() on its
  child, i.e. the child's ru_maxrss, which the kernel keeps as the maximum over the child itself
  and every descendant that was waited for (getrusage(2): "the resident set size of the largest
  child, not the maximum resident set size of the process tree"). For debimg that includes
  debootstrap, apt, dpkg, mkfs, e2fsck and resize2fs: it is the largest single process of the
  whole build, not debimg's own footprint, and not a sum.
- `debimg_processes`: per process whose /proc/PID/exe is DEBIMG_BINARY (the supervisor, the
  namespace init and the builder: forks of debimg that did not exec), its last sampled VmHWM.
  VmHWM only grows, so the last sample before the process exits is its peak up to that moment
  (a peak reached in the last 50 ms of a process's life can be missed).
- `debimg_max_hwm_kib`: the largest of those: debimg's own peak RSS (per process, not summed);
  `debimg_sum_hwm_kib`: their sum (an upper bound of what debimg held at once).
- `largest_other`: the non-debimg descendant with the largest VmHWM seen (explains time's number).
"""
import json
import os
import subprocess
import sys
import tempfile
import time


def read_status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = v.strip()
    except OSError:
        return None
    return out


def children_map():
    kids = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may contain spaces and parentheses: the fields after the last ')' are fixed
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def descendants(root, kids):
    todo, seen = [root], []
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            seen.append(c)
            todo.append(c)
    return seen


def main():
    if len(sys.argv) < 5 or sys.argv[3] != "--":
        sys.exit(__doc__)
    binary = os.path.realpath(sys.argv[1])
    out_path = sys.argv[2]
    cmd = sys.argv[4:]
    with tempfile.NamedTemporaryFile(prefix="debimg-bench-time-", delete=False) as tf:
        timefile = tf.name
    try:
        proc = subprocess.Popen(["/usr/bin/time", "-v", "-o", timefile] + cmd)
        debimg = {}  # pid -> {"hwm": kib, "name": ..}
        other = {}
        start = time.monotonic()
        while proc.poll() is None:
            for pid in descendants(proc.pid, children_map()):
                try:
                    exe = os.readlink(f"/proc/{pid}/exe")
                except OSError:
                    continue
                st = read_status(pid)
                if not st or "VmHWM" not in st:
                    continue
                hwm = int(st["VmHWM"].split()[0])
                if exe == binary:
                    rec = debimg.setdefault(pid, {"pid": pid, "hwm_kib": 0, "first_seen_s": round(time.monotonic() - start, 2)})
                    rec["hwm_kib"] = max(rec["hwm_kib"], hwm)
                else:
                    rec = other.setdefault(pid, {"pid": pid, "exe": exe, "hwm_kib": 0})
                    rec["hwm_kib"] = max(rec["hwm_kib"], hwm)
            time.sleep(0.05)
        rc = proc.returncode
        maxrss = None
        with open(timefile) as f:
            for line in f:
                if "Maximum resident set size" in line:
                    maxrss = int(line.rsplit(":", 1)[1])
    finally:
        os.unlink(timefile)
    procs = sorted(debimg.values(), key=lambda r: r["first_seen_s"])
    largest_other = max(other.values(), key=lambda r: r["hwm_kib"], default=None)
    result = {
        "command": cmd,
        "exit_code": rc,
        "time_maxrss_kib": maxrss,
        "debimg_processes": procs,
        "debimg_max_hwm_kib": max((r["hwm_kib"] for r in procs), default=None),
        "debimg_sum_hwm_kib": sum(r["hwm_kib"] for r in procs) if procs else None,
        "largest_other": largest_other,
    }
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2), file=sys.stderr)
    sys.exit(rc)


if __name__ == "__main__":
    main()
