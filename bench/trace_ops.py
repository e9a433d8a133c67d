#!/usr/bin/env python3
"""Per-operator self time of chrome://tracing files written by the autograd profiler (bench_train_speed
--profile, reference_unet.py --profile), side by side: where one implementation spends time the other does not.
With --kernels, the GPU's work instead (Kineto traces of a CUDA run: kernels, copies and fills by name, their summed
durations; the host's operators left out), followed by the kernels' time per kind (convolutions, cuDNN's layout
transposes, GEMMs, attention, GroupNorm, optimizer, ...), to see at a glance where a step's GPU time goes.

  python3 bench/trace_ops.py /tmp/cpp-train.trace /tmp/py-train.trace [--top 25] [--kernels]
"""
import argparse
import collections
import json
import re


GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def self_times(path, kernels=False):
    """{op name: (self microseconds, calls)}; self = duration minus the durations of events nested in it.
    kernels: only the GPU's events (which do not nest), names cut to 100 characters."""
    with open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    by_thread = collections.defaultdict(list)
    for e in events:
        if kernels and e.get("cat") not in GPU_CATEGORIES:
            continue
        if kernels:
            e = dict(e, name=str(e.get("name", "?"))[:100])
        if e.get("ph") == "X" and "dur" in e:
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    out = collections.defaultdict(lambda: [0.0, 0])
    for evs in by_thread.values():
        evs.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        stack = []  # [end, event, child time]
        def close(upto):
            while stack and stack[-1][0] <= upto:
                end, ev, child = stack.pop()
                out[ev["name"]][0] += float(ev["dur"]) - child
                out[ev["name"]][1] += 1
                if stack:
                    stack[-1][2] += float(ev["dur"])
        for e in evs:
            ts, dur = float(e["ts"]), float(e["dur"])
            close(ts)
            stack.append([ts + dur, e, 0.0])
        close(float("inf"))
    return out


# Kinds of GPU work by kernel name, first match wins (names as CUDA 12-13, cuDNN 9 and PyTorch 2.x print them).
KINDS = (
    ("memcpy / memset", r"^Memcpy|^Memset|^\[memcpy|^\[memset"),
    ("layout transposes (cuDNN NCHW<->NHWC)", r"nchwToNhwc|nhwcToNchw|nchw2nhwc|nhwc2nchw|convertTensor"),
    ("GroupNorm, fused (diffuse)", r"gn_cuda"),
    ("GroupNorm, LibTorch", r"[Gg]roup_?[Nn]orm|RowwiseMoments|ComputeFusedParams|Welford|ComputeInternalGradients"),
    ("attention (SDPA)", r"flash|fmha|attention|_efficient_attention|cutlassF|cutlassB"),
    ("convolution (cuDNN)", r"fprop|dgrad|wgrad|implicit_convolve|cudnn|[Cc]onv|cutlass_.*_(nhwc|nchw)"),
    ("GEMM (cuBLAS)", r"gemm|cublas|Kernel2|sm\d+_.*_tn|sm\d+_.*_nt|sm\d+_.*_nn"),
    ("optimizer / EMA", r"adam|Adam|multi_tensor|foreach|lerp"),
    ("dropout", r"dropout"),
    ("reductions", r"reduce_kernel|Reduce"),
    ("upsample / pad / cat", r"upsample|pad|CatArray|cat_"),
    ("copies and casts", r"copy|Copy|cast"),
    ("elementwise", r"elementwise|vectorized|unrolled"),
)


def kind_of(name):
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def print_kinds(traces, tables, totals):
    rows = []
    for t in tables:
        per = collections.defaultdict(float)
        for name, (us, _) in t.items():
            per[kind_of(name)] += us
        rows.append(per)
    kinds = [k for k, _ in KINDS] + ["other"]
    head = "".join(f" | {t[-40:]} ms (%)" for t in traces)
    print(f"\n| kind of kernel{head} |\n|---" + "|---" * len(tables) + "|")
    for k in kinds:
        if not any(r.get(k) for r in rows):
            continue
        cells = "".join(f" | {r.get(k, 0.0) / 1e3:.3f} ({100.0 * r.get(k, 0.0) / max(tot, 1e-9):.1f})"
                        for r, tot in zip(rows, totals))
        print(f"| {k}{cells} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("traces", nargs="+")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--kernels", action="store_true", help="the GPU's kernels, copies and fills instead of operators")
    args = p.parse_args()
    tables = [self_times(t, args.kernels) for t in args.traces]
    totals = [sum(v[0] for v in t.values()) for t in tables]
    names = sorted({n for t in tables for n in t}, key=lambda n: -max(t.get(n, [0, 0])[0] for t in tables))
    head = "".join(f" | {t[-40:]} ms (calls)" for t in args.traces)
    print(f"| {'kernel' if args.kernels else 'op'}{head} |\n|---" + "|---" * len(tables) + "|")
    for n in names[:args.top]:
        cells = "".join(f" | {t[n][0] / 1e3:.3f} ({t[n][1]})" if n in t else " | -" for t in tables)
        print(f"| {n}{cells} |")
    print("| total" + "".join(f" | {x / 1e3:.3f}" for x in totals) + " |")
    if args.kernels:
        print_kinds(args.traces, tables, totals)


if __name__ == "__main__":
    main()
