#!/usr/bin/env python3
"""luapool peer job (scripts/bench/peers.lua): the CPU reference job on
Python's ProcessPoolExecutor, one worker per CPU.

usage: cpu.py N...
Prints one 'Calculation for N: RESULT' line per number, in input order.
"""
import concurrent.futures
import os
import sys


def sum_squares(n):
    result = 0
    for i in range(n):
        result += i * i
    return result


def main(argv):
    numbers = [int(a) for a in argv]
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count()) as ex:
        results = list(ex.map(sum_squares, numbers))
    for n, r in zip(numbers, results):
        print(f"Calculation for {n}: {r}")


if __name__ == "__main__":
    main(sys.argv[1:])
