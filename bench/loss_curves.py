#!/usr/bin/env python3
"""Whether a reduced-precision training run follows float32 within noise (issue 8: cifar10-ddpm in bf16 against
float32 over the first 2,000 steps).

  python3 bench/loss_curves.py REF/metrics.jsonl TEST/metrics.jsonl NOISE/metrics.jsonl [--skip-steps 200]

REF and TEST train with the same seed, so they draw the same batches, timesteps and noise: their logged losses
(window means, `diffuse train --log-every`) differ only by arithmetic. NOISE is REF's configuration with another
seed: its distance from REF is how far two equally valid float32 runs lie apart. TEST is within noise when its mean
absolute distance from REF over the logged windows is at most NOISE's, and no single window is off by more than the
largest seed-to-seed gap. The first --skip-steps (the warm-up, where the loss falls fastest) are left out of the
verdict but printed. Exit status 0 within noise, 1 outside it, 2 on unusable input.
"""
import argparse
import json
import sys


def fail(message):
    """Unusable input: one line on stderr, exit status 2."""
    print(f"loss_curves: {message}", file=sys.stderr)
    sys.exit(2)


def read_losses(path):
    """{step: window-mean loss} from a metrics.jsonl (FD lines and others without a loss are skipped)."""
    out = {}
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    fail(f"{path}:{n}: not JSON")
                if "loss" in rec and "step" in rec:
                    out[int(rec["step"])] = float(rec["loss"])
    except OSError as e:
        fail(f"{path}: {e.strerror}")
    if not out:
        fail(f"{path}: no loss records")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ref")
    ap.add_argument("test")
    ap.add_argument("noise")
    ap.add_argument("--skip-steps", type=int, default=200)
    ap.add_argument("--names", default="fp32,bf16,fp32 (other seed)")
    args = ap.parse_args()
    names = args.names.split(",")
    if len(names) != 3:
        fail(f"--names takes three comma-separated names")
    ref, test, noise = (read_losses(p) for p in (args.ref, args.test, args.noise))
    steps = sorted(set(ref) & set(test) & set(noise))
    if not steps:
        fail(f"the three runs share no logged step (same --log-every?)")
    print(f"| step | {names[0]} | {names[1]} | {names[2]} | {names[1]} - {names[0]} | {names[2]} - {names[0]} |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s in steps:
        print(f"| {s} | {ref[s]:.5f} | {test[s]:.5f} | {noise[s]:.5f} | {test[s] - ref[s]:+.5f} | {noise[s] - ref[s]:+.5f} |")
    judged = [s for s in steps if s > args.skip_steps]
    if not judged:
        fail(f"no logged step after --skip-steps {args.skip_steps}")
    d_test = [abs(test[s] - ref[s]) for s in judged]
    d_noise = [abs(noise[s] - ref[s]) for s in judged]
    mean_test, mean_noise = sum(d_test) / len(d_test), sum(d_noise) / len(d_noise)
    within = mean_test <= mean_noise and max(d_test) <= max(d_noise)
    summary = {"windows": len(judged), "from_step": judged[0], "to_step": judged[-1],
               "mean_abs_diff_test": mean_test, "mean_abs_diff_seed": mean_noise,
               "max_abs_diff_test": max(d_test), "max_abs_diff_seed": max(d_noise),
               "final_ref": ref[judged[-1]], "final_test": test[judged[-1]], "final_seed": noise[judged[-1]],
               "within_noise": within}
    print(f"{names[1]} against {names[0]} (same draws) over {len(judged)} windows, steps {judged[0]}-{judged[-1]}: "
          f"mean |diff| {mean_test:.5f}, max {max(d_test):.5f}; {names[2]} against {names[0]}: mean {mean_noise:.5f}, "
          f"max {max(d_noise):.5f} -> {'within' if within else 'OUTSIDE'} noise")
    print(json.dumps(summary))
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
