#!/usr/bin/env python3
"""Writes docs/benchmarks.md (to stdout) from the results bench/run collected.

    bench/report.py RESULTS_DIR WORK_DIR > docs/benchmarks.md.new

RESULTS_DIR holds hyperfine's JSON (cold, warm, reuse, pack), peak-rss.py's JSON (rss-*.json)
and key=value text files; WORK_DIR is replaced by $W in the commands shown.
"""
import json
import os
import re
import statistics
import sys

res, work = sys.argv[1], sys.argv[2]
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kv(name):
    out = {}
    try:
        with open(os.path.join(res, name)) as f:
            for line in f:
                k, sep, v = line.rstrip("\n").partition("=")
                if sep:
                    out[k] = v
    except OSError:
        pass
    return out


def hyperfine(name):
    try:
        with open(os.path.join(res, name + ".json")) as f:
            return json.load(f)["results"]
    except OSError:
        return []


def rss(size):
    try:
        with open(os.path.join(res, f"rss-{size}.json")) as f:
            return json.load(f)
    except OSError:
        return None


MIRROR = None


def short(cmd):
    cmd = cmd.replace(work, "$W").replace(root + "/", "")
    if MIRROR:
        cmd = cmd.replace(MIRROR, "$MIRROR")
    return re.sub(r" >> \$W/logs/\S+ 2>&1$", "", cmd)


def fmt_s(t):
    if t is None:
        return "n/a"
    if t < 1:
        return f"{t * 1000:.0f} ms"
    return f"{t:.1f} s"


meta = kv("meta.txt")
MIRROR = meta.get("mirror")
sizes = kv("pack-sizes.txt")
cold_sizes = kv("cold-sizes.txt")
rows = []  # (section, name, command, median, min, max, runs)
by_name = {}
for section, name in (("a cold", "cold"), ("b warm", "warm"), ("c unchanged", "reuse"), ("d packaging", "pack")):
    for r in hyperfine(name):
        times = r["times"]
        row = {
            "section": section,
            "name": r["command"] if "command" in r else "?",
            "command": short(r["command"]),
            "median": statistics.median(times),
            "min": min(times),
            "max": max(times),
            "runs": len(times),
        }
        rows.append(row)
        by_name[row["name"]] = row

# hyperfine's JSON has the -n name, not the command: bench/run records both in commands.tsv
# (name, what runs untimed before each run, the command).
COMMANDS, PREPARE = {}, {}
try:
    with open(os.path.join(res, "commands.tsv")) as f:
        for line in f:
            name, prep, cmd = line.rstrip("\n").split("\t")
            COMMANDS[name] = short(cmd)
            if prep:
                PREPARE[name] = short(prep)
except OSError:
    pass


def med(name):
    r = by_name.get(name)
    return r["median"] if r else None


# in-build packing times of the reference image, from the debimg build logs
pack_lines = []
try:
    with open(os.path.join(res, "pack-lines.txt")) as f:
        for line in f:
            m = re.search(r"reference-root\.img\.gz: (\d+) MiB raw -> (\d+) MiB gzip in ([0-9.]+)s", line)
            if m:
                pack_lines.append(float(m.group(3)))
except OSError:
    pass

targets = []  # (target, measured, ratio text, verdict)


def cell(text):
    """A markdown table cell: a | inside it would end the cell."""
    return str(text).replace("|", "\\|")


def verdict(ok):
    if ok is None:
        return "n/a"
    return "pass" if ok else "**MISS**"


def ratio_target(label, num, den, limit, le=True):
    if num is None or den is None or den == 0:
        targets.append((label, "n/a", "n/a", "n/a"))
        return
    r = num / den
    ok = r <= limit if le else r >= limit
    targets.append((label, f"{fmt_s(num)} / {fmt_s(den)}", f"{r:.2f}", verdict(ok)))


cold = med("debimg cold")
ratio_target("cold debimg / fuel-agent path <= 0.5", cold, med("fuel-agent path"), 0.5)
ratio_target("cold debimg / mmdebstrap dir <= 1.0", cold, med("mmdebstrap dir"), 1.0)
ratio_target("warm, one package added / cold <= 0.25", med("debimg warm, one package added"), cold, 0.25)
ratio_target("warm, one package removed / cold <= 0.25", med("debimg warm, one package removed"), cold, 0.25)
reuse = med("debimg unchanged spec (reuse)")
targets.append(("unchanged spec (reuse) < 0.2 s", fmt_s(reuse), "", verdict(None if reuse is None else reuse < 0.2)))

raw_size = int(sizes["raw_size"]) if "raw_size" in sizes else None
t_gzip, t_pigz = med("gzip -6 | md5sum"), med("pigz -p2 -6 | md5sum")
t_debimg = med("debimg pack")
pack_source = "`debimg pack`, hyperfine"
if t_debimg is None and pack_lines and sizes:
    t_debimg = statistics.median(pack_lines)
    pack_source = f"in-build package stage, median of {len(pack_lines)} builds' log lines (no `debimg pack`)"
