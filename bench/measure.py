#!/usr/bin/env python3
"""Runs one benchmark command and keeps its JSON line, noting how busy the rest of the machine was.

    measure.py --out FILE [--max-other-cores 0.3] [--wait-quiet 600] -- CMD ARGS...

Before each attempt it waits (up to --wait-quiet seconds) until the machine has been nearly idle
(at most --max-other-cores busy) for 3 s.

"Other cores" = (CPU time the whole machine spent busy, from /proc/stat) minus (CPU time of the
command and its children), divided by the command's wall time: the average number of cores that
something else used meanwhile (e.g. another engineer's `cargo build`). If it is above
--max-other-cores, the measurement counts as disturbed and is run once more; the less disturbed
of the two is kept. (The 1-minute load average at the start is recorded too, for reference.)

The command's last stdout line that parses as a JSON object is written to FILE, with `_wall_s`,
`_other_cores`, `_load1_before`, `_attempts` and `_disturbed` added.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def busy_seconds():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guest is inside user.
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / HZ


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def load1():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def wait_quiet(max_busy, max_wait):
    """Waits (up to max_wait seconds) until the machine has been nearly idle for 3 s."""
    t_end = time.monotonic() + max_wait
    while True:
        b0, t0 = busy_seconds(), time.monotonic()
        time.sleep(3)
        busy = (busy_seconds() - b0) / (time.monotonic() - t0)
        if busy <= max_busy:
            return busy
        if time.monotonic() > t_end:
            print(f"measure.py: machine still busy ({busy:.2f} cores) after {max_wait:.0f} s; measuring anyway",
                  file=sys.stderr)
            return busy
        time.sleep(7)


def attempt(cmd, a):
    busy_before = wait_quiet(a.max_other_cores, a.wait_quiet)
    l1 = load1()
    b0, c0, t0 = busy_seconds(), children_cpu(), time.monotonic()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    wall = time.monotonic() - t0
    b1, c1 = busy_seconds(), children_cpu()
    other = max(0.0, (b1 - b0) - (c1 - c0)) / max(wall, 1e-9)
    if p.returncode != 0:
        sys.stderr.write(p.stdout)
        sys.exit(f"measure.py: command failed with exit status {p.returncode}: {' '.join(cmd)}")
    obj = None
    for line in reversed(p.stdout.strip().splitlines()):
        try:
            v = json.loads(line)
        except ValueError:
            continue
        if isinstance(v, dict):
            obj = v
            break
    if obj is None:
        sys.stderr.write(p.stdout)
        sys.exit(f"measure.py: no JSON object in the output of: {' '.join(cmd)}")
    obj["_wall_s"] = round(wall, 2)
    obj["_other_cores"] = round(other, 3)
    obj["_load1_before"] = l1
    obj["_busy_cores_before"] = round(busy_before, 3)
    return obj


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-other-cores", type=float, default=float(os.environ.get("BENCH_MAX_OTHER_CORES", 0.3)))
    ap.add_argument("--wait-quiet", type=float, default=float(os.environ.get("BENCH_WAIT_QUIET", 600)),
                    help="seconds to wait for an idle machine before each attempt (0: do not wait)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        sys.exit("measure.py: no command")

    def disturbed(o):
        return o["_other_cores"] > a.max_other_cores

    best = attempt(cmd, a)
    attempts = 1
    if disturbed(best):
        print(f"measure.py: disturbed (other processes used {best['_other_cores']} cores meanwhile); "
              f"running once more", file=sys.stderr)
        again = attempt(cmd, a)
        attempts = 2
        if again["_other_cores"] <= best["_other_cores"] or not disturbed(again):
            best = again
    best["_attempts"] = attempts
    best["_disturbed"] = disturbed(best)
    with open(a.out, "w") as f:
        f.write(json.dumps(best) + "\n")


if __name__ == "__main__":
    main()
