"""torch SDPA decode (softmax, one query per sequence) timed the way `sbgen bench --decode` times.

The baselines script times with `triton.testing.do_bench`, which empties the L2 by zeroing a buffer:
the decode then also pays for writing those dirty lines back. `sbgen bench --decode --flush read`
empties it with a read sweep instead (docs/performance.md#decode); this script times cuDNN's and
flash's SDPA decode both ways, so the two tools' figures compare under the same flush.

    python3 scripts/dev/sdpa_decode.py [--reps 30] [--json OUT] B,H,H_KV,N,D ...

Each rep: the GPU first sleeps (so the host has queued the rep before it starts), the L2 is emptied
(read: a sum over 256 MiB; write: 256 MiB zeroed), then the decode runs between two CUDA events.
Reports the median ms and GB/s of the context's K and V bytes.
"""
import json, statistics, sys

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend

FLUSH_BYTES = 256 << 20


def time_decode(fn, flush, reps):
    scratch = torch.zeros(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    out = []
    for _ in range(5):  # warm-up: workspace allocations, cuDNN plan building
        fn()
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(2_000_000)
        if flush == "read":
            scratch.sum()
        else:
            scratch.zero_()
        start.record()
        fn()
        end.record()
        out.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in out)


def main(argv):
    reps, out = 30, None
    if "--reps" in argv:
        i = argv.index("--reps")
        reps = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    if "--json" in argv:
        i = argv.index("--json")
        out = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    rows = []
    for spec in argv:
        B, Hq, Hkv, N, D = (int(x) for x in spec.split(","))
        q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
        k, v = [torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        kv_bytes = 2 * B * Hkv * N * D * 2
        row = {"decode": [B, Hq, Hkv, N, D], "gpu": torch.cuda.get_device_name()}
        for name, backend in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]:
            for flush in ("read", "write"):
                try:
                    with torch.no_grad(), sdpa_kernel(backend):
                        ms = time_decode(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv),
                                         flush, reps)
                    row[f"sdpa_{name}_{flush}"] = {"ms": ms, "gbps": kv_bytes / ms / 1e6}
                except RuntimeError as e:
                    print(f"{name} decode unavailable: {str(e)[:120]}", file=sys.stderr)
        print(row["decode"], " ".join(f"{k} {c['ms']:.4f}ms/{c['gbps']:.0f}GB/s"
                                      for k, c in row.items() if isinstance(c, dict)), flush=True)
        rows.append(row)
    if out:
        json.dump(rows, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
