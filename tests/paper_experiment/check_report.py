#!/usr/bin/env python3
# Checks a report of scripts/paper-experiment against its runs, recomputing every checked number here
# from the runs' own files (metrics.csv, resolved.deck, train.log) with code of its own:
# - the run table lists every run of the experiment, each "ok", with its final train and validation
#   loss (the last metrics.csv row with a validation loss), dsmoe's parameter count (train.log), the
#   parameter count and FLOPs per token of the model in resolved.deck, and tokens = steps x batch x T;
# - every claim table's "mean ± half-range" and per-seed losses are those of the config's runs;
# - claim 1's compute-to-equal-loss ratio (small dense vs MoE) from the validation curves;
# - every image the report shows exists, is a PNG, and all of them take under 1 MiB.
# Usage: check_report.py REPORT RUNS_DIR. Prints FAIL lines; exit 1 when one failed.
import csv
import os
import re
import sys

report_path, runs = sys.argv[1], sys.argv[2]
report = open(report_path).read()
fails = []
checks = 0


def check(cond, msg):
    global checks
    checks += 1
    if not cond:
        fails.append(msg)


def num(s):
    return float(s.replace(",", "").replace(" TFLOP", ""))


def deck(run):
    d, sec = {}, ""
    for line in open(os.path.join(runs, run, "resolved.deck")):
        m = re.match(r"^\[(\w+)\]", line)
        if m:
            sec = m.group(1)
            continue
        m = re.match(r"^(\w+) = (.*?)\s*(#.*)?$", line)
        if m:
            d[sec + "." + m.group(1)] = m.group(2)
    return d


def metrics(run):
    with open(os.path.join(runs, run, "metrics.csv"), newline="") as f:
        return list(csv.reader(f))


def valid_curve(run):
    rows = metrics(run)
    h = rows[0]
    s, v = h.index("step"), h.index("valid_loss")
    return [(int(r[s]), float(r[v])) for r in rows[1:] if r[v] != ""]


def final_train(run):
    rows = metrics(run)
    return float(rows[-1][rows[0].index("loss")])


def layer_experts(d):
    """The experts of each block (0 = dense FFN), read from moe.experts written as 'c xN' items."""
    L, every = int(d["model.layers"]), int(d["moe.every"])
    items = []
    for part in d["moe.experts"].split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\s+x(\d+))?\s*", part)
        items.extend([int(m.group(1))] * int(m.group(2) or 1))
    moe_blocks = [b for b in range(L) if (b + 1) % every == 0]
    if items == [0]:
        return [0] * L
    if len(items) == 1:
        items = items * len(moe_blocks)
    out = [0] * L
    for b, e in zip(moe_blocks, items):
        out[b] = e
    return out


def model_numbers(d):
    """(parameters, forward multiply-adds per token) of the model in d."""
    V, T, L, h, f = (int(d[k]) for k in ("model.vocab", "model.seq_len", "model.layers", "model.hidden", "model.ffn_hidden"))
    k, res = int(d["moe.top_k"]), d["moe.residual"] == "true"
    mlp_params = h * f + f + f * h + h
    params = h * (V + T) + 2 * h
    macs = h * V
    for E in layer_experts(d):
        params += 2 * h + (3 * h * h + 3 * h) + (h * h + h) + 2 * h
        # QKV and projection; attention: a token at position t (1-based) scores and sums t keys of width h,
        # (T + 1) / 2 on average over the sequence.
        macs += 3 * h * h + h * h + 2 * h * (sum(range(1, T + 1)) / T)
        if E == 0:
            params += mlp_params
            macs += 2 * f * h
        else:
            params += E * h + E * mlp_params
            macs += E * h + k * 2 * f * h
            if res:
                params += mlp_params + 2 * h + 2
                macs += 2 * f * h + 2 * h
    return params, macs


def table_rows(header_word):
    """Rows of the markdown tables whose header has header_word: lists of cell texts."""
    out, on = [], False
    for line in report.splitlines():
        if line.startswith("|") and header_word in line and not line.startswith("| `"):
            on = True
            continue
        if on and line.startswith("|---"):
            continue
        if on and line.startswith("| "):
            out.append([c.strip() for c in line.strip().strip("|").split("|")])
        else:
            on = False
    return out


# The run table.
run_rows = {r[0].strip("`"): r for r in table_rows("final train loss")}
run_dirs = sorted(d for d in os.listdir(runs) if os.path.isfile(os.path.join(runs, d, "metrics.csv")))
configs_run = sorted({re.sub(r"-s\d+$", "", d) for d in run_dirs})
check(len(configs_run) == 12, f"{len(configs_run)} configs ran, expected the 12 of inputs/paper-claims")
for c in configs_run:
    n = sum(re.fullmatch(re.escape(c) + r"-s\d+", d) is not None for d in run_dirs)
    check(n >= (1 if c == "c3-teacher" else 2), f"{c}: {n} seeds")
