"""Scale benchmark (issue 8): time and peak memory of `perq-onnx optimize` on Llama-3.2-1B-shaped
random models of 4, 8 and 16 layers (models/scale.py: fp32, weights in an external data file).

    python benchmarks/scale.py                          # --layers 4 8 16
    python benchmarks/scale.py --layers 4 --results /tmp/scale-check

For each size the model is built (or reused from the cache), then this runs, in a child process,

    perq-onnx optimize MODEL -o OUT --block 16 --calib-data wikitext-2/valid.txt --tokenizer DIR \
        --calib-samples 8 --seq-len 512 --report REPORT.json

and measures the child's wall time and peak RSS: the largest of ``ru_maxrss`` from ``os.wait4`` on
that child, its VmRSS polled from /proc every 0.5 s (which also stops a child that goes over
``--max-rss-gb`` on this shared machine) and the phases' peaks in its report (the CLI resets the
kernel's peak mark at each phase, which lowers ``ru_maxrss`` too).
When the CLI knows ``--report``, the JSON it writes gives the time and peak RSS of each phase;
an older CLI rejects the option (exit 2, "unrecognized arguments") and is rerun without it, so
only the totals are known.

Goals checked: 16 layers in under 15 minutes with a peak RSS of at most 1.5x the model's bytes
(.onnx + its data file), and time and memory growing linearly with the number of layers (a
least-squares line through the sizes: slope per layer, and the largest relative residual, which
must stay within 10%).

Results (rewritten after each model): RESULTS/scale.json, scale.md (tables with the machine) and
scale.png (time and peak RSS against layers, with the 1.5x model-size line). GB = 1e9 bytes.
The optimized models are deleted after their size is taken, unless --keep.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

from perq_onnx.models import scale

ROOT = pathlib.Path(__file__).resolve().parent
RESULTS = ROOT / "results"
DATA = ROOT.parent.parent / "shared" / "data" / "wikitext-2"
GB = 1e9
TIME_GOAL_S = 15 * 60
RSS_GOAL = 1.5  # peak RSS / model bytes
LINEAR_TOLERANCE = 0.10


def log(msg: str) -> None:
    print(f"[scale] {msg}", file=sys.stderr, flush=True)


def onnx_bytes(onnx_file: pathlib.Path) -> int:
    """Bytes of an ONNX file and its external data files (the files beside it named after it)."""
    return sum(p.stat().st_size for p in onnx_file.parent.glob(onnx_file.name + "*") if p.is_file())


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def proc_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(cmd: list[str], max_rss: int) -> dict:
    """Run ``cmd``, echoing its output; return exit code, wall seconds, peak RSS and the output."""
    log("$ " + " ".join(map(str, cmd)))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def tee():
        for line in proc.stdout:
            sys.stderr.write("    " + line)
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=tee, daemon=True)
    reader.start()
    polled, killed = 0, False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        polled = max(polled, proc_rss(proc.pid))
        if polled > max_rss and not killed:
            log(f"child RSS {polled / GB:.1f} GB is over --max-rss-gb: killing it")
            proc.kill()
            killed = True
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, tell Popen
    reader.join(timeout=10)
    return {
        "rc": proc.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_bytes": max(usage.ru_maxrss * 1024, polled),
        "killed_over_max_rss": killed,
        "output": lines,
    }


def optimize_cmd(model: pathlib.Path, out: pathlib.Path, report: pathlib.Path | None, args) -> list[str]:
    cmd = [sys.executable, "-m", "perq_onnx.cli", "optimize", str(model), "-o", str(out),
           "--block", str(args.block), "--calib-data", str(DATA / "valid.txt"), "--tokenizer", str(model.parent),
           "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len)]
    return cmd + (["--report", str(report)] if report else [])


def bench_model(layers: int, args) -> dict:
    model = scale.onnx_path(layers)
    size = onnx_bytes(model)
    need = RSS_GOAL * size
    while mem_available() < need:
        log(f"L{layers}: waiting for {need / GB:.1f} GB of available memory ({mem_available() / GB:.1f} GB now)")
        time.sleep(30)
    out_dir = scale.cache_dir() / f"out-L{layers}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    out, report = out_dir / "model.onnx", out_dir / "report.json"
    log(f"L{layers}: optimizing {model} ({size / GB:.2f} GB)")
    res = run_child(optimize_cmd(model, out, report, args), int(args.max_rss_gb * GB))
    has_report_option = not (res["rc"] == 2 and any("unrecognized arguments" in s and "--report" in s
                                                     for s in res["output"]))
    if not has_report_option:
        log("this perq-onnx has no --report option: rerunning without it (totals only)")
        res = run_child(optimize_cmd(model, out, None, args), int(args.max_rss_gb * GB))
    rep = json.loads(report.read_text()) if report.is_file() else {}
    ok = res["rc"] == 0 and out.is_file()
    # the CLI resets the kernel's peak-RSS mark at each phase (/proc/self/clear_refs), which also
    # lowers ru_maxrss: the peak is the largest of it, the /proc polls and the phases' own peaks
    phase_peaks = [p.get("peak_rss_bytes") or 0 for p in rep.get("phases") or []]
    res["peak_rss_bytes"] = max([res["peak_rss_bytes"], *phase_peaks])
    row = {
        "layers": layers,
        "params": scale.n_params(layers),
        "model": str(model),
        "model_bytes": size,
        "export": scale.build_info(layers),
        "status": "ok" if ok else ("killed" if res["killed_over_max_rss"] else f"failed (exit {res['rc']})"),
        "error": None if ok else "\n".join(res["output"][-5:]),
        "wall_s": res["wall_s"],
        "peak_rss_bytes": res["peak_rss_bytes"],
        "rss_over_model": round(res["peak_rss_bytes"] / size, 3),
        "report_option": has_report_option,
        "phases": rep.get("phases"),
        "summaries": rep.get("summaries"),
        "output_bytes": onnx_bytes(out) if ok else None,
    }
    if not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    log(f"L{layers}: {row['status']}, {row['wall_s']:.0f} s, peak RSS {row['peak_rss_bytes'] / GB:.2f} GB "
        f"({row['rss_over_model']:.2f}x the model)")
    return row


def linear_fit(xs, ys) -> dict:
    """Least-squares line y = slope * x + intercept, with the largest relative residual."""
    slope, intercept = np.polyfit(xs, ys, 1)
    fit = slope * np.asarray(xs, float) + intercept
    resid = float(np.max(np.abs(fit - ys) / np.abs(ys)))
    increments = [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1)]
    return {"slope_per_layer": float(slope), "intercept": float(intercept), "max_rel_residual": resid,
            "increments_per_layer": [float(v) for v in increments], "linear": resid <= LINEAR_TOLERANCE}


def goals(rows) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    result = {}
    big = next((r for r in ok if r["layers"] == 16), None)
    if big:
        result["L16_time_under_15min"] = big["wall_s"] < TIME_GOAL_S
        result["L16_rss_within_1.5x_model"] = big["rss_over_model"] <= RSS_GOAL
    if len(ok) >= 3:
        xs = [r["layers"] for r in ok]
        result["time_fit_s"] = linear_fit(xs, [r["wall_s"] for r in ok])
        result["rss_fit_bytes"] = linear_fit(xs, [r["peak_rss_bytes"] for r in ok])
    return result


def machine() -> dict:
    import onnxruntime

    import perq_onnx

    mem = 0
    with open("/proc/meminfo") as f:
        mem = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT.parent,
                            capture_output=True, text=True).stdout.strip()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "nproc": len(os.sched_getaffinity(0)),
        "ram_bytes": mem,
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "perq_onnx": perq_onnx.__version__,
        "git": commit,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "runs": 1,
    }


def fmt_s(s):
    return "-" if s is None else f"{s:.0f}"


def fmt_gb(b):
    return "-" if b is None else f"{b / GB:.2f}"


def write_markdown(path: pathlib.Path, data: dict) -> None:
    m, rows, g = data["machine"], data["rows"], data["goals"]
    o = data["options"]
    lines = [
        "# Scale benchmark: `perq-onnx optimize` on Llama-3.2-1B-shaped random models",
        "",
        f"Machine: {m['platform']}, {m['processor']}, {m['nproc']} CPUs, {m['ram_bytes'] / 2**30:.0f} GiB RAM "
        f"(shared), Python {m['python']}, onnxruntime {m['onnxruntime']}, perq-onnx {m['perq_onnx']} "
        f"({m['git']}), {m['date']}, {m['runs']} run per size.",
        "",
        f"`perq-onnx optimize MODEL -o OUT --block {o['block']} --calib-data wikitext-2/valid.txt "
        f"--tokenizer DIR --calib-samples {o['calib_samples']} --seq-len {o['seq_len']} --report R.json`; "
        "models from models/scale.py (fp32, weights in `model.onnx_data`). GB = 1e9 bytes.",
        "",
        "| layers | params | model GB | status | wall s | peak RSS GB | RSS / model | output GB |",
        "|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['params'] / 1e6:.0f}M | {fmt_gb(r['model_bytes'])} | {r['status']} | "
                     f"{fmt_s(r['wall_s'])} | {fmt_gb(r['peak_rss_bytes'])} | {r['rss_over_model']:.2f} | "
                     f"{fmt_gb(r['output_bytes'])} |")
    phased = [r for r in rows if r["phases"]]
    if phased:
        names = list(dict.fromkeys(p["name"] for r in phased for p in r["phases"]))
        lines += ["", "Phases, from the CLI's --report (seconds / peak RSS GB within the phase):", "",
                  "| phase | " + " | ".join(f"L{r['layers']}" for r in phased) + " |",
                  "|---|" + "---:|" * len(phased)]
        for name in names:
            cells = []
            for r in phased:
                p = next((p for p in r["phases"] if p["name"] == name), None)
                cells.append("-" if p is None else f"{p['seconds']:.1f} s / {fmt_gb(p.get('peak_rss_bytes'))}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    elif rows:
        why = "this perq-onnx has no `--report` option" if not rows[-1]["report_option"] else "no report was written"
        lines += ["", f"No per-phase numbers: {why}."]
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed:
        lines += ["", f"L{r['layers']} {r['status']}; last output lines:", "", "```", r["error"] or "", "```"]
    lines += ["", "Goals:", ""]
    if "L16_time_under_15min" in g:
        lines.append(f"- 16 layers under 15 min: {'yes' if g['L16_time_under_15min'] else 'NO'}")
        lines.append(f"- 16 layers peak RSS <= 1.5x model bytes: {'yes' if g['L16_rss_within_1.5x_model'] else 'NO'}")
    else:
        lines.append("- 16 layers: no successful run")
    for key, label, unit, scale_ in (("time_fit_s", "time", "s", 1), ("rss_fit_bytes", "peak RSS", "GB", GB)):
        if key in g:
            f = g[key]
            inc = ", ".join(f"{v / scale_:.2f}" for v in f["increments_per_layer"])
            lines.append(f"- {label} linear in layers: {'yes' if f['linear'] else 'NO'} "
                         f"({f['slope_per_layer'] / scale_:.2f} {unit}/layer + {f['intercept'] / scale_:.2f} {unit}, "
                         f"largest residual {100 * f['max_rel_residual']:.1f}%; increments per layer {inc} {unit})")
    if len([r for r in rows if r["status"] == "ok"]) < 3:
        lines.append("- linearity: fewer than 3 successful sizes")
    exports = [r for r in rows if r["export"].get("export")]
    if exports:
        lines += ["", "Model builds (models/scale.py, each step a child process):", "",
                  "| layers | torch build + save s | its peak RSS GB | optimum export s | its peak RSS GB |",
                  "|---:|---:|---:|---:|---:|"]
        for r in exports:
            h, e = r["export"]["hf"], r["export"]["export"]
            lines.append(f"| {r['layers']} | {h['seconds']:.0f} | {fmt_gb(h['peak_rss_bytes'])} | "
                         f"{e['seconds']:.0f} | {fmt_gb(e['peak_rss_bytes'])} |")
    path.write_text("\n".join(lines) + "\n")


def plot(path: pathlib.Path, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["status"] == "ok"]
    if not rows:
        return
    xs = [r["layers"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(xs, [r["wall_s"] / 60 for r in rows], "o-", label="optimize wall time")
    ax1.axhline(TIME_GOAL_S / 60, color="r", ls="--", label="goal at 16 layers (15 min)")
    ax1.set(xlabel="layers", ylabel="minutes", title="time", xticks=xs)
    ax2.plot(xs, [r["peak_rss_bytes"] / GB for r in rows], "o-", label="peak RSS")
    ax2.plot(xs, [r["model_bytes"] / GB for r in rows], "k:", label="model bytes (fp32)")
    ax2.plot(xs, [RSS_GOAL * r["model_bytes"] / GB for r in rows], "r--", label="1.5x model bytes (goal)")
    ax2.set(xlabel="layers", ylabel="GB", title="peak memory", xticks=xs)
    for ax in (ax1, ax2):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("perq-onnx optimize, Llama-3.2-1B shape (random weights)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-rss-gb", type=float, default=16.0,
                   help="kill an optimize child whose RSS goes over this (shared machine; default 16)")
    p.add_argument("--results", type=pathlib.Path, default=RESULTS, help="results directory")
    p.add_argument("--keep", action="store_true", help="keep the optimized models (in the cache, out-L{n})")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of RESULTS/scale.json for layer counts not measured in this run")
    args = p.parse_args(argv)
    if not (DATA / "valid.txt").is_file():
        sys.exit(f"missing calibration text {DATA / 'valid.txt'}")
    args.results.mkdir(parents=True, exist_ok=True)
    data = {"machine": machine(),
            "options": {"block": args.block, "calib_samples": args.calib_samples, "seq_len": args.seq_len},
            "rows": [], "goals": {}}
    previous = args.results / "scale.json"
    if args.resume and previous.is_file():
        data["rows"] = [r for r in json.loads(previous.read_text())["rows"] if r["layers"] not in args.layers]
    for n in sorted(args.layers):
        data["rows"].append(bench_model(n, args))
        data["rows"].sort(key=lambda r: r["layers"])
        data["goals"] = goals(data["rows"])
        (args.results / "scale.json").write_text(json.dumps(data, indent=1) + "\n")
        write_markdown(args.results / "scale.md", data)
        plot(args.results / "scale.png", data["rows"])
    log(f"results in {args.results}/scale.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
