"""A seeded synthetic request trace for `bench/policy_sim.py`.

12 models of 1-20 GB with Zipf popularity (the three most popular among the smaller half),
user sessions, a diurnal cycle (one period over the trace), on/off bursts on three models, and
periodic batch jobs on two: the shape a shared GPU pool sees when
interactive users, bursty integrations and cron jobs share it.

    .venv/bin/python bench/policy_trace.py --seed 1 --out bench/traces/seed1

writes ``seed1.trace.csv`` (``time_s,model,bytes,duration_s``) and ``seed1.models.csv``
(``model,bytes,cold_load_s,restore_s``). Load times: 2 s + 1.6 s per GB cold, 25 ms per GB restore.
"""

from __future__ import annotations

import argparse
import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path

GB = 10**9


@dataclass(frozen=True)
class Model:
    name: str
    bytes: int
    cold_load_s: float
    restore_s: float


def make_models(rng: random.Random, count: int = 12) -> list[Model]:
    # Log-uniform: as many 1-3 GB models as 7-20 GB ones, like a mixed fleet (speech, embeddings,
    # small and large text models); 12 of them total about 75 GB.
    sizes = sorted(math.exp(rng.uniform(0.0, math.log(20.0))) for _ in range(count))
    sizes[0], sizes[-1] = 1.0, 20.0  # the range's ends are always there
    # The three most popular models come from the smaller half and the rest are shuffled: a hot
    # set that fits, large models in the tail (with plain shuffling the hot set alone often did not
    # fit in 48 GiB and every policy thrashed alike).
    small, large = sizes[: count // 2], sizes[count // 2 :]
    rng.shuffle(small)
    rest = small[3:] + large
    rng.shuffle(rest)
    sizes = small[:3] + rest
    return [
        Model(f"m{i:02d}", int(gb * GB), round(2.0 + 1.6 * gb, 3), round(0.025 * gb, 4)) for i, gb in enumerate(sizes)
    ]


def generate(
    seed: int, hours: float = 6.0, base_rps: float = 0.35, zipf_s: float = 1.2
) -> tuple[list[Model], list[tuple[float, str, int, float]]]:
    """Models and requests (time_s, model, bytes, duration_s), sorted by time."""
    rng = random.Random(seed)
    models = make_models(rng)
    horizon = hours * 3600.0
    weights = [1.0 / (rank + 1) ** zipf_s for rank in range(len(models))]
    rows: list[tuple[float, str, int, float]] = []

    def duration(m: Model) -> float:
        return round(min(60.0, rng.lognormvariate(math.log(0.5 + m.bytes / GB * 0.1), 0.6)), 3)

    # Background: user sessions (Poisson, thinned by a diurnal factor between 0.25 and 1.75), each
    # on one Zipf-chosen model with a geometric number of requests (mean 10) about 15 s apart.
    session_rate = base_rps / 10.0 * 1.75
    t = 0.0
    phase = rng.uniform(0, 2 * math.pi)
    while True:
        t += rng.expovariate(session_rate)
        if t >= horizon:
            break
        factor = 1.0 + 0.75 * math.sin(2 * math.pi * t / horizon + phase)
        if rng.random() * 1.75 > factor:
            continue
        m = rng.choices(models, weights)[0]
        at = t
        while True:
            rows.append((at, m.name, m.bytes, duration(m)))
            if rng.random() < 1 / 10.0:
                break
            at += rng.expovariate(1 / 15.0)

    # On/off bursts: three mid-popularity models alternate silence (mean 40 min) and bursts
    # (mean 4 min at about one request per 3 s).
    for m in rng.sample(models[3:9], 3):
        t = rng.expovariate(1 / 1200.0)
        while t < horizon:
            end = min(horizon, t + rng.expovariate(1 / 240.0))
            while True:
                t += rng.expovariate(1 / 3.0)
                if t >= end:
                    break
                rows.append((t, m.name, m.bytes, duration(m)))
            t = end + rng.expovariate(1 / 2400.0)

    # Periodic batch jobs: two tail models, each every 60-90 min, 40-80 requests back to back.
    for m, period in zip(rng.sample(models[8:], 2), (3600.0, 5400.0), strict=True):
        t = rng.uniform(0, period)
        while t < horizon:
            n = rng.randint(40, 80)
            at = t
            for _ in range(n):
                d = duration(m)
                rows.append((at, m.name, m.bytes, d))
                at += d * 0.5 + 0.05
            t += period
    rows = [r for r in rows if r[0] < horizon]
    rows.sort(key=lambda r: (r[0], r[1]))
    return models, [(round(t, 3), name, b, d) for t, name, b, d in rows]


def write(models: list[Model], rows: list[tuple[float, str, int, float]], out: Path) -> tuple[Path, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    trace, models_csv = out.with_suffix(".trace.csv"), out.with_suffix(".models.csv")
    with trace.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["time_s", "model", "bytes", "duration_s"])
        w.writerows(rows)
    with models_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "bytes", "cold_load_s", "restore_s"])
        w.writerows((m.name, m.bytes, m.cold_load_s, m.restore_s) for m in models)
    return trace, models_csv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--hours", type=float, default=6.0)
    ap.add_argument("--out", type=Path, required=True, help="path prefix; .trace.csv and .models.csv are added")
    args = ap.parse_args()
    models, rows = generate(args.seed, args.hours)
    trace, models_csv = write(models, rows, args.out)
    print(f"{len(rows)} requests over {args.hours:g} h to {len(models)} models: {trace}, {models_csv}")


if __name__ == "__main__":
    main()
