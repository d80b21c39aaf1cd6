"""bench.json, bench.md and bench.png from a harness result."""
from __future__ import annotations

import json
from pathlib import Path

from ldmrt.files import atomic_write

COMPONENT_TITLES = {"text_encoder": "text encoder", "unet": "UNet step", "unet_cond": "UNet step, unguided",
                    "unet_shallow": "UNet cached step", "unet_shallow_cond": "UNet cached step, unguided",
                    "decoder": "VAE decode"}


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def markdown(result: dict) -> str:
    m = result["machine"]
    cfg = result["config"]
    lines = [
        f"Command: `{result['command']}`  ",
        f"Machine: {m['cpu']} ({m['machine']}), {m['logical_cpus']} logical CPUs, {m['threads']} threads, "
        f"{m['memory_gb']} GB; CPU flags {', '.join(m['cpu_flags']) or 'none of interest'}; AMX: "
        f"{'yes' if m['amx'] else 'no'}; load average {_load(m.get('load_average_start'))} at start, "
        f"{_load(m.get('load_average_end'))} at end  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + "  ",
        f"Run: {result['started']} .. {result.get('finished', '?')}; model {cfg['model']} (random weights, the same "
        f"tensors in every runtime), batch {cfg['batch']} (text encoder, UNet), 1 (decoder); {cfg['warmup']} "
        f"warm-up + {cfg['repeats']} interleaved rounds, medians; ratio = median / median of "
        f"`{result['baseline']}` in this run (< 1 is faster).",
    ]
    if result.get("facts", {}).get("openvino_precision"):
        lines[-1] += f" OpenVINO inference precision: {result['facts']['openvino_precision']}."
    rows = result["results"]
    for size in sorted({r["size"] for r in rows}):
        lines += ["", f"### {size}x{size}", "",
                  "| variant | precision | component | median s | ratio | GFLOP/s | rel L2 vs fp32 | set-up s | "
                  "first call s | set-up MB | run peak MB |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if r["size"] != size:
                continue
            if "unavailable" in r:
                lines.append(f"| {r['variant']} | {r['precision']} | {COMPONENT_TITLES[r['component']]} | "
                             f"unavailable: {r['unavailable']} |||||||")
                continue
            lines.append(
                f"| {r['variant']} | {r['precision']} | {COMPONENT_TITLES[r['component']]} | {r['median_s']:.4g} | "
                f"{_fmt(r.get('ratio_vs_baseline'), '.2f')} | {r['gflop_per_s']:.0f} | "
                f"{_fmt(r.get('rel_l2_vs_fp32'), '.1e')} | {r['setup_s']:.1f} | {r['first_call_s']:.2f} | "
                f"{r['setup_rss_mb']:.0f} | {_fmt(r.get('run_peak_mb'), '.0f')} |")
        for steps in dict.fromkeys(e["steps"] for e in result["e2e"]):
            e2e = [e for e in result["e2e"] if e["size"] == size and e["steps"] == steps]
            if not e2e:
                continue
            lines += ["", f"End to end ({steps} {cfg.get('sampler', 'ddim')} steps, composed from the "
                      f"medians: text encoder + the plan's UNet calls + decode; ratio to {result['baseline']} exact):",
                      "", "| variant | mode | UNet calls (full guided / unguided / cached / cached unguided) | "
                      "s / image | ratio |", "|---|---|---|---:|---:|"]
            lines += [f"| {e['variant']} | {e['mode']} | "
                      + " / ".join(str(e["calls"].get(c, 0)) for c in ("unet", "unet_cond", "unet_shallow",
                                                                        "unet_shallow_cond"))
                      + f" | {e['seconds_per_image']:.1f} | {_fmt(e['ratio_vs_baseline'], '.2f')} |" for e in e2e]
    return "\n".join(lines) + "\n"


def _load(value) -> str:
    return "?" if not value else "/".join(f"{x:.1f}" for x in value)


def plot(result: dict, path: Path) -> None:
    """Horizontal bars of ratio to the baseline, one group per (size, component); PIL only."""
    from PIL import Image, ImageDraw

    rows = [r for r in result["results"] if r.get("ratio_vs_baseline") is not None]
    groups = sorted({(r["size"], r["component"]) for r in rows},
                    key=lambda g: (g[0], list(COMPONENT_TITLES).index(g[1])))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    bar, gap, left, width = 14, 18, 190, 420
    top_ratio = max([r["ratio_vs_baseline"] for r in rows] + [1.0]) * 1.1
    height = 40 + sum(gap + bar * sum(1 for r in rows if (r["size"], r["component"]) == g) for g in groups) + 20
    image = Image.new("RGB", (left + width + 80, max(height, 80)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), f"median latency / {result['baseline']} (same run; < 1 is faster)", fill="black")
    y = 30
    for size, component in groups:
        draw.text((10, y + 2), f"{size}px {COMPONENT_TITLES[component]}", fill="black")
        y += gap
        for r in rows:
            if (r["size"], r["component"]) != (size, component):
                continue
            colour = palette[variants.index(r["variant"]) % len(palette)]
            length = int(width * r["ratio_vs_baseline"] / top_ratio)
            draw.text((14, y), r["variant"][:28], fill=colour)
            draw.rectangle([left, y + 1, left + length, y + bar - 2], fill=colour)
            draw.text((left + length + 4, y), f"{r['ratio_vs_baseline']:.2f}", fill="black")
            y += bar
    one = left + int(width / top_ratio)
    draw.line([one, 26, one, y], fill=(80, 80, 80))
    image.save(path)


def write_report(result: dict, out: Path) -> None:
    out = Path(out)
    atomic_write(out / "bench.json", json.dumps(result, indent=1))
    atomic_write(out / "bench.md", markdown(result))
    plot(result, out / "bench.png")
