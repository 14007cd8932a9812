#!/usr/bin/env python3
"""Multiple-choice scoring speed: `ckmerge eval --task` against lm-evaluation-harness's own
Hugging Face model (`lm_eval.models.huggingface.HFLM`, float32 on the CPU, torch threads =
cores), on the same model, items and requests, in one run. Used by scripts/bench_choice.sh.

Timed: scoring only. ckmerge's `seconds` of the task in `eval --json` (after loading and
merging); the harness's `HFLM.loglikelihood` on the task's requests (after loading; it
tokenizes, sorts by length and batches as it does in an evaluation). Tokens: the forward
pass's input tokens, the same count on both sides (context and continuation, cut to the
model's length, without the last token). Each side is run `--repeats` times; the best is
kept.
"""
import argparse
import json
import os
import subprocess
import sys
import time


def ckmerge_run(binary, model, task, threads):
    out = subprocess.run(
        [binary, "eval", model, "--task", task, "--json", "--threads", str(threads)],
        check=True, capture_output=True, text=True,
    ).stdout
    t = json.loads(out)["tasks"][0]
    return t["seconds"], t["tokens"], t["acc"], t["acc_norm"]


def harness_run(model, task, batch):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, dtype="float32", device="cpu", batch_size=batch)
    items = [json.loads(l) for l in open(task, encoding="utf-8") if l.strip()]
    reqs = []
    for i, it in enumerate(items):
        d = it.get("target_delimiter", " ")
        for c in it["choices"]:
            reqs.append(Instance(request_type="loglikelihood", doc=it,
                                 arguments=(it["context"], f"{d}{c}"), idx=i))
    tokens = 0
    for r in reqs:
        ctx, cont = lm._encode_pair(*r.args)
        tokens += min(len(ctx) + len(cont), lm.max_length + 1) - 1
    t0 = time.perf_counter()
    res = lm.loglikelihood(reqs, disable_tqdm=True)
    seconds = time.perf_counter() - t0
    return seconds, tokens, len(res)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckmerge", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--model", action="append", required=True, help="NAME=DIR")
    ap.add_argument("--batch", type=int, default=8, help="the harness's batch size")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    import torch
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    rows = []
    for spec in a.model:
        name, path = spec.split("=", 1)
        ck = min((ckmerge_run(a.ckmerge, path, a.task, threads) for _ in range(a.repeats)),
                 key=lambda r: r[0])
        hf = min((harness_run(path, a.task, a.batch) for _ in range(a.repeats)), key=lambda r: r[0])
        assert ck[1] == hf[1], f"{name}: token counts differ: ckmerge {ck[1]}, harness {hf[1]}"
        rows.append({
            "model": name, "tokens": ck[1], "requests": hf[2],
            "ckmerge_s": ck[0], "harness_s": hf[0],
            "ckmerge_tok_s": ck[1] / ck[0], "harness_tok_s": hf[1] / hf[0],
            "ratio": (ck[1] / ck[0]) / (hf[1] / hf[0]),
        })
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, {threads} threads, harness batch {a.batch}, best of {a.repeats}")
    print()
    print("| model | requests | input tokens | ckmerge tokens/s | lm-eval HFLM tokens/s | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['requests']} | {r['tokens']} | {r['ckmerge_tok_s']:.0f} "
              f"| {r['harness_tok_s']:.0f} | {r['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
