"""Checks `sbgen run --pass decode` from the outside, the way a PyTorch serving stack would call it.

Makes a random KV cache with torch (contiguous [B, H_kv, N, D] or [B, N, H_kv, D], or paged
[num_pages, page_size, H_kv, D] with a shuffled block table, as vLLM and flash-attn's
`flash_attn_with_kvcache` lay it out), saves q, k_cache, v_cache, seqlens_k (and block_table) with
safetensors, runs `sbgen run --pass decode`, and compares o and rem with a float64 reference written
here from the definition (docs/math.md#decode): the new token is the last of each sequence's
`seqlens_k[b]` cached tokens, its query gives key j the share beta_j = sigmoid(q.k_j / sqrt(D)) of
what the nearer keys left. Nothing of sbgen's own reference or addressing is used: the reference
gathers each sequence's tokens from the pages itself. Needs a CUDA device, torch and safetensors.

    python3 scripts/dev/decode_check.py SBGEN_BINARY [--workdir DIR]

Exit status 0 when every case is within tolerance (o, rem <= 5e-3, relative L2).
"""
import math, os, subprocess, sys, tempfile

import torch
from safetensors.torch import load_file, save_file

TOL = 5e-3


def reference(q, keys, values, attend_current, fuse):
    """q [H, D], keys/values [H, len, D] (the sequence's cache, per query head) in float64: o [H, D],
    rem [H]. The new token is position len - 1."""
    n, d = keys.shape[1], q.shape[-1]
    if n == 0:
        return torch.zeros_like(q), torch.ones(q.shape[0], dtype=q.dtype)
    allowed = n if attend_current else n - 1
    k, v = keys[:, :allowed], values[:, :allowed]
    z = torch.einsum("hd,hnd->hn", q, k) / math.sqrt(d)
    log_beta = torch.nn.functional.logsigmoid(z)
    log_1mb = torch.nn.functional.logsigmoid(-z)
    # the stick left after the keys nearer than j: sum of log(1 - beta) over l > j.
    after = log_1mb.flip(-1).cumsum(-1).flip(-1) - log_1mb
    a = torch.exp(log_beta + after)
    o = torch.einsum("hn,hnd->hd", a, v)
    rem = torch.exp(log_1mb.sum(-1))
    if fuse:
        o = o + rem[:, None] * values[:, n - 1]
    return o, rem


def rel(got, want):
    got, want = got.double(), want.double()
    den = want.norm()
    err = (got - want).norm()
    return float(err / den) if den > 0 else float(err)


