#!/usr/bin/env python3
"""Figures for bench/mesh-hop.

  summarize.py --line RUNS/<load>-<rep>-<setup>     one progress line for one run
  summarize.py --dir WORK --out FILE.json [--meta k=v ...]
                                                   the tables (stdout) and the JSON summary

A run is <base>.meta.json (written by bench/mesh-hop: CPU ticks, VmHWM, times) plus the load
tool's output: <base>.oha.json (oha --output-format json) or <base>.out (wrk with
wrk-json.lua, a line `WRKJSON {...}`).
"""
import argparse
import glob
import json
import os
import statistics
import sys

SETUP_ORDER = ["backend", "haproxy", "nginx", "hypha", "hypha-routes"]
SETUP_NAME = {"backend": "backend alone", "haproxy": "HAProxy pair", "nginx": "nginx pair",
              "hypha": "Hypha pair", "hypha-routes": "Hypha pair, many routes (meta: routes)"}
LOAD_ORDER = ["rate", "max", "lat"]
RSS_FLOOR_KB = 20 * 1024


def load_name(load, meta):
    if load == "rate":
        return f"{meta.get('rate', '1000')} req/s, {meta.get('conns', '16')} conns (oha)"
    if load == "max":
        return f"max, {meta.get('conns', '16')} conns (wrk)"
    return "1 conn (wrk)"


def parse_run(base):
    with open(base + ".meta.json") as f:
        m = json.load(f)
    r = {"load": m["load"], "rep": m["rep"], "setup": m["setup"], "tool_rc": m["tool_rc"],
         "wall_s": round(m["end"] - m["start"], 3), "loadavg": m["loadavg"]}
    ok = False
    if os.path.exists(base + ".oha.json") and os.path.getsize(base + ".oha.json") > 0:
        with open(base + ".oha.json") as f:
            o = json.load(f)
        codes = {int(k): v for k, v in (o.get("statusCodeDistribution") or {}).items()}
        success = sum(v for k, v in codes.items() if 200 <= k < 300)
        errs = {k: v for k, v in (o.get("errorDistribution") or {}).items()
                if k != "aborted due to deadline"}
        dur = o["summary"]["total"]
        lp = o.get("latencyPercentiles") or {}
        r.update(success=success, non2xx=sum(v for k, v in codes.items() if not 200 <= k < 300),
                 errors=sum(errs.values()), error_kinds=errs, duration_s=dur,
                 rps=success / dur if dur else 0.0,
                 p50=(lp.get("p50") or 0) * 1e3, p90=(lp.get("p90") or 0) * 1e3,
                 p99=(lp.get("p99") or 0) * 1e3)
        ok = success > 0
    elif os.path.exists(base + ".out"):
        w = None
        with open(base + ".out") as f:
            for line in f:
                if line.startswith("WRKJSON "):
                    w = json.loads(line[len("WRKJSON "):])
        if w:
            e = w["errors"]
            success = w["requests"] - e["status"]
            dur = w["duration_us"] / 1e6
            lat = w["latency_us"]
            r.update(success=success, non2xx=e["status"],
                     errors=e["connect"] + e["read"] + e["write"] + e["timeout"],
                     error_kinds={k: v for k, v in e.items() if v}, duration_s=dur,
                     rps=success / dur if dur else 0.0,
                     p50=lat["p50"] / 1e3, p90=lat["p90"] / 1e3, p99=lat["p99"] / 1e3)
            ok = success > 0
    r["ok"] = ok
    clk = m["clk_tck"]
    t = m["ticks"]
    r["cpu_ms"] = {k: t[k] * 1000.0 / clk for k in ("a", "b", "backend")}
    r["machine_busy_cores"] = (t["machine_busy"] / clk) / r["wall_s"] if r["wall_s"] else 0.0
    if ok:
        k = r["success"] / 1000.0
        r["cpu_ms_per_1k"] = {x: r["cpu_ms"][x] / k for x in ("a", "b", "backend")}
    if m["setup"] != "backend":
        r["hwm_kb"] = m["hwm_kb"]
        r["rss_kb"] = m["rss_kb"]
        r["conns"] = m.get("conns")
    return r


