#!/usr/bin/env python3
"""ckmerge merge against mergekit's `linear` merge on the same synthetic checkpoints with
Llama-3.2-1B's layout (bf16), in one run, with this machine's memory bandwidth (STREAM
triad) and disk read rate measured alongside. Run through scripts/bench_merge.sh.

Each tool runs the same 3-way merge (weights 0.2, 0.3, 0.5, bf16 out; mergekit computes
in float32 like ckmerge) with a warm page cache (inputs read beforehand) and with a cold
one (caches dropped). Reported per run: wall time, peak RSS (wait4's ru_maxrss, which
counts mapped file pages too), and throughput = (N + 1) x model bytes / wall time.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import statistics
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file, load_file

# meta-llama/Llama-3.2-1B's config.json (sizes and architecture; the weights are random).
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001,
    "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256,
}
WEIGHTS = [0.2, 0.3, 0.5]


def llama_shapes(c):
    h, i, v, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for l in range(L):
        p = f"model.layers.{l}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
    return shapes


def make_checkpoints(root, n):
    dirs = []
    shapes = llama_shapes(LLAMA_3_2_1B)
    for k in range(n):
        d = os.path.join(root, f"ckpt-{k}")
        dirs.append(d)
        if os.path.exists(os.path.join(d, "model.safetensors")):
            continue
        os.makedirs(d, exist_ok=True)
        g = torch.Generator().manual_seed(k)
        tensors = {name: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for name, s in shapes.items()}
        save_file(tensors, os.path.join(d, "model.safetensors.tmp"), metadata={"format": "pt"})
        os.rename(os.path.join(d, "model.safetensors.tmp"), os.path.join(d, "model.safetensors"))
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(LLAMA_3_2_1B, f, indent=2)
        print(f"made {d}", flush=True)
    return dirs


def drop_caches(paths):
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for p in paths:
            for root, _, files in os.walk(p):
                for name in files:
                    fd = os.open(os.path.join(root, name), os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
        return "posix_fadvise(DONTNEED)"


def read_all(paths):
    total = 0
    for p in paths:
        for root, _, files in os.walk(p):
            for name in files:
                with open(os.path.join(root, name), "rb", buffering=0) as f:
                    while chunk := f.read(16 << 20):
                        total += len(chunk)
    return total


def run(cmd):
    """Runs cmd under /usr/bin/time; returns (wall seconds, peak RSS in bytes).

    Peak RSS comes from GNU time, a small process, because a child forked from this
    Python process would report Python's own resident set (torch is loaded) as its peak.
    """
    with tempfile.NamedTemporaryFile(mode="r") as rss:
        t = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall = time.perf_counter() - t
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr.decode(errors='replace')}")
        return wall, int(rss.read().split()[-1]) * 1024


def max_ulps(a_dir, b_dir):
    a, b = load_file(os.path.join(a_dir, "model.safetensors")), {}
    for root, _, files in os.walk(b_dir):
        for name in files:
            if name.endswith(".safetensors"):
                b.update(load_file(os.path.join(root, name)))
    worst, differing, total = 0, 0, 0
    for name, t in a.items():
        u = b[name]
        ia, ib = t.view(torch.int16).int(), u.view(torch.int16).int()
        fa = torch.where(ia < 0, -(ia & 0x7FFF), ia)
        fb = torch.where(ib < 0, -(ib & 0x7FFF), ib)
        d = (fa - fb).abs()
        worst = max(worst, int(d.max()))
        differing += int((d != 0).sum())
        total += d.numel()
    missing = set(a) ^ set(b)
    return worst, differing, total, missing


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--ckmerge", required=True)
    ap.add_argument("--mergekit-yaml", required=True)
    ap.add_argument("--runs", type=int, default=3, help="warm runs per tool")
    ap.add_argument("--triad", required=True)
    ap.add_argument("--kernel-bandwidth", required=True, help="the merge_bandwidth example binary")
    a = ap.parse_args()

    dirs = make_checkpoints(a.dir, len(WEIGHTS))
    model_bytes = os.path.getsize(os.path.join(dirs[0], "model.safetensors"))
    moved = (len(dirs) + 1) * model_bytes
    out_ck = os.path.join(a.dir, "out-ckmerge")
    out_mk = os.path.join(a.dir, "out-mergekit")
    cfg = os.path.join(a.dir, "mergekit.yml")
    with open(cfg, "w") as f:
        f.write("merge_method: linear\ndtype: float32\nout_dtype: bfloat16\nparameters:\n  normalize: false\nmodels:\n")
        for d, w in zip(dirs, WEIGHTS):
            f.write(f"  - model: {d}\n    parameters:\n      weight: {w}\n")
    ck_cmd = [a.ckmerge, "merge", *dirs, "--weights", ",".join(map(str, WEIGHTS)), "--out", out_ck, "--force"]
    mk_cmd = [a.mergekit_yaml, cfg, out_mk, "--no-copy-tokenizer", "--quiet"]

    triad = float(subprocess.check_output([a.triad]).decode())
    kernel = subprocess.check_output([a.kernel_bandwidth, "512", str(len(dirs))]).decode().strip().splitlines()
    how = drop_caches(dirs)
    t = time.perf_counter()
    n = read_all([dirs[0]])
    disk_cold = n / (time.perf_counter() - t)
    t = time.perf_counter()
    n = read_all([dirs[0]])
    disk_warm = n / (time.perf_counter() - t)

    results = []
    for mode in ["warm", "cold"]:
        for tool, cmd, out in [("ckmerge", ck_cmd, out_ck), ("mergekit", mk_cmd, out_mk)]:
            runs = a.runs if mode == "warm" else 1
            for r in range(runs):
                shutil.rmtree(out_mk, ignore_errors=True)
                if tool == "ckmerge" and os.path.exists(out_ck):
                    shutil.rmtree(out_ck)
                if mode == "cold":
                    drop_caches(dirs)
                else:
                    read_all(dirs)
                os.sync()
                wall, rss = run(cmd)
                results.append({"mode": mode, "tool": tool, "run": r, "wall_s": wall, "peak_rss": rss,
                                "gb_per_s": moved / wall / 1e9})
                print(f"{mode} {tool} run {r}: {wall:.2f} s, peak RSS {rss / 1e9:.2f} GB, "
                      f"{moved / wall / 1e9:.2f} GB/s", flush=True)
    worst, differing, total, missing = max_ulps(out_ck, out_mk)

    def best(mode, tool):
        rs = [r for r in results if r["mode"] == mode and r["tool"] == tool]
        return min(rs, key=lambda r: r["wall_s"])

    lines = []
    lines.append(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
                 f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; "
                 f"torch {torch.__version__}")
    lines.append(f"model: Llama-3.2-1B layout, bf16, {model_bytes / 1e9:.3f} GB per checkpoint, "
                 f"{len(dirs)} checkpoints; bytes moved per merge (N+1) x model = {moved / 1e9:.2f} GB")
    lines.append(f"memory bandwidth (STREAM triad, all cores): {triad:.2f} GB/s")
    for k in kernel:
        gbs = float(k.split(": ")[1].split()[0])
        lines.append(f"merge kernel alone, in memory: {k} = {100 * gbs / triad:.0f}% of triad")
    lines.append(f"disk read of one checkpoint: cold ({how}) {disk_cold / 1e9:.2f} GB/s, warm {disk_warm / 1e9:.2f} GB/s")
    lines.append("")
    lines.append("| cache | tool | runs | wall (s, best / median) | peak RSS (GB) | throughput (GB/s, best) | % of triad |")
    lines.append("|---|---|---|---|---|---|---|")
    for mode in ["warm", "cold"]:
        for tool in ["ckmerge", "mergekit"]:
            rs = [r for r in results if r["mode"] == mode and r["tool"] == tool]
            r = best(mode, tool)
            med = statistics.median(x["wall_s"] for x in rs)
            rss = max(x["peak_rss"] for x in rs)
            lines.append(f"| {mode} | {tool} | {len(rs)} | {r['wall_s']:.2f} / {med:.2f} | {rss / 1e9:.3f} | "
                         f"{r['gb_per_s']:.2f} | {100 * r['gb_per_s'] / triad:.0f}% |")
    lines.append("")
    for mode in ["warm", "cold"]:
        ck, mk = best(mode, "ckmerge"), best(mode, "mergekit")
        rss_ck = max(x["peak_rss"] for x in results if x["mode"] == mode and x["tool"] == "ckmerge")
        rss_mk = max(x["peak_rss"] for x in results if x["mode"] == mode and x["tool"] == "mergekit")
        lines.append(f"{mode}: ckmerge is {mk['wall_s'] / ck['wall_s']:.1f}x mergekit's throughput (best runs); "
                     f"peak RSS {rss_ck / rss_mk:.3f} of mergekit's")
    lines.append(f"outputs: max {worst} bf16 ulp apart, {differing} of {total} elements differ"
                 + (f"; tensors in one only: {sorted(missing)}" if missing else "; same tensors"))
    print("\n".join(lines))
    with open(os.path.join(a.dir, "results.json"), "w") as f:
        json.dump({"runs": results, "triad_gb_s": triad, "kernel": kernel, "disk_cold": disk_cold, "summary": lines}, f, indent=1)


if __name__ == "__main__":
    main()
