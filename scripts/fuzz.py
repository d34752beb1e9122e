#!/usr/bin/env python
"""The fuzz test's cases (tests/fuzzing.py) for a longer run: N cases from one seed, through
`pipeline.stylize_video` / `stills.stylize_still` with the tiny stack on the CPU at --size 64,
each judged as tests/test_fuzz.py judges it. Prints (or writes) JSON: counts per outcome, per
mutation kind and per input, the StylizeError messages by kind (with the first case of each), and
every failed case (with its files under --save).

    nice python scripts/fuzz.py --cases 3000 --seed 1 --out fuzz.json
    python scripts/fuzz.py --seed 1 --first 1234 --cases 1 --save cases/   # one case again
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fuzzing import BATCH_SIZE, LIMIT_S, clean, make_case, run_case, seed_inputs


def message_kind(message: str, work: str) -> str:
    """A StylizeError's message without the case's paths and the parenthesised details, to count
    alike ones together."""
    message = re.sub(re.escape(work) + r"/\S*?:", "PATH:", message)
    return re.sub(r"\s*\([^()]*(\([^()]*\)[^()]*)*\)", "", message)[:160]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--first", type=int, default=0, help="index of the first case")
    ap.add_argument("--limit", type=float, default=LIMIT_S, help="seconds per case")
    ap.add_argument("--save", type=Path, help="folder for the files of every failed case")
    ap.add_argument("--out", type=Path, help="write the JSON here (else stdout)")
    ap.add_argument("--progress", type=int, default=250, help="a line on stderr every N cases (0: none)")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from stylize.config import EngineConfig, OutputConfig, PipelineConfig, model_config, style_config
    from stylize.models import load_stack
    from stylize.pipeline import build_stylizer

    torch.set_num_threads(1)  # one case at a time; leave the other core to the machine
    stack = load_stack(model_config("tiny"), "cpu")
    cfg = PipelineConfig(prompt=style_config("oil").prompt, size=64, batch_size=BATCH_SIZE)
    stylizer = build_stylizer(stack, cfg, EngineConfig())
    out_cfg = OutputConfig(preset="ultrafast")

    outcomes, by_kind, by_input = collections.Counter(), {}, {}
    messages, examples, failures, slowest, peak = collections.Counter(), {}, [], (0.0, None), (0, None)
    started, cpu0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        inputs = seed_inputs(Path(tmp) / "inputs")
        work = Path(tmp) / "case"
        work.mkdir()
        for index in range(args.first, args.first + args.cases):
            case = make_case(inputs, args.seed, index)
            outcome = run_case(case, work, stylizer, out_cfg, args.limit)
            clean(work)
            outcomes[outcome.status] += 1
            by_kind.setdefault(case.kind, collections.Counter())[outcome.status] += 1
            by_input.setdefault(case.name, collections.Counter())[outcome.status] += 1
            slowest = max(slowest, (outcome.seconds, index))
            peak = max(peak, (outcome.peak_rss, index))
            if outcome.status == "error":
                said = message_kind(outcome.detail, str(work))
                messages[said] += 1
                examples.setdefault(said, index)
            if not outcome.passed:
                failures.append({"index": index, "input": case.name, "kind": case.kind, "what": case.what,
                                 "status": outcome.status, "detail": outcome.detail})  # fmt: skip
                if args.save:
                    for relative, data in case.files.items():
                        path = args.save / f"{args.seed}-{index}-{case.kind}" / relative
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(data)
            done = index - args.first + 1
            if args.progress and done % args.progress == 0:
                print(f"{done} cases, {time.perf_counter() - started:.0f} s: {dict(outcomes)}", file=sys.stderr)
    stylizer.close()
    report = {
        "command": " ".join(["python", *sys.argv]),
        "seed": args.seed, "first": args.first, "cases": args.cases, "limit_s": args.limit,
        "wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(time.process_time() - cpu0, 1),
        "slowest_case_s": [round(slowest[0], 2), slowest[1]],
        "max_case_peak_rss_mib": [round(peak[0] / 2**20), peak[1]],  # the process's, reset per case
        "outcomes": dict(outcomes),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "by_input": {k: dict(v) for k, v in sorted(by_input.items())},
        "error_messages": {m: {"cases": n, "first": examples[m]} for m, n in messages.most_common()},
        "failures": failures,
    }  # fmt: skip
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