def line(base):
    r = parse_run(base)
    head = f"{r['load']:<4} rep {r['rep']} {r['setup']:<8}"
    if not r["ok"]:
        print(f"{head} FAILED (tool rc {r['tool_rc']}; see {base}.out/.err)")
        return
    s = (f"{head} {r['rps']:9.0f} req/s  p50/p90/p99 {r['p50']:.3f}/{r['p90']:.3f}/"
         f"{r['p99']:.3f} ms")
    if r["setup"] != "backend":
        c = r["cpu_ms_per_1k"]
        s += (f"  CPU-ms/1k A {c['a']:.0f} B {c['b']:.0f}  HWM A {r['hwm_kb']['a'] / 1024:.1f}"
              f" B {r['hwm_kb']['b'] / 1024:.1f} MiB")
        if r.get("conns"):
            s += f"  conns A>B {r['conns']['a_to_b']} B>be {r['conns']['b_to_backend']}"
    s += f"  machine {r['machine_busy_cores']:.2f} cores busy"
    if r["errors"] or r["non2xx"]:
        s += f"  ERRORS {r['errors']} non-2xx {r['non2xx']} {r['error_kinds']}"
    print(s, flush=True)


def stats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def fmt(st, digits=2, rng=True):
    if st is None:
        return "—"
    f = f"{{:.{digits}f}}"
    s = f.format(st["median"])
    if rng and st["n"] > 1:
        s += f" ({f.format(st['min'])}–{f.format(st['max'])})"
    return s


def fmt_int(st, rng=True):
    if st is None:
        return "—"
    s = f"{st['median']:,.0f}"
    if rng and st["n"] > 1:
        s += f" ({st['min']:,.0f}–{st['max']:,.0f})"
    return s


