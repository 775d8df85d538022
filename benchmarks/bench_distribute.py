#!/usr/bin/env python
"""Benchmark `multiflow distribute` (Step 1) against plainly reading the checkpoint's bytes.

    sudo python benchmarks/bench_distribute.py --checkpoint /work/bench/llava-7b-hub-fp16

In one run, on the same files:

1. cold read of the bytes: drop the page cache (`sync; echo 3 > /proc/sys/vm/drop_caches`,
   needs root), then read every shard file once, in order, with 16 MiB `readinto` calls
   into one reused buffer;
2. cold `multiflow distribute ...` as a child process, after dropping the cache again;
3. warm: the read and the command back to back, interleaved, `--warm-rounds` times
   (at least 2) with the files in the page cache (the script checks that they are).

Each child's wall time is measured here around the child. Its peak RSS is the
"Maximum resident set size" of GNU `/usr/bin/time` (run as `time -f %M`, the
number `time -v` prints), or, where there is no GNU time, the `ru_maxrss` that
`os.wait4` returns for that one child (same kernel accounting, but never below
this script's own RSS, ~40 MB, because Linux keeps the high-water mark across
fork+exec). Both include any grandchildren the child waited for.

The ratio of a command to "its" read is (command seconds) / (read seconds) of the
same temperature: cold/cold, and per warm round and median/median. Targets:
cold ratio <= 1.3, warm ratio <= 6, peak RSS <= 1024 MB (every run of the command).

`--cmd` replaces the command (a shell-like string, split with shlex) for
comparisons; `{model}`, `{output}` and `{targets}` in it are filled in. If the
drop fails (not root, read-only /proc), cold numbers are skipped and the reason
printed. `--read-only` measures only the reads (to check the harness and disk).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import mmap
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import busy_cpu_seconds, fmt, git_rev, gnu_time, self_cpu_seconds  # noqa: E402

CHUNK = 16 * 1024 * 1024
TARGETS = {"cold_ratio": 1.3, "warm_ratio": 6.0, "peak_rss_mb": 1024.0}


def default_cmd() -> str:
    exe = Path(sys.executable).with_name("multiflow")
    prog = str(exe) if exe.exists() else (shutil.which("multiflow") or "multiflow")
    return (f"{shlex.quote(prog)} distribute --model {{model}} --target-sparsity {{targets}} "
            "--quiet --no-plot --output {output}")


def shard_files(checkpoint: Path) -> list[Path]:
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        names = list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
        return [checkpoint / n for n in names]
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{checkpoint}: no model.safetensors.index.json and no *.safetensors")
    return files


def drop_caches() -> str | None:
    """Drop the page cache; return None on success, else why it failed."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return None
    except OSError as exc:
        return f"cannot drop the page cache ({exc.strerror or exc}); run as root on Linux"


