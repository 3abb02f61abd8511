#!/usr/bin/env python3
"""Turns the JSON files of one hack/bench run into bench/results/NAME.json,
a readable NAME.md and, for a full run, docs/PERFORMANCE.md with its plots
(matplotlib, PNG in docs/img/).

usage: bench-report.py WORKDIR OUT_PREFIX PROFILE FULL(0|1)
       bench-report.py --from RESULT.json OUT_PREFIX
           renders a stored full run again (after bench/notes.md changed),
           keeping its date and figures
       bench-report.py --pools WORKDIR OUT_PREFIX
           keeps `hack/bench pools`' scenarios for the next full run
"""
import datetime
import json
import os
import platform
import subprocess
import sys



failed = {}  # scenario: the end of its error output


def load(name):
    p = os.path.join(work, name + ".json")
    if not os.path.exists(p):
        return None
    v = json.load(open(p))
    if isinstance(v, dict) and set(v) == {"error"}:
        failed[name] = v["error"]
        return None
    return v


def machine():
    model, mem = "", 0
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    return {"cpus": os.cpu_count(), "cpu": model, "memory_bytes": mem, "kernel": platform.release()}


if sys.argv[1] == "--pools":
    # `hack/bench pools`: the slow scenarios alone, kept for the next full
    # run's report.
    work, out = sys.argv[2], sys.argv[3]
    kept = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "scenarios": {}}
    for name in ["pools", "containers"]:
        v = load(name)
        if v is not None:
            kept["scenarios"][name] = v
    with open(out + ".json", "w") as f:
        json.dump(kept, f, indent=2)
        f.write("\n")
    sys.exit(0)

if sys.argv[1] == "--from":
    result = json.load(open(sys.argv[2]))
    out, profile, full = sys.argv[3], result["profile"], True
    scenarios = result["scenarios"]
else:
    work, out, profile, full = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    scenarios = {}
    for name in ["store", "link", "proxy", "run", "containment", "start", "throughput", "tls", "dashboard", "queue", "fanout", "fleet", "output", "files", "idle", "sync", "watches", "python", "pools", "containers"]:
        v = load(name)
        if v is not None:
            scenarios[name] = v
    # A full run leaves pools and containers to `hack/bench pools`: their
    # figures come from its last run, dated.
    pools_from = None
    if full and "pools" not in scenarios and os.path.exists("bench/results/pools.json"):
        kept = json.load(open("bench/results/pools.json"))
        for name, v in kept["scenarios"].items():
            scenarios.setdefault(name, v)
        pools_from = kept["date"]
    etcd_version = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    if "store" in scenarios:
        scenarios["store"] = {"etcd": etcd_version, "results": scenarios["store"]}
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "profile": profile,
        "machine": machine(),
        "pools_from": pools_from,
        "scenarios": scenarios,
    }
with open(out + ".json", "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")

m = result["machine"]
lines = [
    "# testbus benchmarks",
    "",
    "%s, %s build, on %d × %s, %.1f GiB, Linux %s."
    % (result["date"], profile, m["cpus"], m["cpu"], m["memory_bytes"] / 2**30, m["kernel"]),
]
targets = []  # (what, target, measured, met)
for name, err in (failed.items() if sys.argv[1] not in ("--from", "--pools") else []):
    lines += ["", "## %s: FAILED" % name, "", "```", err.strip()[-1500:], "```"]
    targets.append(("scenario `%s` ran" % name, "yes", "failed", "**missed**"))


def target(what, goal, measured, met):
    targets.append((what, goal, measured, "met" if met else "**missed**"))


def ms(v):
    return "%.1f" % v


