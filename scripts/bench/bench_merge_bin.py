#!/usr/bin/env python3
"""`ckmerge merge` from pytorch_model.bin inputs against the same merge from safetensors
inputs (the issue's goal: >= 90 % of the throughput), with PyTorch as the peer: torch.load
(mmap=True, weights_only=True) of the .bin files, the same fp32 weighted sum per tensor
rounded to bf16, safetensors.torch.save_file. Two synthetic checkpoints in bf16 with a
Llama layout, written once by torch (safetensors and .bin hold the same values). Warm page
cache; the median of --runs runs per variant; peak RSS of each run from /usr/bin/time.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

import safetensors.torch
import torch


def make(dir, seed, layers, hidden, inter, vocab):
    st, pt = os.path.join(dir, f"st-{seed}"), os.path.join(dir, f"bin-{seed}")
    if os.path.exists(os.path.join(pt, "pytorch_model.bin")):
        return st, pt
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n, shape in [("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden, hidden)),
                         ("self_attn.v_proj", (hidden, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                         ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                         ("mlp.down_proj", (hidden, inter))]:
            sd[p + n + ".weight"] = torch.randn(*shape, generator=g)
        sd[p + "input_layernorm.weight"] = torch.ones(hidden)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    sd["model.norm.weight"] = torch.ones(hidden)
    sd["lm_head.weight"] = torch.randn(vocab, hidden, generator=g)
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}
    cfg = ('{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": %d, '
           '"intermediate_size": %d, "num_hidden_layers": %d, "num_attention_heads": %d, '
           '"num_key_value_heads": %d, "vocab_size": %d, "max_position_embeddings": 2048, '
           '"rms_norm_eps": 1e-5, "tie_word_embeddings": false, "torch_dtype": "bfloat16"}\n'
           % (hidden, inter, layers, hidden // 64, hidden // 64, vocab))
    for d in (st, pt):
        os.makedirs(d, exist_ok=True)
        open(os.path.join(d, "config.json"), "w").write(cfg)
    safetensors.torch.save_file(sd, os.path.join(st, "model.safetensors"), metadata={"format": "pt"})
    torch.save(sd, os.path.join(pt, "pytorch_model.bin"))
    return st, pt


def timed(cmd):
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{cmd[0]} failed: {r.stderr}")
    return time.perf_counter() - t, int(r.stderr.strip().splitlines()[-1]) * 1024


TORCH_MERGE = r"""
import sys, torch, safetensors.torch
a, b, out = sys.argv[1:4]
sa = torch.load(a, mmap=True, weights_only=True)
sb = torch.load(b, mmap=True, weights_only=True)
merged = {k: (0.5 * sa[k].float() + 0.5 * sb[k].float()).to(sa[k].dtype) for k in sa}
safetensors.torch.save_file(merged, out, metadata={"format": "pt"})
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--ckmerge", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    st1, pt1 = make(a.dir, 1, a.layers, a.hidden, a.inter, a.vocab)
    st2, pt2 = make(a.dir, 2, a.layers, a.hidden, a.inter, a.vocab)
    size = os.path.getsize(os.path.join(st1, "model.safetensors"))
    out = os.path.join(a.dir, "out")
    variants = {
        "ckmerge, safetensors inputs": lambda: [a.ckmerge, "merge", st1, st2, "--lambda", "0.5", "--out", out, "--force"],
        "ckmerge, pytorch_model.bin inputs": lambda: [a.ckmerge, "merge", pt1, pt2, "--lambda", "0.5", "--out", out, "--force"],
        "PyTorch (torch.load mmap + save_file), .bin inputs": lambda: [sys.executable, "-c", TORCH_MERGE,
            os.path.join(pt1, "pytorch_model.bin"), os.path.join(pt2, "pytorch_model.bin"), os.path.join(a.dir, "torch-out.safetensors")],
    }
    # Warm the page cache with every input once.
    for d in (st1, st2, pt1, pt2):
        for f in os.listdir(d):
            with open(os.path.join(d, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass
    rows = []
    for name, cmd in variants.items():
        runs = [timed(cmd()) for _ in range(a.runs)]
        t = statistics.median(r[0] for r in runs)
        rss = max(r[1] for r in runs)
        rows.append((name, t, 2 * size / t / 1e9, rss))
    base = rows[0][1]
    print(f"inputs: 2 x {size / 1e9:.2f} GB bf16 ({a.layers} layers, hidden {a.hidden}); "
          f"torch {torch.__version__}; median of {a.runs} warm runs")
    print("| variant | seconds | input GB/s | throughput vs safetensors | peak RSS |")
    print("|---|---|---|---|---|")
    for name, t, gbs, rss in rows:
        print(f"| {name} | {t:.2f} | {gbs:.2f} | {base / t * 100:.0f} % | {rss / 2**20:.0f} MiB |")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
