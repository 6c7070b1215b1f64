#!/usr/bin/env python3
"""Start-up of luapool beside lua5.4 (issue 14's targets), whole commands.

usage: python3 scripts/bench/startup.py BIN [BIN...] [--rounds N]
Each round runs, in turn, `lua5.4 -e ''` and for every BIN: `BIN -e ''`, a
threadpool of 2 started, one task, closed, and the same on a processpool
(posix_spawn + waitpid: wall time); prints the medians, and each against
`lua5.4 -e ''` (targets: -e '' <= 1.5x; threadpool within 2 ms; processpool
<= 5 ms).  Give the binary before a change and after it to compare them in
the same run; each is spawned from its own path, so its process workers are
its own build."""
import os, statistics, sys, tempfile, time

args = sys.argv[1:]
rounds = 300
if "--rounds" in args:
    i = args.index("--rounds")
    rounds = int(args[i + 1])
    del args[i:i + 2]
if not args:
    sys.exit(__doc__)
scripts = {}
for kind in ("threadpool", "processpool"):
    fd, path = tempfile.mkstemp(suffix=".lua")
    os.write(fd, ("local p <close> = %s.new { max_workers = 2 }; "
                  "assert(p:submit(function() return 1 end):result() == 1)\n" % kind).encode())
    os.close(fd)
    scripts[kind] = path
cmds = {"lua5.4 -e ''": ["/usr/bin/lua5.4", "-e", ""]}
for b in args:
    cmds[f"{b} -e ''"] = [b, "-e", ""]
    for kind, path in scripts.items():
        cmds[f"{b} {kind} of 2, one task"] = [b, path]
times = {k: [] for k in cmds}
try:
    for _ in range(rounds):
        for k, c in cmds.items():
            t = time.perf_counter()
            pid = os.posix_spawn(c[0], c, os.environ)
            _, status = os.waitpid(pid, 0)
            if status != 0:
                sys.exit(f"{k}: exit status {status}")
            times[k].append((time.perf_counter() - t) * 1000)
finally:
    for path in scripts.values():
        os.remove(path)
base = statistics.median(times["lua5.4 -e ''"])
print(f"{rounds} rounds, medians; load {os.getloadavg()[0]:.2f}")
for k, v in times.items():
    m = statistics.median(v)
    print(f"{k:60s} {m:6.2f} ms  {m / base:5.2f}x  {m - base:+6.2f} ms")
