"""transformers' side of scripts/gpu-check.sh: a ~1.1B-parameter Llama (TinyLlama's shape)
with random weights, saved as two source checkpoints (the second a small perturbation of
the first) plus random token ids; then transformers' forward pass (bf16, sdpa) over them
in non-overlapping windows, timed after a warm-up batch.

    python hf_bench.py make  --dir D --tokens N
    python hf_bench.py bench --dir D --seq 2048 --batch 8   # prints one JSON object
"""
import argparse
import json
import os
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def make(d, tokens):
    cfg = LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(os.path.join(d, "a"))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    m.save_pretrained(os.path.join(d, "b"))
    rng = np.random.default_rng(0)
    rng.integers(0, cfg.vocab_size, size=tokens, dtype=np.uint16).tofile(os.path.join(d, "tokens.bin"))
    print(f"{sum(p.numel() for p in m.parameters()) / 1e9:.2f}B parameters, {tokens} tokens in {d}")


@torch.no_grad()
def bench(d, seq, batch, profile=False):
    path = os.path.join(d, "a")
    try:  # transformers >= 4.56 names it `dtype`; older ones only know `torch_dtype`
        m = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa")
    except TypeError:
        m = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    m = m.cuda().eval()
    toks = np.fromfile(os.path.join(d, "tokens.bin"), dtype=np.uint16).astype(np.int64)
    n = len(toks) // seq
    x = torch.from_numpy(toks[: n * seq].reshape(n, seq)).cuda()
    batches = [x[i : i + batch] for i in range(0, n, batch)]

    def run(b):
        logits = m(b).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        return -lp.gather(-1, b[:, 1:, None]).sum().item()

    run(batches[0])  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    total = sum(run(b) for b in batches)
    torch.cuda.synchronize()
    s = time.perf_counter() - t0
    scored = n * (seq - 1)
    if profile:
        # Where transformers' time goes (CUDA kernels over two batches), for the log.
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for b in batches[1:3]:
                run(b)
            torch.cuda.synchronize()
        import sys
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=20), file=sys.stderr)
    print(json.dumps({
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "windows": n, "seq": seq, "batch": batch, "seconds": s,
        # Scored tokens (every position but each window's last), as ckmerge counts them.
        "tokens_per_s": scored / s, "mean_nll": total / scored,
    }))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["make", "bench"])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--profile", action="store_true", help="after timing, print a CUDA kernel profile of two batches to stderr")
    a = ap.parse_args()
    make(a.dir, a.tokens) if a.mode == "make" else bench(a.dir, a.seq, a.batch, a.profile)
