#!/usr/bin/python3
"""How far each deterministic sampler lands from the probability-flow ODE's own solution, for the same noise.

A deterministic sampler integrates the probability-flow ODE from the same initial noise; its images at N network
evaluations differ from the ODE's solution by the solver's error, which this script measures without the sampling
noise of FD: per image, the RMS difference in grey levels (0-255) from a reference solved with many steps, then the
median and 90th percentile over the images. The reference is checked against one with half its steps.

  /usr/bin/python3 bench/ode_error.py --ckpt models/fmnist-uncond --n 64 --steps 6,8,10,15 \\
      --samplers dpmpp_2m,dpmpp_3m,unipc,unipc_3m --grids karras,logsnr,uniform [--diffuse build/diffuse]

Steps are network evaluations for the multistep samplers (dpmpp_*, unipc*, ddim, euler). Needs numpy; runs
`diffuse sample ... --out X.npy` (uint8 images) for every (grid, sampler, steps).
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np


def sample(a, out, sampler, steps, grid=None):
    cmd = [a.diffuse, "sample", "--ckpt", a.ckpt, "--n", str(a.n), "--seed", str(a.seed), "--sampler", sampler,
           "--steps", str(steps), "--precision", a.precision, "--out", out]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    if grid:
        cmd += ["--grid", grid]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return np.load(out).astype(np.float64)


def per_image_rms(x, ref):
    return np.sqrt(((x - ref) ** 2).reshape(len(ref), -1).mean(axis=1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--diffuse", default="build/diffuse")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", default="6,8,10,15")
    p.add_argument("--samplers", default="dpmpp_2m,dpmpp_3m,unipc,unipc_3m")
    p.add_argument("--grids", default="karras", help="comma list; 'default' is each sampler's own grid")
    p.add_argument("--ref-sampler", default="dpmpp_2m")
    p.add_argument("--ref-steps", type=int, default=400)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    steps = [int(s) for s in a.steps.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = lambda name: os.path.join(tmp, name + ".npy")  # noqa: E731
        ref = sample(a, path("ref"), a.ref_sampler, a.ref_steps)
        half = sample(a, path("half"), a.ref_sampler, a.ref_steps // 2)
        r = per_image_rms(half, ref)
        print(f"reference: {a.ref_sampler} at {a.ref_steps} steps; against {a.ref_steps // 2} steps: median "
              f"{np.median(r):.2f}, p90 {np.percentile(r, 90):.2f} grey levels ({a.n} images, seed {a.seed})")
        print()
        print("| grid | sampler | " + " | ".join(f"{s} steps" for s in steps) + " |")
        print("| --- | --- | " + " | ".join("---" for _ in steps) + " |")
        for grid in a.grids.split(","):
            for sampler in a.samplers.split(","):
                cells = []
                for s in steps:
                    r = per_image_rms(sample(a, path("x"), sampler, s, None if grid == "default" else grid), ref)
                    cells.append(f"{np.median(r):.1f} / {np.percentile(r, 90):.1f}")
                print(f"| {grid} | {sampler} | " + " | ".join(cells) + " |", flush=True)
        print()
        print("cells: median / 90th percentile over the images of the per-image RMS difference from the reference")


if __name__ == "__main__":
    sys.exit(main())
