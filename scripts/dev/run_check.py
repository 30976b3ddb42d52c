"""Checks `sbgen run` from the outside, the way a PyTorch user would call it.

Makes random q, k, v, do, drem with torch, saves them with safetensors, runs `sbgen run` for the
forward and backward, and compares o, rem, dq, dk, dv with a float64 reference written here from
the definition (`reference` below, after docs/math.md#definitions) and differentiated by torch autograd: nothing of sbgen's own
reference is used. Needs a CUDA device, torch and safetensors (the GPU machine has both).

Cases cover grouped-query attention (k, v with fewer heads: the reference repeats each K/V head for
its query heads and autograd sums the group's gradients), packed variable-length batches (THD
layout with `cu_seqlens`: the reference runs each sequence alone), head dims 16 to 256 (padded ones
too) and the deterministic backward (run twice: dq, dk, dv must be bit-identical).

    python3 scripts/dev/run_check.py SBGEN_BINARY [--workdir DIR] [--q-scale S] [--flags "..."]

--q-scale multiplies q by S (scores ~ N(0, S^2) instead of N(0, 1)): at S = 1.6 about half of the
64-key blocks of a warp hold a score over the linear stick's bound (`--softplus linear`), so both of
its paths run in one walk; at 2.5 nearly every block falls back to the log-space walk; --flags
passes schedule overrides to every `sbgen run` (e.g. "--softplus linear --mma wgmma").

Exit status 0 when every case is within tolerance (o, rem <= 5e-3; gradients <= 1e-2, relative L2).
"""
import math, os, subprocess, sys, tempfile, zlib

import torch
from safetensors.torch import load_file, save_file

FWD_TOL, GRAD_TOL = 5e-3, 1e-2
Q_SCALE = 1.0
EXTRA_FLAGS = []


def reference(q, k, v, attend_current, fuse):
    """o, rem of stick-breaking attention in float64, [B, H, N, D] inputs; differentiable."""
    n, d = q.shape[-2], q.shape[-1]
    z = (q @ k.transpose(-1, -2)) / math.sqrt(d)  # [B, H, N, N]
    i = torch.arange(n, device=q.device)
    allowed = (i[None, :] <= i[:, None]) if attend_current else (i[None, :] < i[:, None])
    log_beta = torch.nn.functional.logsigmoid(z)
    log_1mb = torch.nn.functional.logsigmoid(-z)
    log_1mb = torch.where(allowed, log_1mb, torch.zeros_like(log_1mb))
    # sum over allowed k with j < k of log(1 - beta_ik): a reverse exclusive cumsum along keys.
    after = log_1mb.flip(-1).cumsum(-1).flip(-1) - log_1mb
    a = torch.where(allowed, torch.exp(log_beta + after), torch.zeros_like(z))
    o = a @ v
    rem = torch.exp(log_1mb.sum(-1))
    if fuse:
        o = o + rem[..., None] * v
    return o, rem


def rel(got, want, floor=None):
    """Relative L2 error; with `floor`, relative to max(||want||, ||floor||) as `sbgen check` does
    for fused gradients (where the dO . v parts cancel, e.g. one row whose only key is itself)."""
    got, want = got.double(), want.double()
    den = want.norm()
    if floor is not None:
        den = torch.maximum(den, floor.double().norm())
    err = (got - want).norm()
    return float(err / den) if den > 0 else float(err)


def grads(x, drem, attend_current, fuse):
    q, k, v = (x[name].double().requires_grad_(True) for name in ["q", "k", "v"])
    o, rem = reference(q, k, v, attend_current, fuse)
    (o * x["do"].double()).sum().add((rem * drem.double()).sum()).backward()
    return o.detach(), rem.detach(), q.grad, k.grad, v.grad


def run_sbgen(binary, tensors, workdir, flags):
    inp, out = os.path.join(workdir, "in.safetensors"), os.path.join(workdir, "out.safetensors")
    save_file(tensors, inp)
    cmd = [binary, "run", "--input", inp, "--output", out, "--pass", "both"] + flags
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return None, f"exit {proc.returncode}\n{proc.stderr}"
    return load_file(out), None


