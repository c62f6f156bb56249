"""Runs every benchmark, each in its own process, and writes DIR/summary.md (`make bench`).

    .venv/bin/python benchmarks/run_all.py --out workdir/benchmarks            # full shapes
    .venv/bin/python benchmarks/run_all.py --out workdir/benchmarks --quick    # a few minutes

Per comparison the summary gives our figure, the reference figure, their ratio (all from this
run, except the original pipeline's latency, which only exists as log figures from unknown GPU
hardware and is labelled so) and the command that reproduces it. Each benchmark's full output
is kept in DIR/raw/<name>.txt. A benchmark that fails is reported as failed in the summary and
makes this script exit with status 1; nothing is left out silently.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lsfa_jax.atomic_io import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, matmul_peak_gflops, parse_results

REPO = Path(__file__).resolve().parents[1]
PY = "python"  # shown in the commands; the run itself uses sys.executable

QUICK_ARGS = {
    "end_to_end": ["--quick"],
    "patchcore": ["--small", "--repeats", "2"],
    "memory": [
        *("--rows", "200000", "--select", "100"),
        *("--compare-iterations", "10", "--sklearn-rows", "50000"),
    ],
    "train_step": ["--patches", "784", "--bank", "10000", "--classes", "2"],
    "backbones": ["--batches", "1", "--repeats", "1"],
    "point_mae": ["--repeats", "1"],
    "sharded_bank": ["--rows", "20000", "--patches", "784", "--repeats", "1"],
}
FULL_ARGS = {
    "end_to_end": ["--repeats", "1"],
    "patchcore": [],
    "memory": [],
    "train_step": [],
    "backbones": ["--batches", "1", "8", "--repeats", "2"],
    "point_mae": [],
    "sharded_bank": [],
}
SCRIPTS = {name: f"benchmarks/bench_{name}.py" for name in FULL_ARGS}


def run_benchmark(name: str, extra: list[str], raw_dir: Path, timeout: float) -> dict[str, Any]:
    """Runs one benchmark script; returns its command, output, seconds and status."""
    command = [SCRIPTS[name], *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    print(f"[run_all] {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, *command],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        output, status = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode() if isinstance(expired.stdout, bytes) else ""
        status = f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - start
    atomic_write_text(raw_dir / f"{name}.txt", output)
    print(f"[run_all] {name}: status {status}, {seconds:.0f} s", flush=True)
    meta = {"name": name, "command": f"{PY} {shlex.join(command)}", "status": status}
    meta["seconds"] = seconds
    atomic_write_text(raw_dir / f"{name}.json", json.dumps(meta))
    return {**meta, "output": output}


def load_run(name: str, raw_dir: Path) -> dict[str, Any] | None:
    """A benchmark's earlier run from raw_dir (its metadata and output), or None."""
    meta_path = raw_dir / f"{name}.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    return {**meta, "output": (raw_dir / f"{name}.txt").read_text()}


def ratio(reference: float, ours: float) -> str:
    return f"{reference / ours:.2f}x" if ours > 0 else "n/a"


# ----------------------------------------------------------------------------- sections