def make_case(seed, dtype, batch_lens, heads, kv_heads, d, cache, page_size):
    g = torch.Generator().manual_seed(seed)
    batch, n_max = len(batch_lens), max(batch_lens)
    q = torch.randn(batch, heads, d, generator=g).to(dtype)
    # the logical cache, [B, H_kv, N, D]; tokens past a sequence's length are NaN (never read)
    k = torch.randn(batch, kv_heads, n_max, d, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, n_max, d, generator=g).to(dtype)
    for b, n in enumerate(batch_lens):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    tensors = {"q": q, "seqlens_k": torch.tensor(batch_lens, dtype=torch.int32)}
    if cache == "bhnd":
        tensors["k_cache"], tensors["v_cache"] = k.contiguous(), v.contiguous()
    elif cache == "bnhd":
        tensors["k_cache"], tensors["v_cache"] = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    else:
        max_pages = (n_max + page_size - 1) // page_size
        num_pages = batch * max_pages + 3
        ids = torch.randperm(num_pages, generator=g)
        table = torch.full((batch, max_pages), -1, dtype=torch.int32)
        kp = torch.full((num_pages, page_size, kv_heads, d), float("nan")).to(dtype)
        vp = kp.clone()
        for b, n in enumerate(batch_lens):
            for p in range((n + page_size - 1) // page_size):
                pid = int(ids[b * max_pages + p])
                table[b, p] = pid
                rows = min(page_size, n_max - p * page_size)
                kp[pid, :rows] = k[b, :, p * page_size:p * page_size + rows].transpose(0, 1)
                vp[pid, :rows] = v[b, :, p * page_size:p * page_size + rows].transpose(0, 1)
        tensors.update(k_cache=kp, v_cache=vp, block_table=table)
    return tensors, k, v


def gather(tensors, cache, b, n, kv_heads, page_size):
    """Sequence b's n tokens, [H_kv, n, D], read back from the file's cache (paged: via its table)."""
    kc, vc = tensors["k_cache"], tensors["v_cache"]
    if cache == "bhnd":
        return kc[b, :, :n], vc[b, :, :n]
    if cache == "bnhd":
        return kc[b, :n].transpose(0, 1), vc[b, :n].transpose(0, 1)
    table = tensors["block_table"][b]
    idx = torch.arange(n)
    pages, rows = table[idx // page_size].long(), idx % page_size
    return kc[pages, rows].transpose(0, 1), vc[pages, rows].transpose(0, 1)


def main(argv):
    binary = os.path.abspath(argv[1])
    workdir = argv[argv.index("--workdir") + 1] if "--workdir" in argv else tempfile.mkdtemp()
    os.makedirs(workdir, exist_ok=True)
    cases = []
    seed = 1
    for d in [128, 64, 80]:
        for dtype in [torch.bfloat16, torch.float16]:
            for cache, page in [("bhnd", 0), ("bnhd", 0), ("paged", 16), ("paged", 32), ("paged", 64)]:
                for mask, fuse, ee in [("strict", False, None), ("attend_current", True, 24)]:
                    heads, kv_heads = (32, 8) if d == 128 else (6, 2)
                    cases.append((seed, d, dtype, cache, page, mask, fuse, ee, heads, kv_heads))
                    seed += 1
    failed = 0
    for seed, d, dtype, cache, page, mask, fuse, ee, heads, kv_heads in cases:
        lens = [1, 17, 1000, 4097, 0, 65537] if seed % 5 == 0 else [1, 17, 1000, 4097, 0]
        tensors, k, v = make_case(seed, dtype, lens, heads, kv_heads, d, cache, page)
        path = os.path.join(workdir, f"dec{seed}.safetensors")
        out = os.path.join(workdir, f"dec{seed}.out.safetensors")
        save_file(tensors, path)
        cmd = [binary, "run", "--pass", "decode", "-i", path, "-o", out, "--layout", cache, "--mask", mask]
        if fuse:
            cmd += ["--remainder", "fuse"]
        if ee:
            cmd += ["--early-exit-bits", str(ee)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        name = f"D={d} {str(dtype)[6:]} {cache}{'/' + str(page) if page else ''} {mask}{' fuse' if fuse else ''}" \
               f"{' ee' + str(ee) if ee else ''} {heads}:{kv_heads} lens {lens}"
        if r.returncode != 0:
            print(f"FAIL {name}: exit {r.returncode}: {r.stderr.strip()[:300]}")
            failed += 1
            continue
        got = load_file(out)
        o_want, rem_want = [], []
        for b, n in enumerate(lens):
            kb, vb = gather(tensors, cache, b, n, kv_heads, page)
            group = heads // kv_heads
            kb, vb = kb.double().repeat_interleave(group, 0), vb.double().repeat_interleave(group, 0)
            o, rem = reference(tensors["q"][b].double(), kb, vb, mask == "attend_current", fuse)
            o_want.append(o)
            rem_want.append(rem)
        e_o, e_rem = rel(got["o"], torch.stack(o_want)), rel(got["rem"], torch.stack(rem_want))
        ok = e_o <= TOL and e_rem <= TOL and torch.isfinite(got["o"].float()).all() and torch.isfinite(got["rem"]).all()
        failed += 0 if ok else 1
        print(f"{'ok  ' if ok else 'FAIL'} {name}: o {e_o:.2e} rem {e_rem:.2e}")
        os.remove(path)
        os.remove(out)
    print(f"decode_check: {len(cases) - failed} of {len(cases)} cases passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