def read_bytes(files: list[Path]) -> tuple[float, int]:
    """Read every file in order with large readinto calls into one reused buffer."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return time.perf_counter() - t0, total


def read_bytes_direct(files: list[Path]) -> tuple[float, int]:
    """Read every file in order with O_DIRECT (no page cache) into one page-aligned buffer.

    The stricter I/O floor for cold runs: multiflow itself reads uncached bytes this way.
    """
    import mmap

    buf = mmap.mmap(-1, CHUNK)
    total = 0
    t0 = time.perf_counter()
    for path in files:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            while True:
                n = os.readv(fd, [buf])
                if n <= 0:
                    break
                total += n
        finally:
            os.close(fd)
    return time.perf_counter() - t0, total


def resident_bytes(files: list[Path]) -> int | None:
    """How many bytes of the files are in the page cache (mincore, via multiflow's pieces.cached_pages), or None
    if unknown."""
    from multiflow.storage.pieces import cached_pages

    resident = 0
    for path in files:
        size = path.stat().st_size
        fd = os.open(path, os.O_RDONLY)
        try:
            counted = cached_pages(fd, 0, size)
        finally:
            os.close(fd)
        if counted is None:
            return None
        resident += min(counted[0] * mmap.PAGESIZE, size)
    return resident


def run_child(argv: list[str], log: Path, timer: str | None) -> tuple[float, float, int, float]:
    """Run argv; return (wall seconds, peak RSS in MiB, exit status, CPU seconds user+system).

    With GNU time (`timer`), the peak RSS is its %M: the child's own high-water mark.
    Without, it is ru_maxrss from os.wait4, which is also the child's (the kernel's
    per-child accounting) but can never be below this process's RSS at the fork,
    since Linux keeps the high-water mark across exec.
    """
    stats = log.with_suffix(".time")
    full = [timer, "-f", "%M %U %S", "-o", str(stats), *argv] if timer else argv
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting again
    rss_kb = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss / 1024  # Linux: KiB
    cpu = usage.ru_utime + usage.ru_stime
    if timer:
        try:  # GNU time writes "Command exited with non-zero status N" first when the child fails
            kb, user, system = stats.read_text().strip().splitlines()[-1].split()
            rss_kb, cpu = int(kb), float(user) + float(system)
        except (OSError, ValueError, IndexError):
            pass  # e.g. the command was not found: keep wait4's numbers
    return wall, rss_kb / 1024, proc.returncode, cpu


def resource_self_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mem_info() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder (safetensors, sharded or not)")
    ap.add_argument("--repeats", type=int, default=1, help="cold rounds (read + command, each after a drop); default 1")
    ap.add_argument("--warm-rounds", type=int, default=None,
                    help="warm rounds of read + command, interleaved (default max(2, --repeats); at least 2)")
    ap.add_argument("--targets", nargs="+", default=["0.5"], metavar="S",
                    help="target sparsities passed to --target-sparsity (default 0.5)")
    ap.add_argument("--cmd", default=None,
                    help="command to time instead of multiflow distribute; {model}, {output}, {targets} are filled in. "
                         f"Default: {default_cmd()!r}")
    ap.add_argument("--read-only", action="store_true", help="only time the reads of the bytes (no command)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold measurements (no page-cache drop)")
    ap.add_argument("--settle", type=float, default=0.0, metavar="SECONDS",
                    help="wait this long after each page-cache drop before a cold measurement (default 0)")
    ap.add_argument("--keep-output", type=Path, default=None, help="keep the command's outputs under this folder")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)

    checkpoint = args.checkpoint.resolve()
    files = shard_files(checkpoint)
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise SystemExit(f"missing shard files: {', '.join(missing)}")
    total_bytes = sum(p.stat().st_size for p in files)
    warm_rounds = max(2, args.warm_rounds if args.warm_rounds is not None else args.repeats)
    cmd_template = args.cmd or default_cmd()
    targets = " ".join(shlex.quote(t) for t in args.targets)

    mem = mem_info()
    repo = Path(__file__).resolve().parent.parent
    print(f"# bench_distribute — {_dt.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, {mem.get('MemTotal', 0) / 2**30:.1f} GiB RAM, "
          f"{platform.platform()}, Python {platform.python_version()}, repo {git_rev(repo)}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"checkpoint: {checkpoint} ({len(files)} files, {total_bytes / 1e9:.2f} GB)")
    if not args.read_only:
        print(f"command: {cmd_template.format(model=shlex.quote(str(checkpoint)), output='<tmp>', targets=targets)}")
    timer = gnu_time()
    if timer:
        print(f"peak RSS: the child's maximum resident set size from {timer} -f %M "
              "(as /usr/bin/time -v prints it)", flush=True)
    else:
        print("peak RSS: ru_maxrss of the child from os.wait4 (no GNU /usr/bin/time here; never below "
              f"this process's own RSS at the fork, ~{resource_self_mb():.0f} MB)", flush=True)
    if mem.get("MemTotal") and total_bytes > 0.85 * mem["MemTotal"]:
        print(f"WARNING: the files ({total_bytes / 2**30:.1f} GiB) may not fit in the page cache "
              f"({mem['MemTotal'] / 2**30:.1f} GiB RAM): warm numbers may be partly cold")

    workdir = Path(tempfile.mkdtemp(prefix="bench_distribute_"))
    rows: list[dict] = []
    failures: list[str] = []
    warnings: list[str] = []
    run_no = 0

    def other_load(busy0: float | None, seconds: float, ours: float) -> float | None:
        """Average number of cores other processes kept busy during a measurement."""
        busy1 = busy_cpu_seconds()
        if busy0 is None or busy1 is None or seconds < 1.0:  # /proc/stat counts in 10 ms ticks
            return None
        return max(0.0, (busy1 - busy0 - ours) / seconds)

    def warn_load(label: str, others: float | None) -> None:
        if others is not None and others > 0.25:
            msg = f"{label}: other processes kept {others:.2f} cores busy meanwhile: this number is disturbed"
            warnings.append(msg)
            print(f"    WARNING: {msg}", flush=True)

    def read(label: str, reader=read_bytes) -> float:
        busy0, self0 = busy_cpu_seconds(), self_cpu_seconds()
        seconds, n = reader(files)
        cpu = self_cpu_seconds() - self0
        others = other_load(busy0, seconds, cpu)
        assert n == total_bytes, (n, total_bytes)
        rows.append({"measurement": label, "seconds": seconds, "gb_per_s": n / seconds / 1e9, "kind": "read",
                     "cpu_seconds": cpu, "other_cores_busy": others})
        print(f"  {label}: {seconds:.2f} s ({n / seconds / 1e9:.2f} GB/s), CPU {cpu:.1f} s", flush=True)
        warn_load(label, others)
        return seconds

    def command(label: str) -> tuple[float, float]:
        nonlocal run_no
        run_no += 1
        out = workdir / f"out-{run_no}"
        out.mkdir()
        argv = shlex.split(cmd_template.format(model=shlex.quote(str(checkpoint)), output=shlex.quote(str(out)),
                                               targets=targets))
        log = workdir / f"log-{run_no}.txt"
        busy0, self0 = busy_cpu_seconds(), self_cpu_seconds()
        seconds, rss, rc, cpu = run_child(argv, log, timer)
        others = other_load(busy0, seconds, cpu + self_cpu_seconds() - self0)
        produced = sorted(p.name for p in out.iterdir())
        rows.append({"measurement": label, "seconds": seconds, "peak_rss_mb": rss, "rc": rc, "kind": "cmd",
                     "cpu_seconds": cpu, "other_cores_busy": others, "outputs": produced})
        print(f"  {label}: {seconds:.2f} s, CPU {cpu:.1f} s, peak RSS {rss:.0f} MB, exit {rc}, wrote {produced}",
              flush=True)
        warn_load(label, others)
        if rc != 0:
            tail = log.read_text(errors="replace")[-3000:]
            failures.append(f"{label} exited {rc}; last output:\n{tail}")
            print(f"    exit {rc}; last output:\n{tail}", flush=True)
        if args.keep_output:
            dest = args.keep_output / f"run-{run_no}"
            dest.mkdir(parents=True, exist_ok=True)
            for p in out.iterdir():
                shutil.copy2(p, dest / p.name)
            shutil.copy2(log, dest / "log.txt")
        return seconds, rss

    cold_reads: list[float] = []
    cold_direct: list[float] = []
    cold_cmds: list[tuple[float, float]] = []
    cold_skipped: str | None = "--no-cold" if args.no_cold else None
    try:
        if not args.no_cold:
            print("cold (page cache dropped before each measurement):", flush=True)
            for r in range(args.repeats):
                suffix = f" #{r + 1}" if args.repeats > 1 else ""
                why = drop_caches()
                if why:
                    cold_skipped = why
                    print(f"  SKIPPING cold numbers: {why}", flush=True)
                    break
                time.sleep(args.settle)
                cold_reads.append(read(f"cold read of the bytes{suffix}"))
                drop_caches()
                time.sleep(args.settle)
                cold_direct.append(read(f"cold O_DIRECT read of the bytes{suffix}", read_bytes_direct))
                if not args.read_only:
                    drop_caches()
                    time.sleep(args.settle)
                    cold_cmds.append(command(f"cold command{suffix}"))

        print("warm (files in the page cache):", flush=True)
        read_bytes(files)  # prime: whatever was evicted comes back (untimed)
        resident = resident_bytes(files)
        if resident is not None:
            print(f"  page cache holds {resident / total_bytes:.1%} of the files before the warm rounds", flush=True)
            if resident < 0.99 * total_bytes:
                print("  WARNING: not all of the files are cached: warm numbers are partly cold", flush=True)
        warm_reads: list[float] = []
        warm_cmds: list[tuple[float, float]] = []
        for r in range(warm_rounds):
            warm_reads.append(read(f"warm read of the bytes #{r + 1}"))
            if not args.read_only:
                warm_cmds.append(command(f"warm command #{r + 1}"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    # ---- report -------------------------------------------------------------------------------------------------
    def med(xs: list[float]) -> float | None:
        return statistics.median(xs) if xs else None

    cold_read_med = med(cold_reads)
    warm_read_med = med(warm_reads)
    table: list[tuple[str, float | None, float | None, float | None]] = []
    for i, s in enumerate(cold_reads):  # in the order measured
        suffix = f" #{i + 1}" if len(cold_reads) > 1 else ""
        table.append((f"cold read of the bytes{suffix}", s, 1.0, None))
        if i < len(cold_direct):
            table.append((f"cold O_DIRECT read of the bytes{suffix}", cold_direct[i], cold_direct[i] / s, None))
        if i < len(cold_cmds):
            table.append((f"cold command{suffix}", cold_cmds[i][0], cold_cmds[i][0] / s, cold_cmds[i][1]))
    for i, s in enumerate(warm_reads):  # in the order measured: read, command, read, command, ...
        table.append((f"warm read of the bytes #{i + 1}", s, 1.0, None))
        if i < len(warm_cmds):
            table.append((f"warm command #{i + 1}", warm_cmds[i][0], warm_cmds[i][0] / s, warm_cmds[i][1]))
    table.append(("warm read of the bytes, median", warm_read_med, 1.0, None))
    if warm_cmds:
        table.append(("warm command, median", med([s for s, _ in warm_cmds]),
                      med([s for s, _ in warm_cmds]) / warm_read_med, None))
    if len(cold_reads) > 1:
        table.append(("cold read of the bytes, median", cold_read_med, 1.0, None))
        if cold_cmds:
            table.append(("cold command, median", med([s for s, _ in cold_cmds]),
                          med([s for s, _ in cold_cmds]) / cold_read_med, None))

    print()
    print(f"{total_bytes / 1e9:.2f} GB in {len(files)} files; targets: {' '.join(args.targets)}; "
          f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    cpu_of = {r["measurement"]: r["cpu_seconds"] for r in rows}
    print("| measurement | seconds | ratio to read of bytes | peak RSS MB (2^20 B) | CPU s (user+sys) |")
    print("|---|---:|---:|---:|---:|")
    for label, s, ratio, rss in table:
        print(f"| {label} | {fmt(s)} | {fmt(ratio)} | {fmt(rss, 0)} | {fmt(cpu_of.get(label), 1)} |")

    checks: list[tuple[str, str, str, str]] = []
    if not args.read_only:
        if cold_cmds:
            cold_ratio = med([s for s, _ in cold_cmds]) / cold_read_med
            checks.append(("cold ratio", f"<= {TARGETS['cold_ratio']}", f"{cold_ratio:.2f}",
                           "PASS" if cold_ratio <= TARGETS["cold_ratio"] else "FAIL"))
            direct_ratio = med([s for s, _ in cold_cmds]) / med(cold_direct)
            checks.append(("cold ratio vs the O_DIRECT read (stricter floor)", f"<= {TARGETS['cold_ratio']}",
                           f"{direct_ratio:.2f}", "PASS" if direct_ratio <= TARGETS["cold_ratio"] else "FAIL"))
        else:
            checks.append(("cold ratio", f"<= {TARGETS['cold_ratio']}", "not measured", f"SKIPPED ({cold_skipped})"))
        if warm_cmds:
            warm_ratio = med([s for s, _ in warm_cmds]) / warm_read_med
            checks.append(("warm ratio (median/median)", f"<= {TARGETS['warm_ratio']}", f"{warm_ratio:.2f}",
                           "PASS" if warm_ratio <= TARGETS["warm_ratio"] else "FAIL"))
        peak = max(rss for _, rss in cold_cmds + warm_cmds)
        checks.append(("peak RSS MB (max over runs)", f"<= {TARGETS['peak_rss_mb']:.0f}", f"{peak:.0f}",
                       "PASS" if peak <= TARGETS["peak_rss_mb"] else "FAIL"))
        checks.append(("command exit status", "0 every run", "ok" if not failures else f"{len(failures)} failed",
                       "PASS" if not failures else "FAIL"))
        print()
        print("| target | limit | measured | result |")
        print("|---|---|---:|---|")
        for c in checks:
            print("| " + " | ".join(c) + " |")
    elif cold_skipped and not args.no_cold:
        print(f"\ncold numbers skipped: {cold_skipped}")

    cold_cpu = [r["cpu_seconds"] / r["seconds"] for r in rows if r["measurement"].startswith("cold read")]
    if cold_cpu and max(cold_cpu) > 0.5:
        print(f"\nNOTE: the cold reads kept a CPU busy {max(cold_cpu):.0%} of the time. In a VM, memory that the "
              "cache drop frees can be handed back to the host (virtio_balloon free page reporting) and is "
              "faulted back in as it is reused, which costs guest CPU and varies from run to run (13-33 s for the "
              "same 14 GB on the machine this was written on). Use --repeats 3 or more and read the medians.")
    if warnings:
        print("\nWARNING: other processes used the CPUs during some measurements (see above); rerun on a quiet "
              "machine before trusting the ratios")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": platform.node(),
            "cpus": os.cpu_count(), "mem_total": mem.get("MemTotal"), "checkpoint": str(checkpoint),
            "bytes": total_bytes, "command": None if args.read_only else cmd_template, "targets": args.targets,
            "rows": rows, "checks": checks, "cold_skipped": cold_skipped, "failures": failures,
            "warnings": warnings,
        }, indent=2) + "\n")
    return 1 if failures or any(c[3] == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