if t_gzip is not None:
    for label, t_other, limit in (("packaging throughput >= 4x gzip -6 | md5sum", t_gzip, 4), ("packaging throughput >= 2x pigz -p2", t_pigz, 2)):
        if t_debimg is None or t_other is None:
            targets.append((label, "skipped: no debimg pack", "n/a", "n/a"))
        else:
            r = t_other / t_debimg
            targets.append((label, f"{fmt_s(t_other)} / {fmt_s(t_debimg)} ({pack_source})", f"{r:.2f}x", verdict(r >= limit)))
    gz_size = sizes.get("debimg_pack_size") or sizes.get("debimg_build_gz_size")
    if gz_size and sizes.get("gzip6_size"):
        r = int(gz_size) / int(sizes["gzip6_size"])
        targets.append(("debimg .gz <= 3% larger than gzip -6", f"{int(gz_size):,} / {int(sizes['gzip6_size']):,} bytes", f"{(r - 1) * 100:+.1f}%", verdict(r <= 1.03)))

rss_results = {s: rss(s) for s in ("1GiB", "8GiB")}
for s, r in rss_results.items():
    if r is None:
        continue
    mib = r["debimg_max_hwm_kib"] / 1024 if r.get("debimg_max_hwm_kib") else None
    targets.append((f"peak RSS of debimg, {s} image < 100 MiB",
                    f"{mib:.1f} MiB (largest debimg process)" if mib else "n/a", "",
                    verdict(None if mib is None else mib < 100)))

# ---------------------------------------------------------------------------------------------
out = []
p = out.append
p("# Benchmarks")
p("")
if meta.get("quick") == "1":
    p("> **Smoke test** (`bench/run --quick`: one run each, possibly on a busy machine): these numbers")
    p("> check that the scripts work; they are not a result.")
    p("")
p(f"Generated by `bench/run` (runs per measurement: {meta.get('runs')}; measurements: {meta.get('only')}) on "
  f"{meta.get('date')}. Every number is the median of the runs, with min and max; times are "
  "wall-clock from hyperfine unless said otherwise.")
p("")
p("## Machine")
p("")
p(f"- CPU: {meta.get('cpu')}, {meta.get('nproc')} CPUs (nproc); memory {meta.get('mem')}")
p(f"- Debian {meta.get('debian')}, kernel {meta.get('kernel')}; /var/tmp on {meta.get('fs')}")
p(f"- {meta.get('debimg')} ({meta.get('debimg_commit')}); {meta.get('hyperfine')}; {meta.get('mmdebstrap')}; "
  f"debootstrap {meta.get('debootstrap')}; {meta.get('gzip')}; {meta.get('pigz')}")
p(f"- load average before / after: {meta.get('load_before')} / {meta.get('load_after')}")
p("- mirror: the host's own (from its apt sources), the same for all three cold builds")
p("")
p("## Targets")
p("")
p("| target | measured | ratio | verdict |")
p("|---|---|---|---|")
for t in targets:
    p("| " + " | ".join(cell(x) for x in t) + " |")
p("")
p("## Times")
p("")
p("| measurement | median | min | max | runs |")
p("|---|---|---|---|---|")
for r in rows:
    p(f"| {r['section']}: {cell(r['name'])} | {fmt_s(r['median'])} | {fmt_s(r['min'])} | {fmt_s(r['max'])} | {r['runs']} |")
if pack_lines and sizes and "debimg pack" not in by_name:
    p(f"| d packaging: debimg in-build package stage (from build logs) | {fmt_s(statistics.median(pack_lines))} | "
      f"{fmt_s(min(pack_lines))} | {fmt_s(max(pack_lines))} | {len(pack_lines)} |")
p("")
if raw_size:
    p(f"Packaging input: the shrunk raw image of a debimg build of the reference spec, {raw_size:,} bytes "
      f"(its md5 matches the build's metadata: {sizes.get('raw_md5_matches_metadata')}). Throughput (MB/s of input, "
      "median):")
    p("")
    p("| packer | MB/s | output bytes |")
    p("|---|---|---|")
    for label, t, size in (("gzip -6 \\| md5sum", t_gzip, sizes.get("gzip6_size")),
                           ("pigz -p2 -6 \\| md5sum", t_pigz, sizes.get("pigz2_size")),
                           (f"debimg ({pack_source})", t_debimg, sizes.get("debimg_pack_size") or sizes.get("debimg_build_gz_size"))):
        mbs = f"{raw_size / t / 1e6:.0f}" if t else "n/a"
        p(f"| {label} | {mbs} | {int(size):,} |" if size else f"| {label} | {mbs} | n/a |")
    p("")
    if sizes.get("debimg_pack") == "no":
        p("debimg has no `debimg pack` subcommand yet, so its packer was not timed on its own (skipped: no "
          "debimg pack); the debimg row uses the package stage's own timing line from the builds' logs "
          "(`reference-root.img.gz: N MiB raw -> M MiB gzip in X s`), on the same image content, and its "
          "output size is the build's `.img.gz`. debimg's packer also computes the raw md5 and sha256 "
          "and the container sha256 and writes and fsyncs the file; the gzip and pigz commands only "
          "compress and hash the container.")
        p("")