def section_end_to_end(run: dict) -> list[str]:
    records = parse_results(run["output"])
    stages = [r for r in records if r["bench"] == "end_to_end"]
    refs = {r["stage"]: r for r in records if r["bench"] == "end_to_end_reference"}
    if not stages:
        return []
    first = stages[0]
    lines = [
        f"Random weights; banks rgb {first['rgb_bank']} x 768 and xyz {first['xyz_bank']} x 1152 "
        f"float32; clouds: {first['clouds']}. Best of the timed calls after a warm-up.",
        "",
        "| stage | batch | s / batch | s / image | images / s |",
        "|---|---|---|---|---|",
    ]
    for r in stages:
        lines.append(
            f"| {r['stage']} | {r['batch']} | {r['seconds_per_batch']:.2f} | "
            f"{r['seconds_per_image']:.2f} | {r['images_per_s']:.3f} |"
        )
    compilations = sorted({r["compilations_in_timed_total"] for r in stages})
    lines += ["", f"XLA compilations during the timed `total` calls: {compilations}.", ""]
    test_ref = refs.get("test (features + scoring)")
    extract_ref = refs.get("feature extraction (train)")
    totals = {r["batch"]: r for r in stages if r["stage"] == "total"}
    extract = {}
    for r in stages:
        if r["stage"] in ("vit", "point"):
            extract[r["batch"]] = extract.get(r["batch"], 0.0) + r["seconds_per_image"]
    if test_ref and extract_ref:
        lines += [
            "| comparison | batch | ours s / image (this CPU) | reference s / image "
            "(original code, logs, unknown GPU, NOT measured here) | reference / ours |",
            "|---|---|---|---|---|",
        ]
        for batch, r in totals.items():
            mid = (test_ref["low_s_per_image"] + test_ref["high_s_per_image"]) / 2
            lines.append(
                f"| test: features + adaptors + kNN + maps | {batch} | "
                f"{r['seconds_per_image']:.2f} | {test_ref['low_s_per_image']}-"
                f"{test_ref['high_s_per_image']} | {ratio(mid, r['seconds_per_image'])} |"
            )
        for batch, seconds in extract.items():
            mid = (extract_ref["low_s_per_image"] + extract_ref["high_s_per_image"]) / 2
            lines.append(
                f"| feature extraction (ViT + Point-MAE) | {batch} | {seconds:.2f} | "
                f"{extract_ref['low_s_per_image']}-{extract_ref['high_s_per_image']} | "
                f"{ratio(mid, seconds)} |"
            )
    return lines


_KNN_HEAD = re.compile(r"kNN: bank \((\d+), (\d+)\), queries \((\d+), \d+\)")
_KNN_ROW = re.compile(r"^\s+(.+?)\s+([\d.]+) s/image\s+(\d+) queries/s", re.M)
_KNN_FAILED = re.compile(r"queries whose certificate failed.*")
_KNN_AUTO = re.compile(r"^\s+auto -> (\w+) \((\w+), [\d.]+ s\): (.*)$", re.M)
_KNN_AUTO_ROW = re.compile(r"^\s+auto runs the row: (.+)$", re.M)
_CORESET_ROW = re.compile(r"^\s+(jax fori_loop|numpy loop)\s+([\d.]+) s\s+([\d.]+) ms/iter", re.M)
_CORESET_HEAD = re.compile(r"coreset: library \((\d+), (\d+)\) -> projected \(\d+, (\d+)\)")


def section_knn(run: dict, peak: dict[str, float]) -> list[str]:
    head = _KNN_HEAD.search(run["output"])
    rows = {name: float(s) for name, s, _ in _KNN_ROW.findall(run["output"])}
    if not head or "faiss IndexFlatL2" not in rows:
        return []
    bank, dim, queries = (int(v) for v in head.groups())
    flops = 2.0 * queries * bank * dim
    faiss_s = rows["faiss IndexFlatL2"]
    best = max(peak["jax"], peak["numpy"])
    bf16 = peak.get("jax_bf16")
    failed = _KNN_FAILED.search(run["output"])
    lines = [
        f"{queries} queries (one image) against a bank of {bank} x {dim}, k=1; every method "
        "returns the float32 nearest row. Matmul peak measured here: float32 JAX "
        f"{peak['jax']:.0f} GFLOP/s, numpy BLAS {peak['numpy']:.0f} GFLOP/s"
        + (f", bfloat16 JAX {bf16:.0f} GFLOP/s" if bf16 else "")
        + " ((3072, 3072) @ (3072, 3072), best of 7). GFLOP/s counts the float32 search's "
        f"2 x {queries} x {bank} x {dim} flops for every row; its percentage is of the float32 "
        "peak, except the screened search's (a bfloat16 matmul plus a float32 re-rank), which "
        "is of the bfloat16 peak. On a shared machine a peak measured under another load can "
        "be exceeded.",
        "",
        "| method | s / image | GFLOP/s | % of matmul peak | faiss / this |",
        "|---|---|---|---|---|",
    ]
    for name, seconds in rows.items():
        gflops = flops / seconds / 1e9
        screened = name.startswith("jax screened")
        of = bf16 if screened and bf16 else best
        lines.append(
            f"| {name} | {seconds:.3f} | {gflops:.0f} | {100 * gflops / of:.0f} % | "
            f"{ratio(faiss_s, seconds)} |"
        )
    if failed:
        lines += ["", f"Screened search: {failed.group(0).strip()}."]
    auto = _KNN_AUTO.search(run["output"])
    auto_row = _KNN_AUTO_ROW.search(run["output"])
    if auto and auto_row and auto_row.group(1) in rows:
        chosen, source, reason = auto.groups()
        lines += [
            "",
            f"**Default search (`patchcore.search=auto`, here {chosen}, the row "
            f'"{auto_row.group(1)}"): {ratio(faiss_s, rows[auto_row.group(1)])} faiss-cpu '
            f"IndexFlatL2** in this run. Chosen ({source}): {reason}.",
        ]
    return lines


