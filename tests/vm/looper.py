"""The reload test's workload: opens files denied in both policies in a tight loop, then checks.

Usage: python3 looper.py DIR. Driven by marker files in DIR (the test creates them):
  loop until DIR/stop: open each of DIR/loop_paths.json's paths, count attempts and successes;
  then write DIR/loop.json, open DIR/final_paths.json's paths (and its connect), write
  DIR/final.json; wait for DIR/bad-done, then do the final checks again into DIR/after_bad.json.
Kept dependency-free: it runs under the monitor inside guests.
"""
import errno
import json
import os
import socket
import sys
import time


def try_open(path):
    try:
        os.close(os.open(path, os.O_RDONLY))
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def try_connect(port):
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()


def checks(spec):
    out = {p: try_open(p) for p in spec["paths"]}
    if spec.get("connect"):
        out[f"connect:{spec['connect']}"] = try_connect(spec["connect"])
    return out


def write(path, data):
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.05)


def main(d):
    with open(os.path.join(d, "loop_paths.json")) as f:
        paths = json.load(f)
    attempts = dict.fromkeys(paths, 0)
    opened = dict.fromkeys(paths, 0)
    stop = os.path.join(d, "stop")
    started = False
    n = 0
    while True:
        for p in paths:
            attempts[p] += 1
            try:
                os.close(os.open(p, os.O_RDONLY))
                opened[p] += 1
            except OSError:
                pass
        n += 1
        if n % 64 == 0:
            if not started:
                write(os.path.join(d, "looping.json"), {"pid": os.getpid()})
                started = True
            if os.path.exists(stop):
                break
    write(os.path.join(d, "loop.json"), {"attempts": attempts, "opened": opened})
    with open(os.path.join(d, "final_paths.json")) as f:
        spec = json.load(f)
    write(os.path.join(d, "final.json"), checks(spec))
    wait_for(os.path.join(d, "bad-done"))
    write(os.path.join(d, "after_bad.json"), checks(spec))


if __name__ == "__main__":
    main(sys.argv[1])
