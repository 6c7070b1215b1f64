#!/usr/bin/env python3
"""luapool peer job (scripts/bench/peers.lua): fetch URLs on Python's
ThreadPoolExecutor and count body bytes.

usage: io.py --workers N --urls FILE [--client requests|urllib]
The client is requests.get(url).content (as the reference job does: a new
connection per call) when requests is importable or asked for, else the
standard library's urllib.request.  Prints the number of URLs and the
total body length.
"""
import argparse
import concurrent.futures
import sys


def make_fetch(client):
    if client == "requests":
        import requests

        def fetch(url):
            return len(requests.get(url).content)
    else:
        import urllib.request

        def fetch(url):
            with urllib.request.urlopen(url) as response:
                return len(response.read())
    return fetch


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--urls", required=True)
    parser.add_argument("--client", choices=["requests", "urllib"])
    args = parser.parse_args(argv)
    client = args.client
    if client is None:
        try:
            import requests  # noqa: F401
            client = "requests"
        except ImportError:
            client = "urllib"
    with open(args.urls) as f:
        urls = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    fetch = make_fetch(client)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.workers) as ex:
        lengths = list(ex.map(fetch, urls))
    print(f"{client}: {len(lengths)} urls, {sum(lengths)} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