s = scenarios.get("run")
if s:
    lines += ["", "## One command on one host (medians of %d, interleaved)" % s["testbus"]["n"], "",
              "| way | p50 (ms) | p99 (ms) |", "|---|---:|---:|"]
    for k, label in [("testbus", "testbusctl run --host H -- true"), ("ssh", "ssh H true (fresh connection)"),
                     ("ssh_controlmaster", "ssh H true (ControlMaster)"), ("local_sh", "sh -c true (local)")]:
        lines.append("| %s | %s | %s |" % (label, ms(s[k]["p50_ms"]), ms(s[k]["p99_ms"])))
    r = s["ratios"]
    lines += ["", "testbus / ControlMaster: %.2f; fresh ssh / testbus: %.1f" % (r["testbus_over_controlmaster"], r["ssh_fresh_over_testbus"])]
    target("`run -- true` against ssh ControlMaster", "≤ 1.0×", "%.2f×" % r["testbus_over_controlmaster"], r["testbus_over_controlmaster"] <= 1.0)
    target("`run -- true` against fresh ssh", "≥ 10× faster", "%.1f×" % r["ssh_fresh_over_testbus"], r["ssh_fresh_over_testbus"] >= 10)

s = scenarios.get("containment")
if s:
    lines += ["", "## One command under each containment (the same footing: TLS, namespaces; medians of %d)" % s["cgroup"]["n"], "",
              "| agent's `--containment` | p50 (ms) | p99 (ms) |", "|---|---:|---:|"]
    for k, label in [("cgroup", "cgroup (the default)"), ("process-group", "process-group"), ("pid-namespace", "pid-namespace")]:
        lines.append("| %s | %s | %s |" % (label, ms(s[k]["p50_ms"]), ms(s[k]["p99_ms"])))

s = scenarios.get("python")
if s:
    p, seq, conc, ctl = s["python"], s["python"]["sequential"], s["python"]["concurrent"], s["testbusctl_run"]
    lines += ["", "## The Python client (one held connection, TLS)", "",
              "| | p50 (ms) | p99 (ms) | runs/s |", "|---|---:|---:|---:|",
              "| `host.run([\"true\"])`, %d in a row | %s | %s | %.0f |" % (seq["n"], ms(seq["p50_ms"]), ms(seq["p99_ms"]), seq["runs_per_s"]),
              "| `host.run([\"true\"], background=True)`, %d at once (asyncio) | | | %.0f |" % (conc["n"], conc["runs_per_s"]),
              "| `testbusctl run --host H -- true` (same cluster) | %s | %s | |" % (ms(ctl["p50_ms"]), ms(ctl["p99_ms"]))]
    target("Python `host.run([\"true\"])` against `testbusctl run -- true`", "≤ 1×", "%.2f×" % s["python_over_ctl_run"], s["python_over_ctl_run"] <= 1.0)

s = scenarios.get("start")
if s:
    d = s["to_last_running"]
    lines += ["", "## Test start latency (%d runs, two roles on three agents)" % s["runs"], "",
              "create returned → last process running: p50 %s ms, p99 %s ms" % (ms(d["p50_ms"]), ms(d["p99_ms"]))]
    target("test start p50", "≤ 20 ms", ms(d["p50_ms"]) + " ms", d["p50_ms"] <= 20)
    target("test start p99", "≤ 100 ms", ms(d["p99_ms"]) + " ms", d["p99_ms"] <= 100)

s = scenarios.get("throughput")
if s:
    rounds = s.get("rounds", [s])
    lines += ["", "## Throughput", "",
              "%d processes over %d agents in %.2f s: **%.0f processes/s** end to end (the median of %d rounds on one cluster)" % (s["processes"], s["agents"], s["seconds"], s["processes_per_s"], len(rounds)),
              "", "| round | processes/s | control plane CPU ms per process | agents CPU ms per process |", "|---:|---:|---:|---:|"]
    for i, r in enumerate(rounds):
        lines.append("| %d | %.0f | %.2f | %.2f |" % (i + 1, r["processes_per_s"], 1e3 * r["cp_cpu_seconds"] / r["processes"], 1e3 * r["agents_cpu_seconds"] / r["processes"]))
    target("processes/s end to end (%d agents)" % s["agents"], "≥ 1,500", "%.0f" % s["processes_per_s"], s["processes_per_s"] >= 1500)
    cp_ms, ag_ms = 1e3 * s["cp_cpu_seconds"] / s["processes"], 1e3 * s["agents_cpu_seconds"] / s["processes"]
    target("control plane CPU per process", "≤ 0.3 ms", "%.2f ms" % cp_ms, cp_ms <= 0.3)
    target("agent CPU per process (with its keeper)", "≤ 0.4 ms", "%.2f ms" % ag_ms, ag_ms <= 0.4)

