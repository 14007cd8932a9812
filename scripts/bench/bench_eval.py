#!/usr/bin/env python3
"""Forward-pass throughput of `ckmerge eval` against PyTorch (transformers, fp32, torch
threads = cores) on the same model, the same tokens and windows, in one run. Run through
scripts/bench_eval.sh.

Both score the same non-overlapping windows of the same token stream (ckmerge's data
convention, reproduced here as in scripts/fixtures/make_trajectory.py). Throughput is
tokens through the forward pass per second, excluding model loading and tokenization;
best of --repeats for each side. The mean NLLs are printed side by side as a check.
"""
import argparse
import json
import os
import subprocess
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def stream(tok, path):
    with open(path) as f:
        text = f.read()
    ids = tok(text)["input_ids"]
    if tok.bos_token_id is None or not ids or ids[0] != tok.bos_token_id or tok.bos_token_id == tok.eos_token_id:
        ids = ids + [tok.eos_token_id]
    return ids


@torch.no_grad()
def torch_eval(model, ids, seq, batch):
    wins = [ids[i:i + seq] for i in range(0, len(ids) - seq + 1, seq)]
    total, count, t = 0.0, 0, time.perf_counter()
    for b in range(0, len(wins), batch):
        x = torch.tensor(wins[b:b + batch])
        logits = model(input_ids=x).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                x[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    dt = time.perf_counter() - t
    return total / count, len(wins) * seq / dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckmerge", required=True)
    ap.add_argument("--model", action="append", required=True, help="NAME=DIR")
    ap.add_argument("--data", required=True)
    ap.add_argument("--seq-len", type=int, action="append", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    cores = os.cpu_count()
    torch.set_num_threads(cores)
    rows = []
    for spec, seq in zip(a.model, a.seq_len):
        name, d = spec.split("=", 1)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(d)
        ids = stream(tok, a.data)
        params = sum(p.numel() for p in model.parameters())
        torch_eval(model, ids[: seq * a.batch], seq, a.batch)  # warm-up
        best_t, nll_t = 0.0, None
        for _ in range(a.repeats):
            nll_t, tps = torch_eval(model, ids, seq, a.batch)
            best_t = max(best_t, tps)
        best_c, nll_c = 0.0, None
        for _ in range(a.repeats):
            out = subprocess.check_output([a.ckmerge, "eval", d, "--data", a.data, "--seq-len", str(seq),
                                           "--batch", str(a.batch), "--json"], stderr=subprocess.DEVNULL)
            r = json.loads(out)["datasets"][0]
            nll_c = r["mean_nll"]
            best_c = max(best_c, r["tokens_per_s"])
        rows.append((name, params, seq, best_c, best_t, nll_c, nll_t))
        print(f"{name}: ckmerge {best_c:.0f} tok/s, torch {best_t:.0f} tok/s", flush=True)
    print(f"\nmachine: {os.uname().nodename} {os.uname().machine}, {cores} cores; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads, fp32, attn {model.config._attn_implementation}), transformers {transformers.__version__}")
    print(f"batch {a.batch} windows, best of {a.repeats}\n")
    print("| model | parameters | seq | ckmerge tok/s | PyTorch tok/s | ratio | mean NLL ckmerge / PyTorch |")
    print("|---|---|---|---|---|---|---|")
    for name, params, seq, c, t, nc, nt in rows:
        print(f"| {name} | {params / 1e6:.2f}M | {seq} | {c:.0f} | {t:.0f} | {c / t:.2f}x | {nc:.6f} / {nt:.6f} |")


if __name__ == "__main__":
    main()