check(sorted(run_rows) == run_dirs, f"run table {sorted(run_rows)} != run directories {run_dirs}")
for run in run_dirs:
    row = run_rows.get(run)
    if not row:
        continue
    d = deck(run)
    curve = valid_curve(run)
    log = open(os.path.join(runs, run, "train.log")).read()
    params, macs = model_numbers(d)
    tokens = int(d["train.steps"]) * int(d["train.batch"]) * int(d["model.seq_len"])
    check(row[1] == d["run.seed"], f"{run}: seed {row[1]}, resolved.deck {d['run.seed']}")
    check(num(row[2]) == int(re.search(r"^model: (\d+) parameters", log, re.M).group(1)), f"{run}: parameters (dsmoe) {row[2]}")
    check(num(row[3]) == params, f"{run}: parameters (formula) {row[3]}, computed here {params}")
    check(abs(num(row[4]) - 6 * macs / 1e6) <= 0.005 + 1e-9, f"{run}: MFLOP/token {row[4]}, computed here {6 * macs / 1e6:.4f}")
    check(num(row[5]) == tokens, f"{run}: tokens {row[5]}, computed here {tokens}")
    check(abs(num(row[7]) - final_train(run)) <= 5e-5 + 1e-9, f"{run}: final train loss {row[7]} vs {final_train(run)}")
    check(abs(num(row[8]) - curve[-1][1]) <= 5e-5 + 1e-9, f"{run}: final valid loss {row[8]} vs {curve[-1][1]}")
    check(curve[-1][0] == int(d["train.steps"]), f"{run}: the last validation is at step {curve[-1][0]}")

# The claim tables: every "`config` | ... | mean ± half | per seed" row.
configs = 0
for line in report.splitlines():
    m = re.match(r"^\| `([a-z0-9-]+)` \|.*\| ([0-9.]+) ± ([0-9.]+) \| ([0-9., ]+) \|", line)
    if not m:
        continue
    cfg = m.group(1)
    finals = [valid_curve(r)[-1][1] for r in run_dirs if re.fullmatch(re.escape(cfg) + r"-s\d+", r)]
    check(len(finals) >= 1, f"{cfg}: no runs")
    if not finals:
        continue
    configs += 1
    mean = sum(finals) / len(finals)
    half = (max(finals) - min(finals)) / 2
    check(abs(float(m.group(2)) - mean) <= 5e-5 + 1e-9, f"{cfg}: mean {m.group(2)}, computed here {mean:.6f}")
    check(abs(float(m.group(3)) - half) <= 5e-5 + 1e-9, f"{cfg}: half-range {m.group(3)}, computed here {half:.6f}")
    seeds = [float(x) for x in m.group(4).split(",")]
    check(len(seeds) == len(finals) and all(abs(a - b) <= 5e-5 + 1e-9 for a, b in zip(seeds, finals)),
          f"{cfg}: per-seed {seeds} vs {finals}")
check(configs == 13, f"{configs} config rows in the claim tables, expected 13 (12 configs; claim 2 repeats c1-moe-s)")


# Claim 1: the compute ratio to the small dense model's final loss.
def mean_curve(cfg):
    runs_of = [r for r in run_dirs if re.fullmatch(re.escape(cfg) + r"-s\d+", r)]
    curves = [dict(valid_curve(r)) for r in runs_of]
    d = deck(runs_of[0])
    per_step = int(d["train.batch"]) * int(d["model.seq_len"]) * 6 * model_numbers(d)[1]
    return [(s * per_step, sum(c[s] for c in curves) / len(curves)) for s in sorted(curves[0])]


def reach(curve, target):
    prev = None
    for x, y in curve:
        if y <= target:
            return x if prev is None else prev[0] + (x - prev[0]) * (prev[1] - target) / (prev[1] - y)
        prev = (x, y)
    return None


ds, moe = mean_curve("c1-dense-s"), mean_curve("c1-moe-s")
c_ds, c_moe = reach(ds, ds[-1][1]), reach(moe, ds[-1][1])
m = re.search(r"Compute to equal loss, small dense:.*?\*\*([0-9.]+)x\*\*", report)
if c_moe is None:
    check(m is None, "claim 1 states a small-dense ratio, but the MoE never reaches the dense loss")
else:
    check(m is not None and abs(float(m.group(1)) - c_ds / c_moe) <= 0.005 + 1e-9,
          f"claim 1 small-dense ratio {m.group(1) if m else None}, computed here {c_ds / c_moe:.4f}")

# The images.
images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
check(len(images) >= 4 + 12, f"{len(images)} images in the report")
total = 0
for img in images:
    p = os.path.join(os.path.dirname(report_path), img)
    ok = os.path.isfile(p) and open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    check(ok, f"{img}: missing or not a PNG")
figdir = os.path.join(os.path.dirname(report_path), "paper-claims")
total = sum(os.path.getsize(os.path.join(figdir, f)) for f in os.listdir(figdir))
check(total < 1024 * 1024, f"the images take {total} bytes (over 1 MiB)")
for claim in ("## Claim 1", "## Claim 2", "## Claim 3", "## Claim 4"):
    check(claim in report, f"the report has no '{claim}' section")
check(report.count("**agrees**") + report.count("**does not agree**") + report.count("**partly**") >= 9,
      "fewer than 9 verdicts")

for f in fails:
    print("FAIL:", f)
print(f"check_report: {checks - len(fails)} of {checks} checks passed")
sys.exit(1 if fails else 0)
