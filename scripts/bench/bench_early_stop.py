"""Runs each search with search.early_stop off and on (see scripts/bench_early_stop.sh)."""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests/fixtures/trajectory"
SEEDS = int(os.environ.get("BENCH_SEEDS", "3"))
# search.early_stop_margin of the runs with early stopping on (BENCH_MARGIN=0.001).
MARGIN = float(os.environ.get("BENCH_MARGIN", "0"))
# The held-out texts: "fixture" (the committed data/heldout.txt and data/python-docs.txt:
# 194 and 108 windows of 128 tokens) or "large" (BENCH_DATA=large: the first 600000
# characters of the held-out book chapters and the Rust Reference, never trained on, and all
# of Python's reference topics: 2350 and 1674 windows; written under target/bench-data from
# the documentation that ships with the toolchain and with Python, scripts/fixtures/rustdocs.py).
# A look's power grows with the windows scored, and a user's held-out set has thousands of
# windows, not 194.
DATA = os.environ.get("BENCH_DATA", "fixture")
LARGE_CHARS = 600_000


def texts():
    if DATA == "fixture":
        return FIX / "data/heldout.txt", FIX / "data/python-docs.txt"
    if DATA != "large":
        raise SystemExit(f"BENCH_DATA={DATA}: give fixture or large")
    sys.path.insert(0, str(ROOT / "scripts/fixtures"))
    import rustdocs
    out = ROOT / "target/bench-data"
    out.mkdir(parents=True, exist_ok=True)
    held, py = out / "heldout-large.txt", out / "python-docs-large.txt"
    held.write_text(rustdocs.heldout_large(LARGE_CHARS), encoding="utf-8")
    py.write_text(rustdocs.python_docs(LARGE_CHARS), encoding="utf-8")
    return held, py


HELDOUT, PYTHON = texts()

# The task of the task mixture: the committed 400-item cloze-large.jsonl, or with
# BENCH_TASK_ITEMS=N a cloze task of N items of the same kind (make_mc_task.items, seed 1)
# on the lines of the held-out text in use, written under target/bench-data. A look on a
# task sees 1/16 of its items first: on 400 items that is 25 noisy units (an item's choice
# NLL moves by nats between merges), where a user's benchmark has thousands.
TASK_ITEMS = int(os.environ.get("BENCH_TASK_ITEMS", "400"))


def task():
    if TASK_ITEMS == 400:
        return FIX / "tasks/cloze-large.jsonl"
    sys.path.insert(0, str(ROOT / "scripts/fixtures"))
    import make_mc_task
    out = ROOT / "target/bench-data"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cloze-{TASK_ITEMS}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for it in make_mc_task.items(seed=1, n_items=TASK_ITEMS, n_newline=0, source=HELDOUT):
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    return path


TASK = task()


def steps(traj):
    d = FIX / traj
    return sorted((p for p in d.iterdir() if p.name.startswith("step-")),
                  key=lambda p: int(p.name.split("-")[1]))


TEXT = f"objective = [{json.dumps(str(HELDOUT))}]\n"
# Weighted mixtures: a task (sampled by items) with a text, and two texts.
TASK_MIX = (
    "objective = { heldout = 3, cloze = 1 }\n"
    f"extra = {{ heldout = [{json.dumps(str(HELDOUT))}] }}\n"
    f"tasks = {{ cloze = {json.dumps(str(TASK))} }}\n")
TEXT_MIX = (
    "objective = { heldout = 1, python = 1 }\n"
    f"extra = {{ heldout = [{json.dumps(str(HELDOUT))}], "
    f"python = [{json.dumps(str(PYTHON))}] }}\n")

# (name, tuned on?, checkpoints, space, max_evals, data)
CASES = [
    ("long simplex 12", True, steps("long"), 'kind = "simplex"', 15, TEXT),
    ("llama simplex 6", False, steps("llama"), 'kind = "simplex"', 15, TEXT),
    ("neox simplex 6", False, steps("neox"), 'kind = "simplex"', 15, TEXT),
    ("llama lambda", False, steps("llama")[-2:], 'kind = "lambda"', 8, TEXT),
    ("neox lambda", False, steps("neox")[-2:], 'kind = "lambda"', 8, TEXT),
    ("long simplex 12, task mix", False, steps("long"), 'kind = "simplex"', 15, TASK_MIX),
    ("llama simplex 6, text mix", False, steps("llama"), 'kind = "simplex"', 15, TEXT_MIX),
]
# BENCH_CASES="task mix,text mix" runs the cases whose names contain one of these;
# BENCH_CASES=single the searches of one text (no mixture).
ONLY = [c for c in os.environ.get("BENCH_CASES", "").split(",") if c]
# BENCH_ON_EVALS=2: the early-stopped runs make twice the trials (max_evals times it), to
# compare the two at about equal tokens rather than at equal trials.
ON_EVALS = float(os.environ.get("BENCH_ON_EVALS", "1"))