def summarize(work, out, metas):
    meta = dict(kv.split("=", 1) for kv in metas)
    runs = [parse_run(p[: -len(".meta.json")])
            for p in sorted(glob.glob(os.path.join(work, "runs", "*.meta.json")))]
    by = {}
    for r in runs:
        by.setdefault((r["load"], r["setup"]), []).append(r)
    base = {(r["load"], r["rep"]): r for r in runs if r["setup"] == "backend" and r["ok"]}
    final_hwm = {}
    if os.path.exists(os.path.join(work, "final-hwm.json")):
        with open(os.path.join(work, "final-hwm.json")) as f:
            final_hwm = json.load(f)
    failed = {}
    for p in glob.glob(os.path.join(work, "failed-*.txt")):
        with open(p) as f:
            failed[os.path.basename(p)[len("failed-"):-len(".txt")]] = f.read()

    loads = [l for l in LOAD_ORDER if any(k[0] == l for k in by)]
    setups = [s for s in SETUP_ORDER if any(k[1] == s for k in by)]
    agg = {}
    for l in loads:
        for s in setups:
            rs = [r for r in by.get((l, s), []) if r["ok"]]
            if not rs and (l, s) not in by:
                continue
            a = {"runs": len(by.get((l, s), [])), "ok_runs": len(rs),
                 "errors": sum(r.get("errors", 0) for r in by.get((l, s), [])),
                 "non2xx": sum(r.get("non2xx", 0) for r in by.get((l, s), []))}
            for k in ("rps", "p50", "p90", "p99"):
                a[k] = stats([r[k] for r in rs])
            for k in ("p50", "p90", "p99"):
                a["added_" + k] = stats([r[k] - base[(l, r["rep"])][k] for r in rs
                                         if (l, r["rep"]) in base])
            a["machine_busy_cores"] = stats([r["machine_busy_cores"] for r in rs])
            a["cpu_ms_per_1k_backend"] = stats([r["cpu_ms_per_1k"]["backend"] for r in rs])
            if s != "backend":
                for x in ("a", "b"):
                    a["cpu_ms_per_1k_" + x] = stats([r["cpu_ms_per_1k"][x] for r in rs])
                a["cpu_ms_per_1k_pair"] = stats([r["cpu_ms_per_1k"]["a"] + r["cpu_ms_per_1k"]["b"]
                                                 for r in rs])
                # VmHWM is a peak over the process's life: after the last run of this load it
                # is the peak so far (loads run in order rate, max, lat).
                hw = [r["hwm_kb"] for r in by.get((l, s), [])]
                a["peak_rss_mib_so_far"] = {x: max(h[x] for h in hw) / 1024 for x in ("a", "b")}
            agg[(l, s)] = a

    # Ratios of Hypha against each peer, per repetition (same load, same repetition).
    ratios = {}
    for l in loads:
        for peer in ("haproxy", "nginx"):
            hy = {r["rep"]: r for r in by.get((l, "hypha"), []) if r["ok"]}
            pe = {r["rep"]: r for r in by.get((l, peer), []) if r["ok"]}
            reps = sorted(set(hy) & set(pe))
            if not reps:
                continue
            cpu = [(hy[i]["cpu_ms_per_1k"]["a"] + hy[i]["cpu_ms_per_1k"]["b"]) /
                   (pe[i]["cpu_ms_per_1k"]["a"] + pe[i]["cpu_ms_per_1k"]["b"]) for i in reps]
            add = []
            for i in reps:
                if (l, i) in base:
                    d = pe[i]["p50"] - base[(l, i)]["p50"]
                    if d > 0:
                        add.append((hy[i]["p50"] - base[(l, i)]["p50"]) / d)
            ratios[(l, peer)] = {"cpu_pair": stats(cpu), "added_p50": stats(add)}

    # ---------------------------------------------------------------- tables
    print("## results: medians over repetitions (min–max); latency in ms")
    print()
    print("| setup | load | req/s | p50 / p90 / p99 | added p50 | added p90 / p99 "
          "| CPU-ms per 1k req, A | B | peak RSS A / B MiB | machine busy, cores |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for l in loads:
        for s in setups:
            a = agg.get((l, s))
            if a is None:
                continue
            if not a["ok_runs"]:
                print(f"| {SETUP_NAME[s]} | {load_name(l, meta)} | FAILED | | | | | | | |")
                continue
            pct = " / ".join(fmt(a[k], 2, False) for k in ("p50", "p90", "p99"))
            if s == "backend":
                added = "—"
                added2 = "—"
                ca = cb = rss = "—"
            else:
                added = fmt(a["added_p50"], 2)
                added2 = f"{fmt(a['added_p90'], 2, False)} / {fmt(a['added_p99'], 2, False)}"
                ca = fmt(a["cpu_ms_per_1k_a"], 0)
                cb = fmt(a["cpu_ms_per_1k_b"], 0)
                p = a["peak_rss_mib_so_far"]
                rss = f"{p['a']:.1f} / {p['b']:.1f}"
            err = ""
            if a["errors"] or a["non2xx"]:
                err = f" ⚠ {a['errors']} errors, {a['non2xx']} non-2xx"
            if l == "rate" and a["rps"]["min"] < 0.97 * float(meta.get("rate", 1000)):
                err += " ⚠ rate not reached in some runs"
            print(f"| {SETUP_NAME[s]} | {load_name(l, meta)} | {fmt_int(a['rps'])}{err} | {pct} "
                  f"| {added} | {added2} | {ca} | {cb} | {rss} | {fmt(a['machine_busy_cores'], 2)} |")
    for s in SETUP_ORDER:
        if s in failed and not any(k[1] == s for k in agg):
            print(f"| {SETUP_NAME[s]} | all | FAILED (see below) | | | | | | | |")
    print()
    print("Peak RSS is VmHWM after the last run of that load (loads run in the order rate, "
          "max, lat, so it is the peak so far).")
    if final_hwm:
        print("Peak RSS over the whole run (VmHWM at the end), A / B MiB: " + "; ".join(
            f"{SETUP_NAME[s]} {v['a'] / 1024:.1f} / {v['b'] / 1024:.1f}"
            for s, v in final_hwm.items()))
    busy = [r["machine_busy_cores"] for r in runs]
    if busy:
        print(f"Machine CPU busy during runs (all processes, of {meta.get('nproc', '?')} cores): "
              f"{min(busy):.2f}–{max(busy):.2f}.")
    print()
    if ratios:
        print("## Hypha / peer, per repetition: median (min–max)")
        print()
        print("| load | peer | CPU-ms per 1k req, pair A+B | added p50 |")
        print("|---|---|---|---|")
        for (l, peer), v in ratios.items():
            print(f"| {load_name(l, meta)} | {SETUP_NAME[peer]} | {fmt(v['cpu_pair'], 2)} "
                  f"| {fmt(v['added_p50'], 2)} |")
        print()

    floor = None
    hy, ha = agg.get(("rate", "hypha")), agg.get(("rate", "haproxy"))
    if hy and ha and hy["ok_runs"] and ha["ok_runs"]:
        cpu_ok = hy["cpu_ms_per_1k_pair"]["median"] <= ha["cpu_ms_per_1k_pair"]["median"]
        lat_ok = hy["added_p50"] is not None and ha["added_p50"] is not None and \
            hy["added_p50"]["median"] <= ha["added_p50"]["median"]
        peak = hy["peak_rss_mib_so_far"]
        rss_ok = max(peak.values()) < RSS_FLOOR_KB / 1024
        whole = final_hwm.get("hypha")
        floor = {
            "cpu": {"met": cpu_ok, "hypha_pair": hy["cpu_ms_per_1k_pair"]["median"],
                    "haproxy_pair": ha["cpu_ms_per_1k_pair"]["median"]},
            "added_p50": {"met": lat_ok,
                          "hypha": hy["added_p50"] and hy["added_p50"]["median"],
                          "haproxy": ha["added_p50"] and ha["added_p50"]["median"]},
            "rss": {"met": rss_ok, "hypha_mib_after_rate": peak,
                    "hypha_mib_whole_run": whole and {k: v / 1024 for k, v in whole.items()}},
        }
        w = lambda b: "MET" if b else "MISSED"
        print(f"## floor at {meta.get('rate', '1000')} req/s (medians)")
        print(f"- CPU per request, Hypha pair <= HAProxy pair: {w(cpu_ok)} "
              f"({floor['cpu']['hypha_pair']:.0f} vs {floor['cpu']['haproxy_pair']:.0f} "
              f"CPU-ms per 1k req, A+B)")
        if floor["added_p50"]["hypha"] is not None and floor["added_p50"]["haproxy"] is not None:
            print(f"- added p50, Hypha <= HAProxy: {w(lat_ok)} "
                  f"({floor['added_p50']['hypha']:.3f} vs {floor['added_p50']['haproxy']:.3f} ms)")
        s = (f"- each Hypha sidecar < 20 MiB RSS: {w(rss_ok)} (peak after the rate runs A "
             f"{peak['a']:.1f}, B {peak['b']:.1f} MiB")
        if whole:
            s += f"; over the whole run incl. max load A {whole['a'] / 1024:.1f}, " \
                 f"B {whole['b'] / 1024:.1f} MiB"
        print(s + ")")
        print()
    elif "hypha" in failed:
        print("## floor: not evaluated, the Hypha pair FAILED")
        print()
    for s, text in failed.items():
        print(f"## {s} FAILED")
        print(text.rstrip())
        print()

    def key(t):
        return f"{t[0]}/{t[1]}"
    summary = {"meta": meta, "aggregates": {key(k): v for k, v in agg.items()},
               "ratios": {key(k): v for k, v in ratios.items()}, "floor": floor,
               "final_peak_rss_kb": final_hwm, "failed": failed, "runs": runs}
    with open(out, "w") as f:
        json.dump(summary, f, indent=1, sort_keys=False)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--line")
    ap.add_argument("--dir")
    ap.add_argument("--out")
    ap.add_argument("--meta", action="append", default=[])
    a = ap.parse_args()
    if a.line:
        line(a.line)
    elif a.dir and a.out:
        summarize(a.dir, a.out, a.meta)
    else:
        ap.error("--line BASE or --dir DIR --out FILE")


if __name__ == "__main__":
    sys.exit(main())
