"""Checks `sbgen run` from the outside, the way a PyTorch user would call it.

Makes random q, k, v, do, drem with torch, saves them with safetensors, runs `sbgen run` for the
forward and backward, and compares o, rem, dq, dk, dv with a float64 reference written here from
the definition (`reference` below, after docs/math.md#definitions) and differentiated by torch autograd: nothing of sbgen's own
reference is used. Needs a CUDA device, torch and safetensors (the GPU machine has both).

    python3 scripts/dev/run_check.py SBGEN_BINARY [--workdir DIR]

Exit status 0 when every case is within tolerance (o, rem <= 5e-3; gradients <= 1e-2, relative L2).
"""
import math, os, subprocess, sys, tempfile, zlib

import torch
from safetensors.torch import load_file, save_file

FWD_TOL, GRAD_TOL = 5e-3, 1e-2


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


def case(binary, workdir, shape, dtype, layout, mask, remainder):
    b, h, n, d = shape
    # A seed from the case itself (crc32, not Python's salted hash), so a failure repeats.
    seed = zlib.crc32(repr((shape, str(dtype), layout, mask, remainder)).encode())
    torch.manual_seed(seed)
    x = {name: torch.randn(b, h, n, d, device="cuda").to(dtype) for name in ["q", "k", "v", "do"]}
    drem = torch.randn(b, h, n, device="cuda", dtype=torch.float32)
    to_layout = (lambda t: t.transpose(1, 2).contiguous()) if layout == "bnhd" else (lambda t: t.contiguous())
    tensors = {name: to_layout(t).cpu() for name, t in x.items()}
    tensors["drem"] = drem.cpu()
    inp, out = os.path.join(workdir, "in.safetensors"), os.path.join(workdir, "out.safetensors")
    save_file(tensors, inp)
    cmd = [binary, "run", "--input", inp, "--output", out, "--pass", "both", "--layout", layout,
           "--mask", mask, "--remainder", remainder]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"FAIL {shape} {layout} {mask} {remainder}: exit {proc.returncode}\n{proc.stderr}")
        return False
    got = load_file(out)
    back = (lambda t: t.transpose(1, 2)) if layout == "bnhd" else (lambda t: t)

    o, rem, dq, dk, dv = grads(x, drem, mask == "attend_current", remainder == "fuse")
    floor_q = floor_k = None
    if remainder == "fuse":
        _, _, floor_q, floor_k, _ = grads(x, drem, mask == "attend_current", False)
    errs = {
        "o": rel(back(got["o"].cuda()), o),
        "rem": rel(got["rem"].cuda(), rem),
        "dq": rel(back(got["dq"].cuda()), dq, floor_q),
        "dk": rel(back(got["dk"].cuda()), dk, floor_k),
        "dv": rel(back(got["dv"].cuda()), dv),
    }
    ok = all(e <= (FWD_TOL if name in ("o", "rem") else GRAD_TOL) for name, e in errs.items())
    ok = ok and all(math.isfinite(e) for e in errs.values())
    line = " ".join(f"{name} {e:.2e}" for name, e in errs.items())
    print(f"{'ok  ' if ok else 'FAIL'} {','.join(map(str, shape))} {str(dtype)[6:]} {layout} {mask} {remainder} "
          f"(seed {seed}): {line}")
    return ok


def main(argv):
    if not argv:
        print(__doc__)
        return 2
    binary = os.path.abspath(argv[0])
    workdir = argv[argv.index("--workdir") + 1] if "--workdir" in argv else tempfile.mkdtemp()
    cases = [
        ((3, 5, 300, 128), torch.bfloat16, "bhnd", "strict", "return"),
        ((3, 5, 300, 128), torch.bfloat16, "bnhd", "attend_current", "fuse"),
        ((2, 3, 1000, 64), torch.float16, "bnhd", "strict", "return"),
        ((1, 7, 257, 64), torch.bfloat16, "bhnd", "attend_current", "return"),
        ((2, 2, 1, 128), torch.float16, "bhnd", "strict", "fuse"),
        # One row whose only key is itself: the dO . v parts of dq, dk cancel (see sbgen check).
        ((3, 5, 1, 64), torch.bfloat16, "bhnd", "attend_current", "fuse"),
    ]
    ok = all([case(binary, workdir, *c) for c in cases])
    print("run_check:", "all passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