deflate_rows = []
try:
    with open(os.path.join(res, "deflate.txt")) as f:
        deflate_rows = [line.split() for line in f if len(line.split()) == 5]
except OSError:
    pass
if deflate_rows:
    g6 = int(sizes["gzip6_size"]) if sizes.get("gzip6_size") else None
    p("Block deflate on one core (`bench/deflate/run`, the same image in 1 MiB blocks; zlib-rs and "
      "zlib-ng with a 32 KiB dictionary and a sync flush per block, as debimg packed before; "
      "libdeflate each block whole, as debimg packs now, its pieces made into one stream by "
      "`pack::deflate`; best of 3):")
    p("")
    p("| engine | level | seconds | MB/s | output bytes | vs gzip -6 |")
    p("|---|---|---|---|---|---|")
    for engine, level, secs, mbs, size in deflate_rows:
        vs = f"{(int(size) / g6 - 1) * 100:+.1f}%" if g6 else "n/a"
        p(f"| {engine} | {level} | {secs} | {mbs} | {int(size):,} | {vs} |")
    p("")
if cold_sizes:
    p(f"Cold outputs (last run): debimg .img.gz {int(cold_sizes.get('debimg_gz', 0)):,} bytes; fuel-agent path "
      f".img.gz {int(cold_sizes.get('fuel_gz', 0)):,} bytes; mmdebstrap tree {int(cold_sizes.get('mm_tree_kib', 0)) // 1024} MiB.")
    p("")

if any(rss_results.values()):
    p("## Peak memory")
    p("")
    p("| image | debimg, largest process (VmHWM) | debimg, sum of its processes | `/usr/bin/time -v` max RSS | largest other process |")
    p("|---|---|---|---|---|")
    for s, r in rss_results.items():
        if r is None:
            continue
        lo = r.get("largest_other") or {}
        p(f"| {s} | {r['debimg_max_hwm_kib'] / 1024:.1f} MiB | {r['debimg_sum_hwm_kib'] / 1024:.1f} MiB "
          f"({len(r['debimg_processes'])} processes) | {r['time_maxrss_kib'] / 1024:.1f} MiB | "
          f"{os.path.basename(lo.get('exe', '?'))} {lo.get('hwm_kib', 0) / 1024:.1f} MiB |")
    p("")
    p("What the numbers mean: `/usr/bin/time -v` reports the `ru_maxrss` that wait4() returns for its "
      "child, which the kernel keeps as the largest resident set of any single process among the "
      "child and the descendants that were waited for (getrusage(2): \"the resident set size of the "
      "largest child, not the maximum resident set size of the process tree\"). debimg forks a "
      "supervisor, the init of its PID namespace and the builder, and they run debootstrap, apt, dpkg, "
      "mkfs, e2fsck and resize2fs, so that number is the largest process of the whole build, often "
      "not debimg. `bench/peak-rss.py` therefore also samples the VmHWM (per-process peak RSS) of every "
      "process running the debimg binary every 50 ms; the target is judged on the largest of those.")
    p("")

p("## Commands")
p("")
p("`$W` is the work directory (`/var/tmp/debimg-bench-XXXXXX`), `$MIRROR` the host's bookworm "
  "mirror from its apt sources (`debimg plan bench/reference.yaml`, `.repos[0].uri`). hyperfine "
  "runs each command through `sh -c` (c directly, `-N`), the builds' output appended to a log.")
p("")
p("```sh")
for r in rows:
    name = r["name"]
    p(f"# {r['section']}: {name} ({r['runs']} run{'s' if r['runs'] != 1 else ''})")
    if name in PREPARE:
        p(f"#   before each run: {PREPARE[name]}")
    p(COMMANDS.get(name, r["command"]))
for name in ("peak RSS 1GiB", "peak RSS 8GiB"):
    if name in COMMANDS:
        p(f"# e {name}: bench/reference.yaml with that image size, warm cache, once")
        p(COMMANDS[name])
p("```")
p("")
p("Cold means no package or base-tree cache for any of the three: debimg gets an empty "
  "`--cache-dir` per run; the fuel-agent path downloads into the new filesystem; mmdebstrap uses a "
  "temporary apt cache of its own. The host's page cache is not dropped. Warm means debimg's cache "
  "filled by earlier builds of both package sets. `bench/fuel-agent-path` follows fuel-agent's "
  "`do_build_image` (sparse file, `losetup --find --show`, `mkfs.ext4 -O ^has_journal`, debootstrap "
  "minbase, policy-rc.d, fresh proc, `apt-get update`, `dist-upgrade`, `install`, `apt-get clean`, "
  "unmount, detach, `tune2fs -O has_journal`, `e2fsck -fy`, `resize2fs -M`, truncate, `gzip -6`, "
  "`md5sum` of both) inside `unshare -m --propagation private`.")
p("")
print("\n".join(out))