def section_coreset(patchcore: dict, memory: dict | None) -> list[str]:
    lines = [
        "| library (rows x projected dim) | iterations | ours (jitted fori_loop) ms / iter | "
        "straightforward numpy ms / iter | speed-up | source |",
        "|---|---|---|---|---|---|",
    ]
    head = _CORESET_HEAD.search(patchcore["output"])
    rows = {
        name: (float(s), float(ms)) for name, s, ms in _CORESET_ROW.findall(patchcore["output"])
    }
    if head and len(rows) == 2:
        n, _, k = head.groups()
        iterations = round(rows["jax fori_loop"][0] * 1e3 / rows["jax fori_loop"][1])
        ours, numpy_ms = rows["jax fori_loop"][1], rows["numpy loop"][1]
        lines.append(
            f"| {n} x {k} | {iterations} | {ours:.2f} | {numpy_ms:.2f} | "
            f"{ratio(numpy_ms, ours)} | bench_patchcore |"
        )
    if memory is not None:
        for r in parse_results(memory["output"]):
            if r["bench"] == "coreset_greedy":
                lines.append(
                    f"| {r['rows']} x {r['projected_dim']} | {r['iterations']} | "
                    f"{r['jax_ms_per_iteration']:.1f} | {r['numpy_ms_per_iteration']:.1f} | "
                    f"{r['speedup']:.2f}x | bench_memory (same selection: {r['same_selection']}) |"
                )
    return lines


_BACKBONE_ROW = re.compile(
    r"^(rgb|point)\s+(jax|torch)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\d+)", re.M
)


def section_backbones(run: dict) -> list[str]:
    rows = _BACKBONE_ROW.findall(run["output"])
    table = {
        (b, impl, int(batch)): (float(sps), float(rss)) for b, impl, batch, sps, *_, rss in rows
    }
    lines = [
        "| branch | batch | JAX images / s | torch (CPU) images / s | JAX / torch | "
        "peak RSS MiB JAX / torch |",
        "|---|---|---|---|---|---|",
    ]
    for (branch, impl, batch), (sps, rss) in table.items():
        if impl != "jax" or (branch, "torch", batch) not in table:
            continue
        t_sps, t_rss = table[(branch, "torch", batch)]
        lines.append(
            f"| {branch} | {batch} | {sps:.3f} | {t_sps:.3f} | {sps / t_sps:.2f}x | "
            f"{rss:.0f} / {t_rss:.0f} |"
        )
    return lines if len(lines) > 2 else []


_POINT_ROW = re.compile(r"^(jax|torch)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\d+)", re.M)


