#!/usr/bin/env python3
"""luapool peer job (scripts/bench/peers.lua): per-task overhead of Python's
executors on no-op tasks, pool start and stop included.

usage: overhead.py threads-submit N        N x submit, then result() each
       overhead.py processes-map N CHUNK   ProcessPoolExecutor.map, chunksize CHUNK
Both use 2 workers, as luapool's side of the comparison does.
"""
import concurrent.futures
import sys


def noop(x):
    return x


def main(argv):
    mode, n = argv[0], int(argv[1])
    if mode == "threads-submit":
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as ex:
            futures = [ex.submit(noop, 1) for _ in range(n)]
            results = [f.result() for f in futures]
    elif mode == "processes-map":
        chunk = int(argv[2])
        with concurrent.futures.ProcessPoolExecutor(max_workers=2) as ex:
            results = list(ex.map(noop, [1] * n, chunksize=chunk))
    else:
        sys.exit(f"overhead.py: unknown mode {mode}")
    assert len(results) == n
    print(f"{mode}: {n} tasks")


if __name__ == "__main__":
    main(sys.argv[1:])
