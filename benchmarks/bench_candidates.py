"""Scoring a large candidate training set: ``swift-study score --candidates`` end to end, as a user runs it.

    python benchmarks/bench_candidates.py --candidates 20000 --evals 100                # projection, dim 256
    python benchmarks/bench_candidates.py --candidates 2000 --evals 100 --score exact

Trains a tiny LoRA run (the tracking benchmark's model (a): Llama h256 L4, LoRA r=8 on every linear map; 4 steps,
one checkpoint) with ``swift-study train --no-influence``, writes N candidate rows (pairs of demo base rows, so
lengths vary) and E evaluation rows, then times ``swift-study score --run RUN --candidates FILE`` with
``/usr/bin/time -v`` (wall time, peak RSS). Offline, CPU only.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from swift_callbacks.assets.tiny import load_rows

CONFIG = """
model: {{name_or_path: "tiny:hidden_size=256,num_layers=4,num_heads=4,intermediate_size=688,seed=0"}}
lora: {{r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}}
data: {{train: [{{path: "demo:base", columns: [prompt, completion]}}]}}
training: {{output_dir: "{run}", use_cpu: true, bf16: false, activation_checkpointing: false,
  per_device_train_batch_size: 8, learning_rate: 1e-3, max_steps: 4, save_steps: 4, max_length: 128,
  report_to: none, seed: 0, disable_tqdm: true}}
influence:
  probe_sets: {{p: "demo:cot_study_z_cot"}}
  eval_sets: {{e: "{evals}"}}
  engine: {{micro_batch_size: 16, score: "{score}", score_options: {options}}}
"""


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def timed(cmd: list[str]) -> tuple[float, float, str]:
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time .*: (\S+)", done.stderr).group(1)
    parts = [float(x) for x in wall.split(":")]
    seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) / 2**20
    return seconds, rss, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=20000)
    parser.add_argument("--evals", type=int, default=100)
    parser.add_argument("--score", choices=["projection", "exact"], default="projection")
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args()
    base, rng = load_rows("base"), random.Random(0)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        evals = [{"id": f"e{i}", "task": r["task"], "prompt": r["prompt"], "completion": r["completion"]}
                 for i, r in enumerate(base[: args.evals])]  # fmt: skip
        write_rows(tmp / "evals.jsonl", evals)
        cands = []
        for i in range(args.candidates):
            a, b = rng.choice(base), rng.choice(base)
            cands.append({"id": f"c{i}", "prompt": a["prompt"], "completion": a["completion"] + "\n" + b["prompt"]})
        write_rows(tmp / "candidates.jsonl", cands)
        options = json.dumps({"dim": args.dim}) if args.score == "projection" else "{}"
        config = tmp / "config.yaml"
        config.write_text(CONFIG.format(run=tmp / "run", evals=tmp / "evals.jsonl", score=args.score, options=options))
        cli = [sys.executable, "-m", "swift_callbacks"]
        train_s, _, _ = timed([*cli, "train", "--config", str(config), "--no-influence"])
        seconds, rss, out = timed([*cli, "score", "--run", str(tmp / "run"), "--config", str(config), "--candidates",
                                   str(tmp / "candidates.jsonl")])  # fmt: skip
    label = f"projection(dim={args.dim})" if args.score == "projection" else "exact"
    print(f"training (4 steps): {train_s:.1f} s")
    print(f"score --candidates: {args.candidates} candidates x {args.evals} evals, {label}: {seconds:.1f} s wall, "
          f"{args.candidates / seconds:.0f} candidates/s, peak RSS {rss:.2f} GiB")  # fmt: skip
    print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
