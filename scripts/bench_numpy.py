#!/usr/bin/env python3
"""numpy's best routes for one aggregation round (algorithms.md §13), on given shapes.

Prints one line per operation: seconds (best of N) and the ratio to a memcpy of
the same input bytes measured in this process. Used by lora-agg-bench so both
are reported in the same run.
"""
import argparse
import time

import numpy as np


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--modules", type=int, default=128)
    parser.add_argument("--d-out", type=int, default=4096)
    parser.add_argument("--d-in", type=int, default=4096)
    parser.add_argument("--ranks", default="16,16,16,16,16,16,16,16,16,16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    rng = np.random.default_rng(0)
    p = np.arange(1, len(ranks) + 1, dtype=np.float32)
    p /= p.sum()
    homogeneous = len(set(ranks)) == 1
    modules = []
    for _ in range(args.modules):
        if homogeneous:
            a = rng.standard_normal((len(ranks), ranks[0] * args.d_in), dtype=np.float32)
            b = rng.standard_normal((len(ranks), args.d_out * ranks[0]), dtype=np.float32)
        else:
            a = [rng.standard_normal((r, args.d_in), dtype=np.float32) for r in ranks]
            b = [rng.standard_normal((args.d_out, r), dtype=np.float32) for r in ranks]
        modules.append((a, b))
    nbytes = sum(r * (args.d_out + args.d_in) * 4 for r in ranks) * args.modules
    target = np.empty(nbytes // 4, dtype=np.float32)

    def memcpy():
        offset = 0
        for a, b in modules:
            for x in (a, b) if homogeneous else (*a, *b):
                flat = x.reshape(-1)
                np.copyto(target[offset:offset + flat.size], flat)
                offset += flat.size

    rows = [("memcpy", best(memcpy, args.repeats))]
    if homogeneous:
        r = ranks[0]

        def fedit():
            for a, b in modules:
                p @ a, p @ b

        def fedex():
            for a, b in modules:
                abar = (p @ a).reshape(r, args.d_in)
                bbar = (p @ b).reshape(args.d_out, r)
                u = np.concatenate([b[k].reshape(args.d_out, r) * p[k] for k in range(len(ranks))] + [-bbar], axis=1)
                v = np.concatenate([a[k].reshape(r, args.d_in) for k in range(len(ranks))] + [abar], axis=0)

        def lorafair():
            for a, b in modules:
                abar = (p @ a).reshape(r, args.d_in)
                bbar = (p @ b).reshape(args.d_out, r)
                gram = abar @ abar.T
                rhs = sum(p[k] * b[k].reshape(args.d_out, r) @ (a[k].reshape(r, args.d_in) @ abar.T) for k in range(len(ranks))) - bbar @ gram
                np.linalg.solve(gram + 0.01 * np.trace(gram) / r * np.eye(r, dtype=np.float32), rhs.T)

        rows += [("fedit (GEMV)", best(fedit, args.repeats)),
                 ("fedex-lora factored", best(fedex, args.repeats)),
                 ("lora-fair closed form", best(lorafair, args.repeats))]
    else:
        rmax = max(ranks)

        def zeropad():
            for a, b in modules:
                abar = np.zeros((rmax, args.d_in), dtype=np.float32)
                bbar = np.zeros((args.d_out, rmax), dtype=np.float32)
                for k, r in enumerate(ranks):
                    abar[:r] += p[k] * a[k]
                    bbar[:, :r] += p[k] * b[k]

        rows += [("zero-pad", best(zeropad, args.repeats))]
    # flexlora / svd-fedavg: the top-r_max SVD of Σ p_k s_k B_k A_k from the
    # stacked factors (algorithms.md §8, §13), by QR and by Float32 Gram matrices.
    keep = max(ranks)

    def stacks(a, b):
        bs = [b[k].reshape(args.d_out, ranks[k]) * p[k] for k in range(len(ranks))]
        as_ = [a[k].reshape(ranks[k], args.d_in) for k in range(len(ranks))]
        return np.concatenate(bs, axis=1), np.concatenate(as_, axis=0)

    def svd_qr():
        for a, b in modules:
            bc, ac = stacks(a, b)
            qb, rb = np.linalg.qr(bc)
            qa, ra = np.linalg.qr(ac.T)
            u, s, vt = np.linalg.svd(rb @ ra.T)
            qb @ u[:, :keep], qa @ vt[:keep].T

    def svd_gram():
        for a, b in modules:
            bc, ac = stacks(a, b)
            lb, la = np.linalg.cholesky(bc.T @ bc), np.linalg.cholesky(ac @ ac.T)
            u, s, vt = np.linalg.svd(lb.T @ la)
            bc @ np.linalg.solve(lb.T, u[:, :keep]), ac.T @ np.linalg.solve(la.T, vt[:keep].T)

    # One run each: the QR route alone takes several seconds per round.
    rows += [("flexlora SVD, QR route", best(svd_qr, 1)),
             ("flexlora SVD, Gram route", best(svd_gram, 1))]
    memcpy_seconds = rows[0][1]
    for name, seconds in rows:
        print(f"  numpy {name:<24} {seconds:8.3f} s   {memcpy_seconds / seconds:5.2f} × memcpy")


if __name__ == "__main__":
    main()