def section_point_mae(run: dict) -> list[str]:
    rows = {b: (float(s), float(rss)) for b, _, s, _, rss, _ in _POINT_ROW.findall(run["output"])}
    if set(rows) != {"jax", "torch"}:
        return []
    return [
        "| ours (JAX) s / cloud | torch reference (CPU) s / cloud | torch / JAX | "
        "peak RSS MiB JAX / torch |",
        "|---|---|---|---|",
        f"| {rows['jax'][0]:.2f} | {rows['torch'][0]:.2f} | "
        f"{ratio(rows['torch'][0], rows['jax'][0])} | "
        f"{rows['jax'][1]:.0f} / {rows['torch'][1]:.0f} |",
    ]


def section_train_step(run: dict) -> list[str]:
    found = [line for line in run["output"].splitlines() if line.startswith("{")]
    if not found:
        return []
    r = json.loads(found[-1])
    return [
        f"Shapes: {r['shapes']}",
        "",
        "| compile s | mean step s | XLA temp MiB | XLA arguments MiB | peak RSS MiB |",
        "|---|---|---|---|---|",
        f"| {r['compile_s']} | {r['mean_step_s']} | {r['xla_temp_mib']} | "
        f"{r['xla_argument_mib']} | {r['peak_rss_mib']} |",
        "",
        "No reference figure: the original code's logs give no per-step time.",
    ]


def section_memory(run: dict) -> list[str]:
    records = [r for r in parse_results(run["output"]) if r["bench"] == "memory"]
    if not records:
        return []
    lines = [
        "Peak anonymous RSS above the process's baseline (heap, JAX buffers, copies: what can "
        "exhaust RAM) and peak total RSS (also counting memory-mapped library pages, which are "
        "reclaimable page cache) per stage, against the library's size. Target: <= ~2x. The "
        "sklearn row is the reference's projection, on a smaller library read into RAM.",
        "",
        "| stage | library rows | library MiB | s | anon above baseline MiB | anon / library | "
        "peak RSS MiB | RSS / library |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['stage']} | {r['rows']} | {r['library_mib']:.0f} | {r['seconds']:.1f} | "
            f"{r['peak_anon_above_baseline_mib']:.0f} | {r['peak_anon_ratio']:.2f}x | "
            f"{r['peak_rss_mib']:.0f} | {r['peak_rss_ratio']:.2f}x |"
        )
    return lines