s = scenarios.get("tls")
if s:
    i, t, r = s["insecure"], s["tls"], s["ratios"]
    lines += ["", "## TLS against --insecure (every process on loopback, one cluster each)", "",
              "| | --insecure | TLS |", "|---|---:|---:|",
              "| `testbusctl run -- true` over TCP, p50 ms (a new connection per command) | %s | %s |" % (ms(i["run_true"]["p50_ms"]), ms(t["run_true"]["p50_ms"])),
              "| processes/s, %d agents | %.0f | %.0f |" % (t["throughput"]["agents"], i["throughput"]["processes_per_s"], t["throughput"]["processes_per_s"])]
    target("run -- true with TLS against --insecure", "≤ 1.10×", "%.2f×" % r["run_true_tls_over_insecure"], r["run_true_tls_over_insecure"] <= 1.10)
    target("throughput cost of TLS", "≤ 1.10×", "%.2f×" % r["throughput_insecure_over_tls"], r["throughput_insecure_over_tls"] <= 1.10)

s = scenarios.get("dashboard")
if s:
    lines += ["", "## Dashboard and metrics (%d hosts, %d tests written to the API; loopback, no TLS)" % (s["hosts"], s["tests"]), "",
              "| | p50 ms | p99 ms |", "|---|---:|---:|",
              "| overview, server time (GET / on a new connection, %d KiB) | %s | %s |" % (s["overview_bytes"] // 1024, ms(s["overview"]["p50_ms"]), ms(s["overview"]["p99_ms"])),
              "| a test stored → its `change` event (100 ms of it is the debounce) | %s | %s |" % (ms(s["change_to_event"]["p50_ms"]), ms(s["change_to_event"]["p99_ms"])),
              "| a test stored → the refreshed page fragment received | %s | %s |" % (ms(s["change_to_fragment"]["p50_ms"]), ms(s["change_to_fragment"]["p99_ms"])),
              "| `/metrics` scrape | %s | %s |" % (ms(s["metrics_scrape"]["p50_ms"]), ms(s["metrics_scrape"]["p99_ms"]))]
    target("dashboard overview, server time, p99", "≤ 200 ms", ms(s["overview"]["p99_ms"]) + " ms", s["overview"]["p99_ms"] <= 200)
    target("a change on the page after it is stored, p99", "≤ 500 ms", ms(s["change_to_fragment"]["p99_ms"]) + " ms", s["change_to_fragment"]["p99_ms"] <= 500)
    target("metrics scrape, p99", "≤ 50 ms", ms(s["metrics_scrape"]["p99_ms"]) + " ms", s["metrics_scrape"]["p99_ms"] <= 50)

s = scenarios.get("queue")
if s:
    lines += ["", "## The queue: tests that cannot run, waiting (TLS, one agent)", "",
              "| waiting | all say why (s) | control plane CPU, idle (cores) | a runnable test behind them, `run -- true` (s) | deleting all, until none is stored (s) | control plane RSS after (MiB) |",
              "|---:|---:|---:|---:|---:|---:|"]
    for r in s["rows"]:
        lines.append("| %d | %.1f | %.3f | %.2f | %.1f | %.0f |" % (r["waiting"], r["settle_s"], r["idle_cpu_cores"], r["runnable_start_s"], r["delete_all_s"], r.get("cp_rss_mib_after_delete", 0)))
    worst = max(s["rows"], key=lambda r: r["waiting"])
    target("a runnable test behind %d waiting ones" % worst["waiting"], "≤ 1 s", "%.2f s" % worst["runnable_start_s"], worst["runnable_start_s"] <= 1.0)

s = scenarios.get("fanout")
if s:
    lines += ["", "## Fan-out to simulated agents (%d events each)" % s["events_per_size"], "",
              "| agents | delivery p50 (ms) | p99 (ms) | control plane RSS (MiB) |", "|---:|---:|---:|---:|"]
    for r in s["results"]:
        lines.append("| %d | %s | %s | %.0f |" % (r["agents"], ms(r["delivery"]["p50_ms"]), ms(r["delivery"]["p99_ms"]), r["cp_rss_bytes_after"] / 2**20))
    rs = s["results"]
    if len(rs) >= 2:
        ratio = rs[-1]["delivery"]["p99_ms"] / max(rs[0]["delivery"]["p99_ms"], 1e-9)
        target("fan-out p99 at %d agents against %d" % (rs[-1]["agents"], rs[0]["agents"]), "≤ 2×", "%.2f×" % ratio, ratio <= 2)
        mem = rs[-1]["cp_rss_bytes_after"] / 2**20
        target("control plane memory at %d agents" % rs[-1]["agents"], "≤ 1 GiB", "%.0f MiB" % mem, mem <= 1024)

s = scenarios.get("fleet")
if s:
    lines += ["", "## A fleet of agent identities (TLS, a certificate each)", "",
              "| agents | lease (s) | idle CPU (cores) | RSS (MiB) | renewal p50 / p99 (ms) | test over (hosts) | create to Running p50 / p99 (ms) | rounds not all Running in 30 s |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in s["results"]:
        c = r["create_to_running"]
        lines.append("| %d | %d | %.2f | %.0f | %s / %s | %d | %s / %s | %d |" % (
            r["agents"], r["lease_seconds"], r["cp_idle_cpu_cores"], r["cp_rss_bytes_idle"] / 2**20,
            ms(r["renewal"]["p50_ms"]), ms(r["renewal"]["p99_ms"]), r["test_hosts"],
            ms(c["p50_ms"]) if c["n"] else "-", ms(c["p99_ms"]) if c["n"] else "-", len(r["rounds_not_all_running"])))
    # The targets are for 10 s leases (the default), at the largest size.
    tens = [r for r in s["results"] if r["lease_seconds"] == 10] or s["results"]
    big = max(tens, key=lambda r: r["agents"])
    target("control plane idle CPU at %d agents" % big["agents"], "≤ 0.5 core", "%.2f" % big["cp_idle_cpu_cores"], big["cp_idle_cpu_cores"] <= 0.5)
    target("control plane RSS at %d agents" % big["agents"], "≤ 500 MB", "%.0f MiB" % (big["cp_rss_bytes_idle"] / 2**20), big["cp_rss_bytes_idle"] <= 500e6)
    target("lease renewal p99 at %d agents" % big["agents"], "≤ 100 ms", ms(big["renewal"]["p99_ms"]) + " ms", big["renewal"]["p99_ms"] <= 100)
    ok = big["create_to_running"]["n"] > 0 and not big["rounds_not_all_running"] and big["create_to_running"]["p99_ms"] <= 1000
    target("a %d-host test, create to all Running p99, at %d agents" % (big["test_hosts"], big["agents"]), "≤ 1 s",
           (ms(big["create_to_running"]["p99_ms"]) + " ms") if big["create_to_running"]["n"] else "never", ok)

s = scenarios.get("output")
if s:
    lines += ["", "## Output", "",
              "%d MB from a process's stdout: %.0f MB/s through `testbusctl run`, %.0f MB/s read back by `testbusctl logs`"
              % (s["bytes"] / 1e6, s["run_mb_per_s"], s["logs_mb_per_s"])]
    target("output to the CLI", "≥ 200 MB/s", "%.0f MB/s" % s["run_mb_per_s"], s["run_mb_per_s"] >= 200)

s = scenarios.get("files")
if s:
    r0, r1 = s["rounds"]
    lines += ["", "## Files", "",
              "A %d MiB file to %d hosts: %.1f s, %d MiB to agents; the same file again: %.1f s, %d bytes to agents"
              % (s["file_bytes"] >> 20, s["hosts"], r0["seconds"], r0["bytes_to_agents"] >> 20, r1["seconds"], r1["bytes_to_agents"])]
    target("a cached blob is never moved twice", "0 bytes", "%d bytes" % r1["bytes_to_agents"],
           r1["bytes_to_agents"] == 0 and r0["bytes_to_agents"] == s["file_bytes"] * s["hosts"])

s = scenarios.get("idle")
if s:
    a, c = s["agent_rss_bytes"] / 2**20, s["cp_rss_bytes"] / 2**20
    lines += ["", "## Idle footprint", "", "agent %.1f MiB, control plane %.1f MiB resident" % (a, c)]
    target("idle agent", "≤ 15 MB", "%.1f MiB" % a, a * 1.048576 <= 15)
    target("idle control plane", "≤ 50 MB", "%.1f MiB" % c, c * 1.048576 <= 50)

s = scenarios.get("store")
if s:
    by = {r["store"]: r for r in s["results"]}
    e, d = by["embedded"], by.get("etcd")
    lines += ["", "## Store: embedded against etcd (%s), same disk" % s["etcd"], "",
              "| | embedded | etcd | embedded / etcd |", "|---|---:|---:|---:|"]
    for label, key, fmt in [("writes/s, 1 writer", "writes_per_s_1_writer", "{:.0f}"),
                            ("writes/s, %d writers" % e["writers"], "writes_per_s", "{:.0f}"),
                            ("watch events/s", "watch_events_per_s", "{:.0f}"),
                            ("watch delay p50 (ms)", "watch_delay_ms_p50", "{:.2f}"),
                            ("watch delay p99 (ms)", "watch_delay_ms_p99", "{:.2f}")]:
        ratio = "%.2f" % (e[key] / d[key]) if d and d[key] else "-"
        lines.append("| %s | %s | %s | %s |" % (label, fmt.format(e[key]), fmt.format(d[key]) if d else "-", ratio))
    if d:
        target("embedded writes/s against single-node etcd", "≥ 1×", "%.2f×" % (e["writes_per_s"] / d["writes_per_s"]), e["writes_per_s"] >= d["writes_per_s"])

s = scenarios.get("link")
if s:
    lines += ["", "## Serial link: %d baud, paced (line rate %d B/s)" % (s["baud"], s["baud"] // 10), "",
              "| byte error rate | B/s | of line rate |", "|---:|---:|---:|"]
    for r in s["results"]:
        lines.append("| %g | %.0f | %.1f%% |" % (r["byte_error_rate"], r["bytes_per_s"], 100 * r["fraction_of_line_rate"]))
        goal = 0.9 if r["byte_error_rate"] == 0 else 0.8
        target("serial link at error rate %g" % r["byte_error_rate"], "≥ %d%% of line rate" % (goal * 100),
               "%.1f%%" % (100 * r["fraction_of_line_rate"]), r["fraction_of_line_rate"] >= goal)

s = scenarios.get("proxy")
if s:
    by = {r["via"]: r for r in s["results"]}
    d = by["direct"]
    hops = {"direct": 0, "socat": 1, "relay": 1, "relay-mux-2-hops": 2}
    lines += ["", "## TCP through relays (%d MiB, %d round trips of 1 byte)" % (s["mb"], s["pings"]), "",
              "| via | MB/s | RTT p50 (µs) | RTT p99 (µs) | added per hop, p50 (µs) |", "|---|---:|---:|---:|---:|"]
    for name in ["direct", "socat", "relay", "relay-mux-2-hops"]:
        r = by[name]
        added = "-" if not hops[name] else "%.0f" % ((r["rtt_us_p50"] - d["rtt_us_p50"]) / hops[name])
        lines.append("| %s | %.0f | %.0f | %.0f | %s |" % (name, r["mb_per_s"], r["rtt_us_p50"], r["rtt_us_p99"], added))
    ratio = by["relay"]["mb_per_s"] / by["socat"]["mb_per_s"]
    added = by["relay"]["rtt_us_p50"] - d["rtt_us_p50"]
    target("relay throughput against socat", "≥ 0.8×", "%.2f×" % ratio, ratio >= 0.8)
    target("latency added per relay hop", "≤ 100 µs", "%.0f µs" % added, added <= 100)

s = scenarios.get("pools")
if s:
    b, w, c = s["bare_agent_start"], s["warm_pool_start"], s["clean_again"]
    par = s["parallel_ms"]
    lines += ["", "## HostPools: libvirt guests under QEMU (TCG here)", ""]
    if result.get("pools_from"):
        lines += ["From the run of %s (a full run leaves the slow scenarios to `hack/bench pools`)." % result["pools_from"], ""]
    lines += [
              "| | ms |", "|---|---:|",
              "| test start on a bare agent, p50 of %d | %s |" % (b["n"], ms(b["p50_ms"])),
              "| test start on a warm pool (guest Ready), p50 of %d | %s |" % (w["n"], ms(w["p50_ms"])),
              "| test start from zero guests (a fresh boot) | %s |" % ms(s["cold_pool_start_ms"]),
              "| release → guest clean and Ready again, p50 of %d | %s |" % (c["n"], ms(c["p50_ms"]))]
    for k in sorted(par, key=int):
        lines.append("| %s guests for one test, from zero | %s |" % (k, ms(par[k])))
    ratio = w["p50_ms"] / max(b["p50_ms"], 1e-9)
    target("warm pool test start against a bare agent", "≤ 2×", "%.1f×" % ratio, ratio <= 2)
    target("guest clean again after a test", "≤ 3 s", "%.1f s" % (c["p50_ms"] / 1e3), c["p50_ms"] <= 3000)
    big = max(par, key=int)
    pr = par[big] / max(par["1"], 1e-9)
    target("%s guests in parallel against one" % big, "≤ 2×", "%.2f×" % pr, pr <= 2)

s = scenarios.get("containers")
if s:
    b, w, c = s["bare_agent_start"], s["warm_pool_start"], s["clean_again"]
    lines += ["", "## HostPools: podman containers", "",
              "| | ms |", "|---|---:|",
              "| test start on a bare agent, p50 of %d | %s |" % (b["n"], ms(b["p50_ms"])),
              "| test start on a warm pool (container Ready), p50 of %d | %s |" % (w["n"], ms(w["p50_ms"])),
              "| test start from zero containers | %s |" % ms(s["cold_pool_start_ms"]),
              "| release → a new container clean and Ready, p50 of %d | %s |" % (c["n"], ms(c["p50_ms"])),
              "| 4 containers for one test, from zero | %s |" % ms(s["four_from_zero_ms"])]
    r = s["warm_over_bare"]
    target("container pool test start when warm against a bare agent", "≤ 1.5×", "%.2f×" % r, r <= 1.5)
    target("4 containers from zero", "≤ 2 s", "%.2f s" % (s["four_from_zero_ms"] / 1e3), s["four_from_zero_ms"] <= 2000)
    target("release → container clean again", "≤ 1 s", "%.2f s" % (c["p50_ms"] / 1e3), c["p50_ms"] <= 1000)

report = lines[:3] + ["", "## Targets", "", "| what | target | measured | |", "|---|---|---|---|"] + \
    ["| %s | %s | %s | %s |" % t for t in targets] + lines[3:]
with open(out + ".md", "w") as f:
    f.write("\n".join(report) + "\n")
print("\n".join(report))


# --- plots (full runs only) -------------------------------------------------

def chart(path, title, xlabel, ylabel, series, logx=False, logy=False):
    """series: [(label, [(x, y), ...])]; a line per series, drawn with
    matplotlib into a PNG (imported here: only full runs draw)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, pts in series:
        pts = [p for p in pts if (not logx or p[0] > 0) and (not logy or p[1] > 0)]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=label, marker="o" if len(pts) < 10 else None, linewidth=1.8)
    if logx:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
    if logy:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def cdf(samples):
    n = len(samples)
    return [(v, (i + 1) / n) for i, v in enumerate(sorted(samples))]


if full:
    os.makedirs("docs/img", exist_ok=True)
    plots = []
    s = scenarios.get("run")
    if s:
        chart("docs/img/run-latency-cdf.png", "One command on one host: latency CDF", "ms (log scale)", "fraction of runs",
              [(k, cdf(s[k]["samples_ms"])) for k in ["local_sh", "ssh_controlmaster", "testbus", "ssh"]], logx=True)
        plots.append(("run latency CDF", "run-latency-cdf.png"))
    s = scenarios.get("start")
    if s:
        chart("docs/img/start-latency-cdf.png", "Test start latency: CDF", "ms from create to the last process running",
              "fraction of tests", [("create → last process running", cdf(s["to_last_running"]["samples_ms"]))])
        plots.append(("test start latency CDF", "start-latency-cdf.png"))
    s = scenarios.get("fanout")
    if s:
        rs = s["results"]
        chart("docs/img/fanout-latency.png", "Watch delivery against agents", "agents (log scale)", "ms",
              [("p50", [(r["agents"], r["delivery"]["p50_ms"]) for r in rs]),
               ("p99", [(r["agents"], r["delivery"]["p99_ms"]) for r in rs])], logx=True)
        chart("docs/img/fanout-memory.png", "Control plane memory against simulated agents", "agents (log scale)", "MiB resident",
              [("control plane", [(r["agents"], r["cp_rss_bytes_after"] / 2**20) for r in rs])], logx=True)
        plots += [("fan-out delivery latency", "fanout-latency.png"), ("fan-out memory", "fanout-memory.png")]
    s = scenarios.get("fleet")
    if s:
        for lease in sorted({r["lease_seconds"] for r in s["results"]}):
            rs = [r for r in s["results"] if r["lease_seconds"] == lease]
            if len(rs) < 2:
                continue
            chart("docs/img/fleet-%ds.png" % lease, "A fleet of TLS agents, %d s leases: the control plane" % lease,
                  "agents (log scale)", "cores / GiB / s",
                  [("idle CPU (cores)", [(r["agents"], r["cp_idle_cpu_cores"]) for r in rs]),
                   ("RSS (GiB)", [(r["agents"], r["cp_rss_bytes_idle"] / 2**30) for r in rs]),
                   ("test create → all Running p99 (s)", [(r["agents"], r["create_to_running"]["p99_ms"] / 1e3) for r in rs])],
                  logx=True)
            plots.append(("fleet, %d s leases" % lease, "fleet-%ds.png" % lease))
    for old in ["run-latency-cdf.svg", "start-latency-cdf.svg", "fanout-latency.svg", "fanout-memory.svg"]:
        if os.path.exists("docs/img/" + old):
            os.remove("docs/img/" + old)
    notes = open("bench/notes.md").read() if os.path.exists("bench/notes.md") else ""
    perf = ["# Performance", "",
            "Written by `hack/bench` (a full run; `hack/bench --smoke` only checks that each scenario runs). "
            "Every figure is taken against its baseline in the same run on the same machine.", ""] + report[2:] + [
            "", "## Plots", ""] + [line for alt, f in plots for line in ["![%s](img/%s)" % (alt, f), ""]] + [
            "## Reproduce", "", "```sh", "hack/bench            # as root: network namespaces, sshd, etcd are started by it", "```", "",
            "Raw figures: `bench/results/latest.json`.", ""]
    # README's table: this run's targets, between its markers.
    readme = open("README.md").read() if os.path.exists("README.md") else ""
    begin, end = "<!-- bench-table: written by hack/bench -->", "<!-- /bench-table -->"
    if begin in readme and end in readme:
        table = ["", "The last full run (%s, %s build, %d × %s):" % (result["date"][:10], profile, m["cpus"], m["cpu"]), "",
                 "| what | target | measured | |", "|---|---|---|---|"] + ["| %s | %s | %s | %s |" % t for t in targets] + [""]
        head, rest = readme.split(begin, 1)
        tail = rest.split(end, 1)[1]
        with open("README.md", "w") as f:
            f.write(head + begin + "\n".join(table) + end + tail)
    with open("docs/PERFORMANCE.md", "w") as f:
        f.write("\n".join(perf) + ("\n" + notes if notes else ""))
