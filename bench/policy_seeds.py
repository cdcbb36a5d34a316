"""How well the policy's targets hold on traces it was not tuned on: fresh seeds of the generator.

`make bench-policy` checks the three committed traces; a policy tuned against them can fit them
and miss on the next trace of the same kind. This script generates each seed's trace in memory
(`bench/policy_trace.py`), runs every policy of `bench/policy_sim.py` in both scenarios, prints
one line per seed (this policy's figure, Belady-Size's, their ratio, the best online baseline)
and, for each target, on how many seeds it holds.

    .venv/bin/python bench/policy_seeds.py [--seeds 1-16] [--hours 6] [--workers 2] [--hindsight] [--json]

The seeds are the generator's, so seeds 1-3 are the committed traces. About 30 s per seed on the
2-core machine with 2 workers (`make bench-policy-seeds`: seeds 1-16, about 8 minutes).

The report ends with each scenario's misses summed over the seeds, against Belady-Size's sum.
`--hindsight` also runs the ``gpu-serve@knows=...`` references of `bench/policy_sim.py` (the same
`decide()` told whether a session goes on, when the next one starts, or every next use) and adds
each to those sums, with on how many seeds it meets the targets: how much of the gap to
Belady-Size an online policy could close at best (`make bench-policy-hindsight`, about 20 minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.policy_sim import (  # noqa: E402
    HINDSIGHT,
    SCENARIOS,
    Spec,
    feasible_online,
    lowest_other_reload_s,
    simulate,
    targets,
)
from bench.policy_trace import generate  # noqa: E402

Results = dict[str, dict[str, float]]


def parse_seeds(text: str) -> list[int]:
    """`1-16`, `4,7,9` or a mix of both."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise SystemExit(f"--seeds: {part!r} is not a seed or a range like 1-16") from None
        if last < first:
            raise SystemExit(f"--seeds: the range {part!r} runs backwards")
        out += range(first, last + 1)
    if not out:
        raise SystemExit("--seeds: no seed given")
    return sorted(set(out))


def run_seed(job: tuple[int, float, str, bool]) -> tuple[int, str, Results]:
    seed, hours, scenario, hindsight = job
    models, rows = generate(seed, hours)
    specs = {m.name: Spec(m.name, m.bytes, m.cold_load_s, m.restore_s) for m in models}
    cfg = SCENARIOS[scenario]
    return seed, scenario, simulate(
        specs, rows, cfg["gpus"], cfg["host_gib"], cfg["timeouts"], loads=(1,), hindsight=hindsight
    )


def miss_key(scenario: str) -> str:
    """The miss count the scenario's <= 1.2x target names."""
    return "cold_loads" if scenario.startswith("1x48") else "gpu_misses"


def as_gpu_serve(r: Results, name: str) -> Results:
    """`r` with `name`'s figures in gpu-serve's place, so that `targets` judges `name`."""
    return {**r, "gpu-serve": r[name]}


def sums_table(scenario: str, seeds: list[int], done: dict[tuple[int, str], Results]) -> str:
    """Per policy (gpu-serve and the hindsight references that ran): the scenario's misses summed
    over the seeds, that sum's ratio to Belady-Size's, and for each target on how many seeds it holds."""
    key = miss_key(scenario)
    names = ["gpu-serve"] + [n for k in HINDSIGHT if (n := f"gpu-serve@knows={k}") in done[(seeds[0], scenario)]]
    labels = [label for label, _ in targets(scenario, done[(seeds[0], scenario)])]
    belady = sum(done[(s, scenario)]["belady-size"][key] for s in seeds)
    lines = [f"| policy | {key}, sum | / Belady-Size | " + " | ".join(labels) + " |", "|---" * (len(labels) + 3) + "|"]
    for name in names:
        total = sum(done[(s, scenario)][name][key] for s in seeds)
        met = [0] * len(labels)
        for s in seeds:
            for i, (_, ok) in enumerate(targets(scenario, as_gpu_serve(done[(s, scenario)], name))):
                met[i] += ok
        lines.append(f"| {name} | {total:.0f} | {total / max(belady, 1):.3f}x | "
                     + " | ".join(f"{m}/{len(seeds)}" for m in met) + " |")
    lines.append(f"| belady-size | {belady:.0f} | 1.000x |" + " |" * len(labels))
    return "\n".join(lines)


def summary_line(scenario: str, r: Results) -> str:
    me, belady = r["gpu-serve"], r["belady-size"]
    key = miss_key(scenario)
    best = min(feasible_online(r), key=lambda n: r[n][key])
    line = (f"{key} {me[key]:.0f} / Belady-Size {belady[key]:.0f} = {me[key] / max(belady[key], 1):.2f}x, "
            f"best online {best} {r[best][key]:.0f}")
    if not scenario.startswith("1x48"):
        line += (f"; cold {me['cold_loads']:.0f}; reload {me['reload_s']:.1f} s "
                 f"(lowest other {lowest_other_reload_s(r):.1f})")
    return line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1-16", help="seeds or ranges, e.g. 1-16 or 4,7,9 (default 1-16)")
    ap.add_argument("--hours", type=float, default=6.0, help="trace length (default 6, as committed)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--hindsight", action="store_true",
                    help="also run the gpu-serve@knows=... references and print what each is worth")
    ap.add_argument("--json", action="store_true", help="print every policy's figures per seed as JSON")
    args = ap.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    jobs = [(s, args.hours, sc, args.hindsight) for s in seeds for sc in SCENARIOS]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        done = {(s, sc): r for s, sc, r in pool.map(run_seed, jobs)}
    if args.json:
        print(json.dumps({f"seed{s}": {sc: done[(s, sc)] for sc in SCENARIOS} for s in seeds}, indent=2))
        return 0
    held: dict[tuple[str, str], list[int]] = {}
    for sc in SCENARIOS:
        print(f"\n## {sc}")
        for s in seeds:
            r = done[(s, sc)]
            print(f"seed {s:3d}: {summary_line(sc, r)}")
            for label, ok in targets(sc, r):
                held.setdefault((sc, label), [])
                if ok:
                    held[(sc, label)].append(s)
    print(f"\n## targets over {len(seeds)} seeds")
    for (sc, label), ok_seeds in held.items():
        missed = [s for s in seeds if s not in ok_seeds]
        print(f"- {sc}: {label}: {len(ok_seeds)}/{len(seeds)}" + (f" (missed on {', '.join(map(str, missed))})"
                                                                 if missed else ""))
    # Summed over the seeds, one trace's luck evens out; with --hindsight, what knowing part of
    # the future would add (gpu-serve@knows=..., bench/policy_sim.py).
    print(f"\n## over all {len(seeds)} seeds")
    for sc in SCENARIOS:
        print(f"\n### {sc}\n\n{sums_table(sc, seeds, done)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