def case(binary, workdir, shape, dtype, layout, mask, remainder, kv_heads=None, lens=None, deterministic=False):
    """One run. shape = (B, H, N, D); kv_heads: K/V heads (default H); lens: a packed THD batch of these
    sequence lengths (B and N are then ignored)."""
    b, h, n, d = shape
    hk = kv_heads or h
    name = f"{','.join(map(str, shape))} H_kv {hk} {str(dtype)[6:]} {layout} {mask} {remainder}" + (
        f" lens {lens}" if lens else "") + (" det" if deterministic else "")
    # A seed from the case itself (crc32, not Python's salted hash), so a failure repeats.
    seed = zlib.crc32(name.encode())
    torch.manual_seed(seed)
    seqs = lens if lens else [n] * b
    # Per sequence: q, do [H, L, D], k, v [H_kv, L, D], drem [H, L] (BHND with B = 1).
    xs = []
    for L in seqs:
        xs.append({
            "q": (Q_SCALE * torch.randn(h, L, d, device="cuda")).to(dtype),
            "k": torch.randn(hk, L, d, device="cuda").to(dtype),
            "v": torch.randn(hk, L, d, device="cuda").to(dtype),
            "do": torch.randn(h, L, d, device="cuda").to(dtype),
            "drem": torch.randn(h, L, device="cuda", dtype=torch.float32),
        })
    flags = ["--layout", layout, "--mask", mask, "--remainder", remainder] + (["--deterministic"] if deterministic else [])
    flags += EXTRA_FLAGS
    if layout == "thd":
        tensors = {k: torch.cat([x[k].transpose(0, 1) for x in xs]).contiguous().cpu() for k in ["q", "k", "v", "do"]}
        tensors["drem"] = torch.cat([x["drem"] for x in xs], dim=1).contiguous().cpu()  # [H, T]
        cu = [0]
        for L in seqs:
            cu.append(cu[-1] + L)
        tensors["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
    else:
        stack = lambda k: torch.stack([x[k] for x in xs])  # [B, H, N, D]
        to_layout = (lambda t: t.transpose(1, 2).contiguous()) if layout == "bnhd" else (lambda t: t.contiguous())
        tensors = {k: to_layout(stack(k)).cpu() for k in ["q", "k", "v", "do"]}
        tensors["drem"] = stack("drem").contiguous().cpu()
    got, err = run_sbgen(binary, tensors, workdir, flags)
    if got is None:
        print(f"FAIL {name}: {err}")
        return False
    if deterministic:
        again, err = run_sbgen(binary, tensors, workdir, flags)
        if again is None:
            print(f"FAIL {name} (second run): {err}")
            return False
        same = all(torch.equal(got[k], again[k]) for k in ["dq", "dk", "dv"])
        if not same:
            print(f"FAIL {name}: dq/dk/dv differ between two runs of the deterministic backward")
            return False

    # The reference per sequence, its results laid out as sbgen writes them.
    want = {k: [] for k in ["o", "rem", "dq", "dk", "dv", "fq", "fk"]}
    for x in xs:
        if x["q"].shape[1] == 0:
            for k in want:
                want[k].append(None)
            continue
        rep = lambda t: t.repeat_interleave(h // hk, dim=0)
        xx = {"q": x["q"][None], "do": x["do"][None]}
        kv = {k: x[k][None].double().requires_grad_(True) for k in ["k", "v"]}
        q = xx["q"].double().requires_grad_(True)
        o, rem = reference(q, rep(kv["k"][0])[None], rep(kv["v"][0])[None], mask == "attend_current", remainder == "fuse")
        (o * xx["do"].double()).sum().add((rem * x["drem"][None].double()).sum()).backward()
        for k, t in [("o", o.detach()[0]), ("rem", rem.detach()[0]), ("dq", q.grad[0]), ("dk", kv["k"].grad[0]), ("dv", kv["v"].grad[0])]:
            want[k].append(t)
        if remainder == "fuse":  # the floor of the fused dq, dk (see `rel`)
            q2 = xx["q"].double().requires_grad_(True)
            kv2 = {k: x[k][None].double().requires_grad_(True) for k in ["k", "v"]}
            o2, rem2 = reference(q2, rep(kv2["k"][0])[None], rep(kv2["v"][0])[None], mask == "attend_current", False)
            (o2 * xx["do"].double()).sum().add((rem2 * x["drem"][None].double()).sum()).backward()
            want["fq"].append(q2.grad[0])
            want["fk"].append(kv2["k"].grad[0])
        else:
            want["fq"].append(None)
            want["fk"].append(None)
    keep = [i for i, x in enumerate(xs) if x["q"].shape[1] > 0]
    cat = lambda k, dim: torch.cat([want[k][i] for i in keep], dim=dim)
    if layout == "thd":
        # sbgen's THD outputs: o, dq [T, H, D]; dk, dv [T, H_kv, D]; rem [H, T]. Empty sequences hold no token.
        back = lambda t: t.cuda().transpose(0, 1)  # -> [H, T, D]
        g = {"o": back(got["o"]), "dq": back(got["dq"]), "dk": back(got["dk"]), "dv": back(got["dv"]), "rem": got["rem"].cuda()}
        w = {"o": cat("o", 1), "dq": cat("dq", 1), "dk": cat("dk", 1), "dv": cat("dv", 1), "rem": cat("rem", 1)}
        floor_q = cat("fq", 1) if remainder == "fuse" else None
        floor_k = cat("fk", 1) if remainder == "fuse" else None
    else:
        back = (lambda t: t.cuda().transpose(1, 2)) if layout == "bnhd" else (lambda t: t.cuda())
        g = {"o": back(got["o"]), "dq": back(got["dq"]), "dk": back(got["dk"]), "dv": back(got["dv"]), "rem": got["rem"].cuda()}
        st = lambda k: torch.stack(want[k])
        w = {"o": st("o"), "dq": st("dq"), "dk": st("dk"), "dv": st("dv"), "rem": st("rem")}
        floor_q = st("fq") if remainder == "fuse" else None
        floor_k = st("fk") if remainder == "fuse" else None
    errs = {
        "o": rel(g["o"], w["o"]),
        "rem": rel(g["rem"], w["rem"]),
        "dq": rel(g["dq"], w["dq"], floor_q),
        "dk": rel(g["dk"], w["dk"], floor_k),
        "dv": rel(g["dv"], w["dv"]),
    }
    ok = all(e <= (FWD_TOL if k in ("o", "rem") else GRAD_TOL) for k, e in errs.items())
    ok = ok and all(math.isfinite(e) for e in errs.values())
    line = " ".join(f"{k} {e:.2e}" for k, e in errs.items())
    print(f"{'ok  ' if ok else 'FAIL'} {name} (seed {seed}): {line}", flush=True)
    return ok


def main(argv):
    if not argv:
        print(__doc__)
        return 2
    binary = os.path.abspath(argv[0])
    workdir = argv[argv.index("--workdir") + 1] if "--workdir" in argv else tempfile.mkdtemp()
    global Q_SCALE, EXTRA_FLAGS
    if "--q-scale" in argv:
        Q_SCALE = float(argv[argv.index("--q-scale") + 1])
    if "--flags" in argv:
        EXTRA_FLAGS = argv[argv.index("--flags") + 1].split()
    cases = [
        ((3, 5, 300, 128), torch.bfloat16, "bhnd", "strict", "return"),
        ((3, 5, 300, 128), torch.bfloat16, "bnhd", "attend_current", "fuse"),
        ((2, 3, 1000, 64), torch.float16, "bnhd", "strict", "return"),
        ((1, 7, 257, 64), torch.bfloat16, "bhnd", "attend_current", "return"),
        ((2, 2, 1, 128), torch.float16, "bhnd", "strict", "fuse"),
        # One row whose only key is itself: the dO . v parts of dq, dk cancel (see sbgen check).
        ((3, 5, 1, 64), torch.bfloat16, "bhnd", "attend_current", "fuse"),
    ]
    bf, f16 = torch.bfloat16, torch.float16
    cases += [
        # Grouped-query and multi-query attention.
        ((2, 8, 300, 128), bf, "bnhd", "strict", "fuse", 2),
        ((1, 6, 700, 64), f16, "bhnd", "attend_current", "return", 3),
        ((2, 4, 257, 128), bf, "bhnd", "strict", "return", 1),
        # Head dims: native 32, 96, 256 and padded 16, 50, 80, 33 (odd), 200.
        ((2, 3, 300, 32), bf, "bhnd", "strict", "return"),
        ((2, 3, 300, 96), f16, "bnhd", "attend_current", "fuse"),
        ((1, 3, 500, 256), bf, "bhnd", "strict", "return"),
        ((1, 2, 300, 256), f16, "bnhd", "strict", "fuse", 1),
        ((2, 3, 200, 16), bf, "bhnd", "strict", "return"),
        ((2, 3, 300, 50), bf, "bnhd", "strict", "fuse"),
        ((2, 4, 300, 80), f16, "bhnd", "attend_current", "return", 2),
        ((1, 3, 100, 33), bf, "bhnd", "strict", "fuse"),
        ((1, 2, 200, 200), bf, "bnhd", "strict", "return"),
    ]
    varlen = [
        # Packed batches (THD): empty and one-token sequences next to long ones, with GQA.
        ((0, 4, 0, 128), bf, "thd", "strict", "return", None, [0, 1, 17, 1000, 300]),
        ((0, 8, 0, 64), f16, "thd", "attend_current", "fuse", 2, [5, 0, 700, 1]),
        ((0, 4, 0, 80), bf, "thd", "strict", "fuse", 1, [33, 400, 2]),
    ]
    deterministic = [
        ((2, 4, 700, 128), bf, "bhnd", "strict", "return", 2, None, True),
        ((0, 4, 0, 64), bf, "thd", "attend_current", "fuse", 2, [100, 0, 900], True),
    ]
    ok = all([case(binary, workdir, *c) for c in cases + varlen + deterministic])
    print("run_check:", "all passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
