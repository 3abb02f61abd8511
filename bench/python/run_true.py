"""The Python client's cost per command (run by testbus-bench python):
``host.run(["true"])`` over one held connection, N times in a row, then N
background runs at once from one process (the asyncio API); JSON on
stdout. Argument: N."""

import asyncio
import json
import sys
import time

from testbus import aio


def summary(ms):
    s = sorted(ms)

    def pick(q: float) -> float:
        return s[min(len(s) - 1, int(q * len(s)))]

    return {"n": len(s), "p50_ms": pick(0.5), "p99_ms": pick(0.99), "mean_ms": sum(s) / len(s)}


async def main(n: int) -> None:
    async with aio.Client() as client, client.create_test({"a": {"host": "host-0"}}, timeout=3600) as t:
        a = t.hosts["a"]
        await a.run(["true"])  # warm: the watch, the first exec
        each = []
        started = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            await a.run(["true"])
            each.append((time.perf_counter() - t0) * 1e3)
        sequential_s = time.perf_counter() - started
        started = time.perf_counter()
        procs = await asyncio.gather(*(a.run(["true"], background=True) for _ in range(n)))
        results = await asyncio.gather(*(p.wait() for p in procs))
        concurrent_s = time.perf_counter() - started
        failed = [r for r in results if not r.succeeded]
        if failed:
            kinds = sorted({(r.phase, r.reason, r.message[:120]) for r in failed})
            sys.exit(f"{len(failed)} of {n} background runs did not succeed: {kinds[:5]}")
    print(
        json.dumps(
            {
                "sequential": {**summary(each), "seconds": sequential_s, "runs_per_s": n / sequential_s},
                "concurrent": {"n": n, "seconds": concurrent_s, "runs_per_s": n / concurrent_s},
            }
        )
    )


asyncio.run(main(int(sys.argv[1])))
