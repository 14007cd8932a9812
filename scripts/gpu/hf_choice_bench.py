"""transformers' side of scripts/gpu-check.sh step 4b: multiple-choice log-likelihoods as
lm-evaluation-harness's Hugging Face model (`HFLM`) computes them, without the harness
(the GPU machine has no network to install it): its `_encode_pair`, each request's input
cut to the model's length and stripped of its last token, requests sorted longest first,
right-padded batches, log-softmax over the continuation positions. Timed after a warm-up
batch. The task is made from a text file so that contexts are long enough to load a GPU.

    python hf_choice_bench.py make  --text FILE --out TASK.jsonl [--items N]
    python hf_choice_bench.py bench --dir MODEL --task TASK.jsonl [--batch 8]
                                    [--device cuda] [--dtype bf16]   # prints one JSON object
"""
import argparse
import json
import random
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def make(text, out, items):
    """A cloze task: a context of 60 to 400 words of `text`, the true next 3 to 8 words
    among three spans taken elsewhere (the gold index drawn at random). Deterministic."""
    words = open(text, encoding="utf-8").read().split()
    rng = random.Random(0)
    with open(out, "w", encoding="utf-8") as f:
        for _ in range(items):
            n = rng.randint(60, 400)
            s = rng.randrange(0, len(words) - n - 8)
            k = rng.randint(3, 8)
            true = " ".join(words[s + n : s + n + k])
            others = []
            while len(others) < 3:
                o = rng.randrange(0, len(words) - k)
                span = " ".join(words[o : o + k])
                if span != true and span not in others:
                    others.append(span)
            gold = rng.randrange(4)
            choices = others[:gold] + [true] + others[gold:]
            f.write(json.dumps({"context": " ".join(words[s : s + n]), "choices": choices,
                                "gold": gold}) + "\n")
    print(f"{items} items in {out}")


def encode_pair(tok, context, continuation):
    """lm-evaluation-harness 0.4's `TemplateLM._encode_pair` (trailing spaces of the
    context move to the continuation; the continuation is the whole's tokens after the
    context's), with HFLM 0.4.13's `tok_encode`: the tokenizer's own special tokens (what
    ckmerge's `worker/src/choice.rs` reproduces and the goldens check)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def bench(d, task, batch, device, dtype):
    tok = AutoTokenizer.from_pretrained(d)
    dt = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype]
    try:  # transformers >= 4.56 names it `dtype`; older ones only know `torch_dtype`
        m = AutoModelForCausalLM.from_pretrained(d, dtype=dt, attn_implementation="sdpa")
    except TypeError:
        m = AutoModelForCausalLM.from_pretrained(d, torch_dtype=dt, attn_implementation="sdpa")
    m = m.to(device).eval()
    max_length = m.config.max_position_embeddings
    reqs = []
    for line in open(task, encoding="utf-8"):
        if not line.strip():
            continue
        it = json.loads(line)
        delim = it.get("target_delimiter", " ")
        for c in it["choices"]:
            ctx, cont = encode_pair(tok, it["context"], f"{delim}{c}")
            # HFLM._loglikelihood_tokens: (context + continuation)[-(max_length + 1):][:-1].
            inp = (ctx + cont)[-(max_length + 1):][:-1]
            reqs.append((inp, cont))
    order = sorted(range(len(reqs)), key=lambda i: (-len(reqs[i][0]), tuple(reqs[i][0])))
    batches = [order[i : i + batch] for i in range(0, len(order), batch)]

    def run(b):
        longest = max(len(reqs[i][0]) for i in b)
        x = torch.zeros((len(b), longest), dtype=torch.long)
        for r, i in enumerate(b):
            inp = reqs[i][0]
            x[r, : len(inp)] = torch.tensor(inp)
        lp = torch.log_softmax(m(x.to(device)).logits.float(), dim=-1)
        out = []
        for r, i in enumerate(b):
            inp, cont = reqs[i]
            rows = lp[r, len(inp) - len(cont) : len(inp)]
            c = torch.tensor(cont, device=device)
            out.append((i, rows.gather(-1, c[:, None]).sum().item()))
        return out

    run(batches[0])  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    lls = [None] * len(reqs)
    for b in batches:
        for i, ll in run(b):
            lls[i] = ll
    if device == "cuda":
        torch.cuda.synchronize()
    s = time.perf_counter() - t0
    tokens = sum(len(inp) for inp, _ in reqs)
    print(json.dumps({
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "requests": len(reqs), "batch": batch, "seconds": s,
        # Input tokens of the forward passes, as ckmerge's `tokens` of a task counts them.
        "tokens": tokens, "tokens_per_s": tokens / s, "lls": lls,
    }))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["make", "bench"])
    ap.add_argument("--text")
    ap.add_argument("--out")
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--dir")
    ap.add_argument("--task")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    a = ap.parse_args()
    if a.mode == "make":
        make(a.text, a.out, a.items)
    else:
        bench(a.dir, a.task, a.batch, a.device, a.dtype)