def section_sharded_bank(run: dict) -> list[str]:
    records = [r for r in parse_results(run["output"]) if r["bench"] == "sharded_bank"]
    if not records:
        return []
    first = records[0]
    reference = {r["search"]: r for r in records if r["scorer"] == "unsharded"}
    lines = [
        f"Bank {first['bank_rows']} x {first['dim']} float32 split over host devices "
        f"(`patchcore.shard_bank`), {first['batch']} images x {first['patches']} patches per "
        "call. Host devices share this machine's cores: the figures show the cost of "
        "sharding, not the speed-up of real devices.",
        "",
        "| devices | scorer | search | rows / device | s / image | "
        "unsharded 1-device time / this | max score difference | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        ref = reference.get(r["search"])
        speed = ratio(ref["seconds_per_image"], r["seconds_per_image"]) if ref else "n/a"
        worst = (
            max(abs(a - b) for a, b in zip(r["scores"], ref["scores"], strict=True))
            if ref
            else float("nan")
        )
        lines.append(
            f"| {r['devices']} | {r['scorer']} | {r['search']} | {r['rows_per_device']} | "
            f"{r['seconds_per_image']:.2f} | {speed} | {worst:.1e} | {r['load_avg_1min']:.1f} |"
        )
    return lines


def write_summary(out: Path, machine: dict, peak: dict, runs: dict, quick: bool) -> Path:
    lines = [
        f"# Benchmark summary ({'quick, reduced shapes' if quick else 'full shapes'})",
        "",
        f"Command: `{PY} benchmarks/run_all.py --out {out}{' --quick' if quick else ''}` "
        f"(from the repository root; total {sum(r['seconds'] for r in runs.values()):.0f} s).",
        "",
        "## Machine",
        "",
        "| key | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in machine.items()],
        f"| measured matmul peak | float32: JAX {peak['jax']:.0f} GFLOP/s, numpy "
        f"{peak['numpy']:.0f} GFLOP/s; bfloat16 JAX {peak.get('jax_bf16', float('nan')):.0f} "
        "GFLOP/s |",
        "",
        "The machine is shared: other processes' load (load_avg_1min above) slows every figure; "
        "within a comparison the two sides run in the same process, round-robin, best of.",
    ]
    sections = [
        ("End-to-end test-time latency (RGB+3D)", "end_to_end", section_end_to_end),
        ("kNN scoring vs faiss-cpu IndexFlatL2", "patchcore", lambda r: section_knn(r, peak)),
        (
            "Greedy coreset vs a straightforward implementation",
            "patchcore",
            lambda r: section_coreset(r, runs.get("memory")),
        ),
        ("Host memory of bank building", "memory", section_memory),
        ("RGB backbone: JAX vs torch", "backbones", section_backbones),
        ("Point branch: JAX vs torch", "point_mae", section_point_mae),
        ("LSFA adaptor training step", "train_step", section_train_step),
        ("Sharded memory banks: scoring vs host devices", "sharded_bank", section_sharded_bank),
    ]
    for title, name, make in sections:
        run = runs[name]
        lines += ["", f"## {title}", "", f"Command: `{run['command']}` ({run['seconds']:.0f} s)"]
        body = make(run) if run["status"] == 0 else []
        if run["status"] == "not run":
            lines += ["", "Not run in this invocation (`--only`)."]
        elif run["status"] != 0:
            lines += ["", f"**FAILED** (status {run['status']}); see raw/{name}.txt."]
        elif not body:
            lines += ["", f"**No figures found in the output**; see raw/{name}.txt."]
        else:
            lines += ["", *body]
    target = out / "summary.md"
    atomic_write_text(target, "\n".join(lines) + "\n")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="reduced shapes (minutes)")
    parser.add_argument("--only", nargs="+", choices=sorted(SCRIPTS), help="run a subset")
    parser.add_argument("--timeout", type=float, help="seconds per benchmark")
    parser.add_argument(
        "--summarise-only",
        action="store_true",
        help="rewrite summary.md from the outputs already in OUT/raw (runs nothing)",
    )
    args = parser.parse_args()
    timeout = args.timeout or (1200 if args.quick else 7200)
    arguments = QUICK_ARGS if args.quick else FULL_ARGS
    machine_file = args.out / "raw" / "machine.json"
    if args.summarise_only and machine_file.is_file():
        machine, peak = json.loads(machine_file.read_text())
    else:
        # Measured before the benchmarks so that the peak is this run's (the machine is shared).
        machine, peak = machine_description(), matmul_peak_gflops(n=3072, repeats=7)
        machine["matmul_measured"] = (
            "before the benchmarks"
            if not args.summarise_only
            else ("at summary time, not during the benchmark run")
        )
        atomic_write_text(machine_file, json.dumps([machine, peak]))
    runs = {}
    for name in args.only or SCRIPTS:
        if args.summarise_only:
            earlier = load_run(name, args.out / "raw")
            if earlier is not None:
                runs[name] = earlier
        else:
            runs[name] = run_benchmark(name, arguments[name], args.out / "raw", timeout)
    for name in SCRIPTS:
        runs.setdefault(
            name,
            {"command": f"{PY} {SCRIPTS[name]}", "output": "", "status": "not run", "seconds": 0.0},
        )
    target = write_summary(args.out, machine, peak, runs, args.quick)
    print(target.read_text())
    print(f"wrote {target}")
    failed = [n for n, r in runs.items() if r["status"] != 0 and (not args.only or n in args.only)]
    if failed:
        raise SystemExit(f"benchmarks failed: {failed}")


if __name__ == "__main__":
    main()
