"""Section 6: a LoRA training step against a full-UNet one on the tiny model: `t2i-train --lora_rank` and plain
`t2i-train` on the demo-sized store, each run in a process of its own (memory.train_subprocess) so that each peak RSS
is its own, the two alternating so that drifting load falls on both. `python -m bench.lora` runs this section
alone (on a fresh tiny model and store) and prints its table."""

import statistics

from bench.memory import RSS_STEPS, train_subprocess
from bench.timing import paired_ratio

LORA_RANK = 4
BATCH = 8


def bench_lora(model, store, work, repeats):
    variants = {"full": (), "lora": ("--lora_rank", str(LORA_RANK))}
    runs = {name: [] for name in variants}
    for _ in range(repeats):
        for name, extra in variants.items():
            runs[name].append(train_subprocess(model, store, work / f"lora-bench-{name}", RSS_STEPS, BATCH, extra))
    out = {"steps": RSS_STEPS, "batch": BATCH, "resolution": 32, "rank": LORA_RANK, "runs": repeats}
    for name in variants:
        out[name] = {"peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs[name]),
                     "median_step_s": statistics.median(r["median_step_s"] for r in runs[name]),
                     "runs": runs[name]}
    for key in ("median_step_s", "peak_rss_mb"):
        out[f"ratio {key} lora / full"] = paired_ratio([r[key] for r in runs["lora"]], [r[key] for r in runs["full"]])
    return out


def markdown_lora(r) -> list:
    lines = [f"**LoRA vs full UNet, `t2i-train`** (tiny model, {r['steps']} steps of {r['batch']} at "
             f"{r['resolution']} px, compiled step, fp32; LoRA rank {r['rank']} on to_q, to_k, to_v, to_out.0; median "
             f"of {r['runs']} runs each, a process per run)", "",
             "| training | step time | peak RSS |", "|---|---|---|"]
    for name, label in (("full", "full UNet"), ("lora", f"LoRA rank {r['rank']}")):
        lines.append(f"| {label} | {r[name]['median_step_s'] * 1000:.0f} ms | {r[name]['peak_rss_mb']:.0f} MB |")
    lines.append(f"| ratio LoRA / full | {r['ratio median_step_s lora / full']:.2f} | "
                 f"{r['ratio peak_rss_mb lora / full']:.2f} |")
    return lines


def main(repeats=2):
    import json

    from bench import WORK
    from bench.inputs import prepare
    from bench.timing import quiet
    from t2i.precompute import PrecomputeConfig, run

    model, data = prepare()
    store = WORK / "latents-32.zarr"
    with quiet():
        run(PrecomputeConfig(pretrained_model_name_or_path=str(model), train_data_dir=str(data), output_dir=str(store),
                             resolution=32, center_crop=True, random_flip=True, device_target="CPU", overwrite=True))
    result = bench_lora(model, store, WORK, repeats)
    print(json.dumps(result, indent=2))
    print("\n".join(markdown_lora(result)))


if __name__ == "__main__":
    main()
