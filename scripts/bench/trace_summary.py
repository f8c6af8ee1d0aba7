"""Where a profiled step's GPU time goes, from the Chrome trace that TITLEGEN_TRACE makes the bench write: kernel
time by kind, the top kernels, and the idle time between kernels by the host operation that was running then.
  python scripts/bench/trace_summary.py trace.json.gz"""
import gzip, json, sys, collections
ev = json.load(gzip.open(sys.argv[1]))["traceEvents"]
X = [e for e in ev if e.get("ph") == "X"]
kern = [e for e in X if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
cpu = [e for e in X if e.get("cat") in ("cpu_op", "user_annotation", "python_function")]
t0 = min(e["ts"] for e in kern); t1 = max(e["ts"] + e["dur"] for e in kern)
print("kernels", len(kern), "span ms", round((t1 - t0) / 1e3, 1))
by_stream = collections.Counter()
for e in kern: by_stream[(e.get("cat"), e["args"].get("stream"))] += e["dur"]
print("per stream ms", {k: round(v / 1e3, 1) for k, v in by_stream.items()})
def cat(n):
    n2 = n.lower()
    for key, lab in (("dequant", "dequant"), ("gemm", "gemm"), ("nvjet", "gemm"), ("cutlass", "gemm"), ("sm90", "gemm"),
                     ("flash", "attn"), ("fmha", "attn"), ("attention", "attn"), ("triton", "triton"), ("memcpy", "memcpy"),
                     ("reduce", "reduce"), ("elementwise", "elementwise"), ("optimizer", "optim"), ("adam", "optim")):
        if key in n2: return lab
    return "other"
cats = collections.Counter(); names = collections.Counter()
for e in kern:
    if e.get("cat") == "kernel":
        cats[cat(e["name"])] += e["dur"]; names[e["name"][:90]] += e["dur"]
print("categories ms", {k: round(v / 1e3, 1) for k, v in cats.most_common()})
for n, d in names.most_common(25): print(f"{d/1e3:8.1f} ms  {n}")
# busy union over compute kernels (not memcpy)
iv = sorted((e["ts"], e["ts"] + e["dur"]) for e in kern if e.get("cat") == "kernel")
gaps = []; end = iv[0][1]
for s, f in iv[1:]:
    if s > end: gaps.append((s - end, end, s))
    end = max(end, f)
tot = sum(g[0] for g in gaps)
print("idle between kernels ms", round(tot / 1e3, 1), "gaps>20us", sum(g[0] for g in gaps if g[0] > 20) / 1e3)
# attribute gaps to the outermost user annotations / cpu ops that were running when the gap started (host side)
tops = sorted([e for e in cpu if e["dur"] > 500], key=lambda e: e["ts"])
attr = collections.Counter()
for d, s, f in gaps:
    if d < 20: continue
    # host op at time s (shortest one containing the gap start, among ops > 0.5 ms) approximates which phase
    cands = [e for e in cpu if e["ts"] <= s <= e["ts"] + e["dur"] and e["dur"] > 200]
    key = min(cands, key=lambda e: e["dur"])["name"][:80] if cands else "none"
    attr[key] += d
for k, v in attr.most_common(25): print(f"gap {v/1e3:8.1f} ms under {k}")
ann = collections.Counter()
for e in cpu:
    if e.get("cat") == "user_annotation": ann[e["name"][:60]] += e["dur"]
for k, v in ann.most_common(15): print(f"annot {v/1e3:8.1f} ms {k}")
