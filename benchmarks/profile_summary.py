"""Sum up a py-spy profile in collapsed-stack form (``py-spy record --format raw``).

    python benchmarks/profile_summary.py router-nonstream-c64.txt [--top 25]

benchmarks/overhead.py writes such files with ``--profile DIR --profile-format raw``.
Prints where the samples are: by part of the stack (the leaf frame's file
sorted into uvicorn's protocol, the event loop, our proxy, the upstream client,
JSON, logging, metrics, ...: "self" time, each sample counted once) and, for the
same parts, the share of samples with that part anywhere on the stack
("inclusive"); then the functions with the most self samples. Without py-spy's
``--native``, time in C code (uvloop's loop, httptools' parser, a socket send) is
counted in the Python frame that called it: time in the loop itself shows as
the frame running the loop (asyncio's runner or uvloop's run).
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

#: (part, pattern on a frame's "function (file:line)"), first match wins; order matters.
PARTS: list[tuple[str, str]] = [
    ("access log / logging", r"router/(observe/)?accesslog\.py|router/server/(http/)?logs\.py|/logging/"),
    ("metrics (prometheus_client)", r"prometheus_client/|router/(observe/)?metrics\.py"),
    ("traffic stats / events", r"router/(observe/)?(traffic|events)\.py"),
    ("residency / sleep manager / lifecycle", r"router/((server|supervision)/(\w+/)?)?(residency|idle|lifecycle|state|processes)\.py"),
    ("replica choice / affinity / breaker", r"router/(server/(\w+/)?)?(replica|affinity|health|models)\.py"),
    ("auth", r"router/(server/(\w+/)?)?auth\.py"),
    ("multipart / forms", r"router/(server/(\w+/)?)?forms\.py|multipart"),
    ("upstream client (router/server/fleet/upstream.py)", r"router/(server/(\w+/)?)?upstream\.py"),
    ("proxy (router/server/proxy/forward.py)", r"router/(server/(\w+/)?)?(proxy|forward)\.py"),
    ("other router code", r"/router/"),
    ("JSON (orjson/json)", r"orjson|/json/"),
    ("starlette (routing, requests, responses)", r"starlette/"),
    ("uvicorn httptools protocol", r"uvicorn/protocols/"),
    ("uvicorn other (server, middleware, config)", r"uvicorn/"),
    ("asyncio tasks / futures / streams", r"asyncio/(tasks|futures|streams|locks|queues|timeouts|base_events)\.py"),
    ("event loop (uvloop run, epoll, socket I/O)", r"uvloop/|asyncio/runners\.py|\(<string>|run_until_complete|run_forever"),
    ("anyio", r"anyio/"),
]


def part(frame: str) -> str:
    for name, pattern in PARTS:
        if re.search(pattern, frame):
            return name
    return "other: " + (re.search(r"\(([^:)]*)", frame) or re.search(r"(.*)", frame)).group(1).rsplit("/", 2)[-1]


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
            stacks.append((frames, int(count)))
    return stacks


def summary(path: Path, top: int = 25) -> str:
    stacks = load(path)
    total = sum(n for _, n in stacks) or 1
    self_parts, incl_parts, self_funcs = Counter(), Counter(), Counter()
    for frames, n in stacks:
        if not frames:
            continue
        self_parts[part(frames[-1])] += n
        self_funcs[frames[-1]] += n
        for p in {part(f) for f in frames}:
            incl_parts[p] += n
    out = [f"{path.name}: {total} samples", f"{'part of the stack':58} {'self':>7} {'inclusive':>9}"]
    for p, n in self_parts.most_common():
        out.append(f"{p:58} {n / total:7.1%} {incl_parts[p] / total:9.1%}")
    out.append(f"\ntop {top} functions by self samples")
    for f, n in self_funcs.most_common(top):
        out.append(f"{n / total:6.1%}  {f[:150]}")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    print("\n\n".join(summary(f, args.top) for f in args.files))


if __name__ == "__main__":
    main()