def run(binary, ckpts, space, evals, seed, early, data):
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "run.toml"
        cfg.write_text(
            f"checkpoints = {json.dumps([str(c) for c in ckpts])}\n"
            f"[space]\n{space}\n"
            f"[data]\n{data}seq_len = 128\n"
            f"[search]\nmax_evals = {evals}\nseed = {seed}\n"
            f"early_stop = {'true' if early else 'false'}\n"
            + (f"early_stop_margin = {MARGIN}\n" if early and MARGIN else "")
            + "[output]\nplots = false\nmerge = false\n")
        t0 = time.time()
        subprocess.run([binary, "search", "--config", str(cfg), "--run-dir",
                        str(Path(tmp) / "run")], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.time() - t0
        rep = json.loads((Path(tmp) / "run/report.json").read_text())
        # Scoring speed of the trials scored whole: raced ones go one window per pass.
        done = [d for d in map(json.loads, (Path(tmp) / "run/trials.jsonl").read_text().splitlines())
                if d.get("event") == "done"]
        speeds = sorted(
            d["tokens"] / d["eval_seconds"]
            for d in done if not d.get("partial") and d["eval_seconds"] > 0)
        # What the test decided, checked: the trials it stopped scored whole afterwards
        # (`ckmerge eval` at their weights), so that the best of the same trials scored
        # whole is known. The margin's guarantee is against that, not against the other
        # run, which takes another path once the surrogates differ. `eval` is first
        # checked to give a trial the search scored whole its journalled value (to 1e-6:
        # eval batches a task's choices otherwise, so f32 sums differ by ~1e-8).
        same_whole = None
        if early:
            whole = [d for d in done if not d.get("partial")]
            if whole:
                again = eval_whole(binary, ckpts, whole[0]["weights"], data)
                assert abs(again - whole[0]["mean_nll"]) < 1e-6, (again, whole[0])
            full = [d["mean_nll"] for d in whole]
            for d in done:
                if d.get("partial"):
                    full.append(eval_whole(binary, ckpts, d["weights"], data))
            same_whole = min(full)
        return {
            "full_tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
            "tokens": rep["scored_tokens"],
            "stopped": rep["stopped_early"],
            # Trials stopped as clearly better (leaders), and trials beyond the budget (a
            # leader left at the end, scored whole).
            "leaders": sum(1 for d in done if (d.get("partial") or {}).get("better")),
            "confirmations": len(done) - evals,
            "best": rep["best"]["mean_nll"],
            "best_weights": rep["best"]["weights"],
            "same_trials_whole_best": same_whole,
            "wall_s": wall,
        }


# Which texts were measured (the large ones depend on the toolchain's documentation).
DIGESTS = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in (HELDOUT, PYTHON, TASK)}


def eval_whole(binary, ckpts, weights, data):
    """The objective `data` at `weights` scored whole by `ckmerge eval`: for a mixture,
    each set's own value (text: mean NLL; task: choice NLL) weighted as README's
    "Search objectives" says, sum_i w_i v_i / sum_i w_i."""
    sets = {TEXT: ["--data", str(HELDOUT)],
            TEXT_MIX: ["--data", str(HELDOUT), "--extra-data", str(PYTHON)],
            TASK_MIX: ["--data", str(HELDOUT), "--task", str(TASK)]}[data]
    out = subprocess.run([binary, "eval", *map(str, ckpts), "--weights", ",".join(map(repr, weights)),
                          *sets, "--seq-len", "128", "--json"],
                         check=True, capture_output=True, text=True).stdout
    r = json.loads(out)
    text = [d["mean_nll"] for d in r["datasets"]]
    if data == TEXT:
        return text[0]
    if data == TEXT_MIX:
        return (text[0] + text[1]) / 2
    return (3 * text[0] + r["tasks"][0]["choice_nll"]) / 4


def main():
    binary, out = sys.argv[1], sys.argv[2]
    print(f"data: {DATA} {DIGESTS}", flush=True)
    rows = []
    for name, tuned, ckpts, space, evals, data in CASES:
        if ONLY and not any(o in name or (o == "single" and data == TEXT) for o in ONLY):
            continue
        for seed in range(SEEDS):
            off = run(binary, ckpts, space, evals, seed, False, data)
            on_evals = round(evals * ON_EVALS)
            on = run(binary, ckpts, space, on_evals, seed, True, data)
            r = {
                "case": name, "tuned_on": tuned, "seed": seed, "evals": evals, "evals_on": on_evals,
                "margin": MARGIN,
                "data": DATA, "data_sha256": DIGESTS,
                "tokens_off": off["tokens"], "tokens_on": on["tokens"],
                "ratio": off["tokens"] / on["tokens"], "stopped": on["stopped"],
                "leaders": on["leaders"], "confirmations": on["confirmations"],
                "best_off": off["best"], "best_on": on["best"],
                "best_change_pct": (on["best"] - off["best"]) / off["best"] * 100,
                "same_best_weights": off["best_weights"] == on["best_weights"],
                # The best found against the best of its own trials scored whole.
                "same_trials_whole_best": on["same_trials_whole_best"],
                "regret_vs_same_trials": (None if on["same_trials_whole_best"] is None
                                          else on["best"] - on["same_trials_whole_best"]),
                "full_tokens_per_s_off": off["full_tokens_per_s"],
                "full_tokens_per_s_on": on["full_tokens_per_s"],
            }
            rows.append(r)
            print(f"{name:26} seed {seed}: tokens {r['tokens_off']:7} -> {r['tokens_on']:7} "
                  f"({r['ratio']:.2f}x, {r['stopped']} of {on_evals} stopped, {r['leaders']} leaders, "
                  f"{r['confirmations']} confirmed), best "
                  f"{r['best_off']:.6f} -> {r['best_on']:.6f} ({r['best_change_pct']:+.4f} %)"
                  + ("" if r["regret_vs_same_trials"] is None else
                     f", {r['regret_vs_same_trials']:.6f} above its own trials scored whole"),
                  flush=True)
    tot_off = sum(r["tokens_off"] for r in rows)
    tot_on = sum(r["tokens_on"] for r in rows)
    print(f"all: {tot_off} -> {tot_on} tokens ({tot_off / tot_on:.2f}x); worst best change "
          f"{max(r['best_change_pct'] for r in rows):+.4f} %")
    Path(out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
