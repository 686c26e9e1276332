"""Results: the machine, the console table, `latest.json` and `latest.md`.

Everything is rendered from one JSON-able results dict, so the table, the JSON
and the markdown always agree.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import torch

from bench.idle import idle_lines

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GB = 1000**3
MB = 1000**2
# (numerator, denominator, target or None): throughput ratios worth printing.
RATIOS = (
    ("service", "reference", 10.0),
    ("service", "hf", 1.75),
    ("service", "openvino", None),
    ("service", "openvino-bf16", None),
    ("service", "onnxruntime", None),
    ("service", "engine", None),
    ("service", "runner", None),
    ("runner", "openvino", None),
    ("runner", "openvino-bf16", None),
    ("engine", "reference", None),
    ("engine", "hf", None),
    ("engine", "openvino", None),
    ("engine", "onnxruntime", None),
)
SHORT_NAMES = {
    "reference": "fair-esm (arrival)",
    "hf": "HF sdpa (sorted)",
    "openvino": "OpenVINO fp32",
    "openvino-bf16": "OpenVINO bf16 hint",
    "onnxruntime": "ONNX Runtime",
    "engine": "engine in-process",
    "runner": "worker's runner in-process",
    "service": "service e2e",
}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info(device: str = "cpu") -> dict:
    """Where and when the numbers were taken."""
    gpu = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None
    return {
        "device": device,
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "fair_esm": _version("fair-esm"),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# Issue 12: the service at 1.2x OpenVINO at the service's own compute precision.
OPENVINO_TARGET = 1.2
OPENVINO_AT = {"fp32": "openvino", "bf16": "openvino-bf16"}


def ratios(throughput: dict, precision: str = "fp32") -> list[dict]:
    """Every ratio of RATIOS whose two throughputs were measured."""
    found = []
    for top, bottom, target in RATIOS:
        if top == "service" and bottom == OPENVINO_AT.get(precision):
            target = OPENVINO_TARGET
        if top == "runner" and bottom != OPENVINO_AT.get(precision):
            continue  # the runner runs at the worker's precision only
        if top in throughput and bottom in throughput:
            value = throughput[top]["tokens_per_s"] / throughput[bottom]["tokens_per_s"]
            median = (
                throughput[top]["median_tokens_per_s"] / throughput[bottom]["median_tokens_per_s"]
            )
            row = {"name": f"{top} / {bottom}", "value": round(value, 3), "target": target}
            row["median_value"] = round(median, 3)
            row["pass"] = None if target is None else value >= target
            found.append(row)
    return found


def _verdict(passed: bool | None) -> str:
    return "" if passed is None else ("PASS" if passed else "FAIL")


def _corpus_lines(name: str, result: dict) -> list[str]:
    corpus = result["corpus"]
    lines = [
        f"== corpus {name}: {corpus['sequences']} sequences, {corpus['residues']:,} residues, "
        f"lengths {corpus['min_length']}..{corpus['max_length']} "
        f"(median {corpus['median_length']:g}) ==",
        f"{'':52} {'tokens/s':>9} {'best s':>7} {'median s':>8} {'passes':>6} {'other CPU s':>11}",
    ]
    for row in result["throughput"].values():
        lines.append(
            f"{row['label']:52} {row['tokens_per_s']:>9,.0f} {row['best_seconds']:>7.2f} "
            f"{row['median_seconds']:>8.2f} {len(row['pass_seconds']):>6} "
            f"{row['best_pass_foreign_cpu_s']:>11.1f}{' noisy' if row['best_pass_noisy'] else ''}"
        )
    for row in result["ratios"]:
        target = f"target >= {row['target']:g}x" if row["target"] else ""
        median = f"(median passes {row['median_value']:.2f}x)" if "median_value" in row else ""
        lines.append(
            f"  {row['name']:24} {row['value']:>7.2f}x {median:24} {target:16} "
            f"{_verdict(row['pass'])}"
        )
    busy = result.get("service_worker")
    if busy:
        lines.append(
            f"  worker during timed service passes: {busy['batches']} batches, "
            f"{busy['items']} items, engine+Redis writes {busy['busy_ms'] / 1000:.2f} s "
            f"of {busy['wall_s']:.2f} s wall ({busy['busy_share']:.0%})"
        )
        cpu = ", ".join(f"{role} {seconds:.1f}" for role, seconds in busy["cpu_s"].items())
        lines.append(f"  CPU seconds in those passes: {cpu}")
    return lines


def _ms(value: float | None) -> str:
    return "      ? ms" if value is None else f"{value:7.2f} ms"


def _latency_lines(latency: dict) -> list[str]:
    engine, service = latency["engine"], latency["service"]
    return [
        f"== latency: one {latency['residues']}-residue Encode (mean, last layer), "
        f"{service['calls']} sequential calls each, in-process and service alternated ==",
        f"  in-process engine.run p50 {engine['p50_ms']:7.2f} ms p99 {engine['p99_ms']:7.2f} ms",
        f"  worker batch (log)    p50 {_ms(latency['worker_batch_p50_ms'])}  "
        "(engine + Redis writes)",
        f"  frontend (log)        p50 {_ms(latency['frontend_request_p50_ms'])}  "
        "(+ enqueue, worker wake-up, relay)",
        f"  service end to end    p50 {service['p50_ms']:7.2f} ms p99 {service['p99_ms']:7.2f} ms",
        f"  service p50 - in-process p50 = {latency['p50_overhead_ms']:.2f} ms  "
        f"(target <= {latency['target_ms']:g} ms)  {_verdict(latency['pass'])}",
        f"  other processes' CPU during the timed calls: {service['foreign_cpu_s']:.1f} s",
    ]


def _mixed_lines(mixed: dict) -> list[str]:
    return [
        f"== mixed traffic: {len(mixed['short_ms'])} one-item Encodes of "
        f"{mixed['short_residues']} residues, sent one after another while "
        f"{mixed['long_items']} items of {mixed['long_residues']} residues are queued ==",
        f"  backlog when the first was sent {mixed['backlog_at_first_call']} items, after the "
        f"last {mixed['backlog_after_last_call']}",
        f"  short requests p50 {mixed['short_p50_ms']:.1f} ms, max {mixed['short_max_ms']:.1f} ms;"
        f" longest batch meanwhile {mixed['longest_batch_ms']:.1f} ms",
        f"  max <= longest batch + its own batch ({mixed['allowed_ms']:.0f} ms)  "
        f"{_verdict(mixed['pass'])}",
    ]


def _memory_lines(memory: dict) -> list[str]:
    response = memory["response"]
    loaded = memory["worker_peak_rss_after_load_bytes"] / MB
    peak = memory["worker_peak_rss_after_request_bytes"] / MB
    return [
        f"== memory: one Encode of {memory['request']} (fresh worker) ==",
        f"  worker peak RSS after load     {loaded:8,.0f} MB",
        f"  worker peak RSS after request  {peak:8,.0f} MB  "
        f"(target <= {memory['target_bytes'] / GB:g} GB)  {_verdict(memory['pass'])}",
        f"  frontend peak RSS {memory['frontend_peak_rss_after_bytes'] / MB:,.0f} MB, "
        f"redis-server peak RSS {memory['redis_peak_rss_bytes'] / MB:,.0f} MB",
        f"  response: {response['tensor_bytes']:,} tensor bytes (expected "
        f"{memory['expected_tensor_bytes']:,}), {response['message_bytes']:,} bytes in "
        f"{response['messages']:,} messages, {response['items_complete']} items, "
        f"{response['seconds']:.1f} s",
    ]


def render_table(results: dict) -> str:
    """The console report."""
    machine = results["machine"]
    lines = [
        f"ESM-2 8M benchmark, {machine['date']}: {machine['cpu_model']}, "
        f"{machine['cores_available']} cores, torch {machine['torch']}, "
        f"{results['settings']['threads']} threads, "
        f"{_placement(results)}",
        "tokens/s: residues / wall s of the fastest pass (after warm-up); the stages run in "
        "rounds of one pass each, side by side; other CPU s: CPU seconds processes",
        "outside the benchmark used during that pass (shared-machine noise; a noisy fastest "
        "pass, over 5% of a core, gets up to --repeats more rounds)",
    ]
    for name, result in results["corpora"].items():
        lines += ["", *_corpus_lines(name, result)]
    if "max_difference_from_fair_esm" in results:
        lines += ["", *_difference_lines(results["max_difference_from_fair_esm"])]
    if "latency" in results:
        lines += ["", *_latency_lines(results["latency"])]
    if "idle" in results:
        lines += ["", *idle_lines(results["idle"])]
    if "mixed" in results:
        lines += ["", *_mixed_lines(results["mixed"])]
    if "memory" in results:
        lines += ["", *_memory_lines(results["memory"])]
    return "\n".join(lines)


def _difference_lines(differences: dict) -> list[str]:
    return ["max |mean embedding - fair-esm's| on the same weights:"] + [
        f"  {SHORT_NAMES[stage]:24} {value:.1e}" for stage, value in differences.items()
    ]


def _placement(results: dict) -> str:
    """Where our engine and worker ran, e.g. "cpu fp32" or "cuda (NVIDIA H100) fp16"."""
    settings, machine = results["settings"], results["machine"]
    device = settings.get("device", "cpu")
    if machine.get("gpu"):
        device += f" ({machine['gpu']})"
    return f"ours on {device} {settings.get('precision', 'fp32')}"


def _markdown_cell(row: dict | None) -> str:
    if row is None:
        return "-"
    return f"{row['tokens_per_s']:,.0f}" + (" *" if row["best_pass_noisy"] else "")


def _markdown_throughput(results: dict) -> list[str]:
    lines = [
        "| corpus | " + " | ".join(SHORT_NAMES.values()) + " | service / fair-esm | service / HF "
        "| service / OpenVINO, same precision |",
        "|---|" + "---:|" * (len(SHORT_NAMES) + 3),
    ]
    openvino = OPENVINO_AT.get(results["settings"].get("precision", "fp32"), "openvino")
    for name, result in results["corpora"].items():
        cells = [_markdown_cell(result["throughput"].get(key)) for key in SHORT_NAMES]
        by_name = {row["name"]: f"{row['value']:.2f}x" for row in result["ratios"]}
        cells += [
            by_name.get(name, "-")
            for name in ("service / reference", "service / hf", f"service / {openvino}")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(results: dict) -> str:
    """A small markdown summary for the README."""
    machine = results["machine"]
    lines = [
        f"Throughput in residues/s (ESM-2 8M shape, mean embedding of the last layer, "
        f"batches of 8, {results['settings']['threads']} threads; {machine['cpu_model']}, "
        f"{machine['cores_available']} cores, torch {machine['torch']}, {machine['date'][:10]}; "
        f"{_placement(results)}):",
        "",
        *_markdown_throughput(results),
    ]
    if any(
        row["best_pass_noisy"]
        for result in results["corpora"].values()
        for row in result["throughput"].values()
    ):
        lines += ["", "\\* other processes used over 5% of a core during that timing."]
    if "max_difference_from_fair_esm" in results:
        differences = _difference_lines(results["max_difference_from_fair_esm"])
        lines += ["", "```", *differences, "```"]
    if "latency" in results:
        latency = results["latency"]
        lines += [
            "",
            f"Latency of one {latency['residues']}-residue Encode: service p50 "
            f"{latency['service']['p50_ms']:.1f} ms, p99 {latency['service']['p99_ms']:.1f} ms; "
            f"in-process engine p50 {latency['engine']['p50_ms']:.1f} ms.",
        ]
    if "idle" in results:
        lines += ["", "```", *idle_lines(results["idle"]), "```"]
    if "mixed" in results:
        mixed = results["mixed"]
        lines += [
            "",
            f"Mixed traffic: {mixed['short_residues']}-residue requests sent behind "
            f"{mixed['backlog_at_first_call']} queued items of {mixed['long_residues']} residues: "
            f"p50 {mixed['short_p50_ms']:.0f} ms, max {mixed['short_max_ms']:.0f} ms (longest "
            f"batch {mixed['longest_batch_ms']:.0f} ms).",
        ]
    if "memory" in results:
        memory = results["memory"]
        lines += [
            "",
            f"Memory: one Encode of {memory['request']} "
            f"({memory['response']['tensor_bytes'] / GB:.2f} GB of tensors) peaks the worker at "
            f"{memory['worker_peak_rss_after_request_bytes'] / GB:.2f} GB RSS "
            f"({memory['worker_peak_rss_after_load_bytes'] / GB:.2f} GB after load).",
        ]
    return "\n".join(lines) + "\n"


def write_results(results: dict, directory: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Writes latest.json and latest.md (through a temporary file each); returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = (directory / "latest.json", directory / "latest.md")
    texts = (json.dumps(results, indent=2) + "\n", render_markdown(results))
    for path, text in zip(paths, texts, strict=True):
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_text(text)
        temporary.replace(path)
    return paths
