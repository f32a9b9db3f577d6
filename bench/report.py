"""The tables: bench/results.md and bench/results-sd15.md from the results, and writing both files."""

import json
import time

from bench import NUM_IMAGES, OUT
from bench.lora import markdown_lora
from bench.sd15 import SD15_TRAIN_REPEATS
from bench.timing import loadavg, log


def fmt_s(x):
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def header(results):
    m = results["machine"]
    return (
        f"Measured {results['measured_at']} on {m['nproc']} cores ({m['cpu']}), MindSpore {m['mindspore']}, "
        f"mindone {m['mindone']}, commit {m['git_commit']}, t2i/cpu_ops.py at {m['cpu_ops']['last_commit']!r}"
        f"{' (+ uncommitted changes)' if m['cpu_ops']['uncommitted_changes'] else ''}; load average "
        f"{results['load_start'][0]} at the start, {results['load_end'][0]} at the end (its own work included). "
        f"Medians of {results['repeats']} runs after a warm-up; ratios are medians of per-repeat ratios; `load` is "
        "the 1-minute load average when the row finished."
    )


def markdown(results):
    lines = [
        header(results),
        "",
        "**Training step, tiny model** (cached = the real loop on the latent store; seed-style = the same loop "
        "encoding the batch with VAE+CLIP first)",
        "",
        "| images | latents | batch | UNet fwd+bwd (PyNative / jit) | TrainStep on tensors (--no_jit / jit) | "
        "cached step | seed-style step | cached / fwd+bwd jit | cached / TrainStep | cached / seed-style | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["train_step"]:
        t, q = r["times"], r["ratios"]
        lat = "x".join(map(str, r["latent"]))
        lines.append(
            f"| {r['resolution']} px | {lat} | {r['batch']} | {fmt_s(t['unet_fwd_bwd']['median_s'])} / "
            f"{fmt_s(t['unet_fwd_bwd_jit']['median_s'])} | {fmt_s(t['train_step_no_jit']['median_s'])} / "
            f"{fmt_s(t['train_step_on_tensors']['median_s'])} | {fmt_s(t['cached_step']['median_s'])} | "
            f"{fmt_s(t['seed_style_step']['median_s'])} | {q['cached_step / unet_fwd_bwd_jit']:.2f} | "
            f"{q['cached_step / train_step_on_tensors']:.2f} | {q['cached_step / seed_style_step']:.2f} | "
            f"{r['load'][0]} |")
    lines += ["", f"**Precompute** ({NUM_IMAGES} images with flips, batch 8, median of "
              f"{results['precompute'][0]['repeats']} runs)", "",
              "| images | t2i.precompute.run | bare VAE+CLIP forward | precompute / bare | load |",
              "|---|---|---|---|---|"]
    for r in results["precompute"]:
        ips = r["images_per_s"]
        lines.append(f"| {r['resolution']} px | {ips['precompute']['median']:.1f} img/s | "
                     f"{ips['bare_encode']['median']:.1f} img/s | {r['ratio precompute / bare_encode']:.2f} | "
                     f"{r['load'][0]} |")
    peer = results.get("peer")
    lines += ["", "**MindSpore vs PyTorch diffusers, CPU, same geometry**", ""]
    if peer is None:
        lines.append("Not measured: run `make bench-peer` (creates .venv-peer with torch) and `make bench` again.")
    else:
        lines += [f"PyTorch {peer['torch']}, diffusers {peer['diffusers']}, {peer['torch_threads']} threads; "
                  f"{peer['source']}, in its own process (load {peer['load_start'][0]} -> {peer['load_end'][0]}), "
                  "so the ratio is of the two medians.", "",
                  "| what | images | batch | MindSpore | PyTorch | MindSpore / PyTorch |", "|---|---|---|---|---|---|"]
        ms_steps = {(r["resolution"], r["batch"]): r["times"] for r in results["train_step"]}
        for r in peer["train_step"]:
            mine = ms_steps.get((r["resolution"], r["batch"]))
            if mine is None:
                continue
            for key, peer_key, label in (
                    ("unet_fwd_bwd", "unet_fwd_bwd", "UNet fwd+bwd, PyNative"),
                    ("unet_fwd_bwd_jit", "unet_fwd_bwd", "UNet fwd+bwd, jit"),
                    ("train_step_no_jit", "train_step_on_tensors", "train step (+AdamW), --no_jit"),
                    ("train_step_on_tensors", "train_step_on_tensors", "train step (+AdamW), jit (default)")):
                a, b = mine[key]["median_s"], r["times"][peer_key]["median_s"]
                lines.append(f"| {label} | {r['resolution']} px | {r['batch']} | {fmt_s(a)} | {fmt_s(b)} | "
                             f"{a / b:.2f} |")
        ms_pipe = {r["resolution"]: r["times"] for r in results["pipeline"]}
        compile_s = {r["resolution"]: r["jit_compile_s"] for r in results["pipeline"]}
        for r in peer["pipeline"]:
            for key, label in (("pipeline", "PyNative"), ("pipeline_jit", "--jit")):
                a, b = ms_pipe[r["resolution"]][key]["median_s"], r["times"]["pipeline"]["median_s"]
                lines.append(f"| pipeline, {r['ddim_steps']} DDIM steps, CFG, {label} | {r['resolution']} px | 1 | "
                             f"{fmt_s(a)} | {fmt_s(b)} | {a / b:.2f} |")
        lines += ["", "--jit compiles the UNet once per shape before the first call: "
                  + ", ".join(f"{v:.1f} s at {k} px" for k, v in compile_s.items()) + "."]
    mem = results["memory"]
    lines += ["", f"**Peak RSS of `t2i-train`** ({mem['steps']} steps of {mem['batch']} at {mem['resolution']} px, "
              f"median of {mem['runs']} runs each)", "",
              "| store | samples | on disk | peak RSS | step time |", "|---|---|---|---|---|"]
    for name in ("small", "x100"):
        s = mem[name]
        lines.append(f"| {'demo' if name == 'small' else '100x'} | {s['samples']} | {s['store_mb']:.1f} MB | "
                     f"{s['peak_rss_mb']:.0f} MB | {fmt_s(s['median_step_s'])} |")
    lines.append(f"| ratio 100x / demo | | | {mem['ratio peak_rss x100 / small']:.3f} | |")
    read = mem["x100"]["read_batch"]
    lines += ["", f"**One batch of {read['batch']} read from the store** (`LatentStore.read`, median of "
              f"{len(read['times']['random']['runs_s'])} reads, fresh rows each time)", "",
              "| store | consecutive rows | random rows | random / consecutive |", "|---|---|---|---|"]
    sd15 = mem["read_batch_sd15_geometry"]
    for label, r in (("demo", mem["small"]["read_batch"]), ("100x", mem["x100"]["read_batch"]),
                     (f"SD-1.5 geometry ({sd15['rows']} rows of noise)", sd15)):
        ms = {k: f"{r['times'][k]['median_s'] * 1000:.1f} ms" for k in ("consecutive", "random")}
        lines.append(f"| {label} | {ms['consecutive']} | {ms['random']} | {r['ratio random / consecutive']:.2f} |")
    if "lora" in results:
        lines += ["", *markdown_lora(results["lora"])]
    if "loop" in results:
        lines += ["", *markdown_loop(results["loop"], (peer or {}).get("loop", []))]
    return "\n".join(lines)


def markdown_loop(rows, peer_rows) -> list:
    peer = {r["geometry"]: r["loop_step_s"] for r in peer_rows}
    lines = [f"**`t2i-train` end to end** (its log's median step after the third, {rows[0]['steps']} steps of "
             f"{rows[0]['batch']} at 16x16 latents, validation and checkpoints off) against the bare compiled step "
             "on one of its batches, and a plain PyTorch diffusers loop on the same UNet and shapes", "",
             "| UNet | t2i-train loop | bare step | loop / bare | PyTorch loop | loop / PyTorch loop | load |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = peer.get(r["geometry"])
        unet = ", ".join(f"{k} {v}" for k, v in r["unet"].items()) or "t2i's tiny"
        vs_peer = f"{fmt_s(p)} | {r['loop_step_s'] / p:.2f}" if p else "- | -"
        lines.append(f"| {unet} | {fmt_s(r['loop_step_s'])} | {fmt_s(r['bare_step_s'])} | "
                     f"{r['ratio loop / bare']:.2f} | {vs_peer} | {r['load'][0]} |")
    return lines


SD15_VARIANT_LABELS = {"unet_fwd_bwd": "UNet fwd+bwd",
                       "unet_fwd_bwd_checkpointing": "UNet fwd+bwd, gradient checkpointing",
                       "train_step_on_tensors": "train step (fwd+bwd with checkpointing, clip, AdamW)",
                       "lora_train_step_fp16": "LoRA rank 4 train step, fp16 base (as the train step)",
                       "lora_train_step_fp32": "LoRA rank 4 train step, fp32 base (as the train step)"}


def _gb(mb):
    return f"{mb / 1024:.1f} GB"


def markdown_sd15(results):
    sd, peer = results["sd15"], results.get("peer")
    lines = [header(results), ""]
    lines += ["**SD-1.5 geometry, batch 1, random weights** (64x64 latents, 77x768 text; VAE at 512 px, "
              "CLIP-L)", ""]
    if "error" in sd:
        lines.append(sd["error"])
        return "\n".join(lines)
    peer_sd = (peer or {}).get("sd15", {})
    lines += ["| what | MindSpore | PyTorch | MindSpore / PyTorch |", "|---|---|---|---|"]
    for key, label in (("unet_forward", "UNet forward"), ("vae512_clip_encode", "VAE(512) + CLIP-L encode")):
        a = sd["times"][key]["median_s"]
        b = peer_sd.get("times", {}).get(key, {}).get("median_s")
        lines.append(f"| {label} | {fmt_s(a)} | {fmt_s(b) if b else '-'} | {a / b:.2f} |" if b else
                     f"| {label} | {fmt_s(a)} | - | - |")
    lines += ["", f"Training, each variant in a process of its own on both sides (MindSpore op by op: its compiled "
              f"step does not fit), {SD15_TRAIN_REPEATS} timed run after a warm-up. Activation memory: peak RSS - "
              "RSS after building the UNet and optimizer - gradients - the AdamW moments (train step only).", "",
              "| variant | time MindSpore / PyTorch | ratio | peak RSS MindSpore / PyTorch | activation memory "
              "MindSpore / PyTorch |", "|---|---|---|---|---|"]
    for variant, label in SD15_VARIANT_LABELS.items():
        m, p = sd.get("train", {}).get(variant, {}), peer_sd.get("train", {}).get(variant, {})
        if "times" not in m:
            lines.append(f"| {label} | {m.get('error', 'not run')} | | | |")
            continue
        a = m["times"][variant]["median_s"]
        if "times" not in p:  # the LoRA step, or a PyTorch run that failed
            lines.append(f"| {label} | {fmt_s(a)} / {p.get('error', '-')} | | {_gb(m['peak_rss_mb'])} / - | "
                         f"{_gb(m['activation_mb'])} / - |")
            continue
        b = p["times"][variant]["median_s"]
        lines.append(f"| {label} | {fmt_s(a)} / {fmt_s(b)} | {a / b:.2f} | {_gb(m['peak_rss_mb'])} / "
                     f"{_gb(p['peak_rss_mb'])} | {_gb(m['activation_mb'])} / {_gb(p['activation_mb'])} |")
    full = sd.get("train", {}).get("train_step_on_tensors", {})
    for variant in ("lora_train_step_fp16", "lora_train_step_fp32"):
        lora = sd.get("train", {}).get(variant, {})
        if "times" in full and "times" in lora:
            ratio = lora["times"][variant]["median_s"] / full["times"]["train_step_on_tensors"]["median_s"]
            lines += ["", f"{SD15_VARIANT_LABELS[variant].split(' (')[0]} / full train step, MindSpore: time "
                      f"{ratio:.2f}, peak RSS {lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}."]
    if "train_step" in peer_sd:
        lines += ["", f"PyTorch: {peer_sd['train_step']}."]
    if "loop" in sd:
        lines += ["", *markdown_sd15_loop(sd["loop"], full, peer_sd.get("loop", {}))]
    return "\n".join(lines)


def markdown_sd15_loop(loop, bare, peer) -> list:
    """t2i-train's SD-1.5 loop against the bare train step (train_step_on_tensors) and PyTorch's loop."""
    bare_s = bare["times"]["train_step_on_tensors"]["median_s"] if "times" in bare else None
    cells = [fmt_s(loop["loop_step_s"]), fmt_s(bare_s) if bare_s else "-",
             f"{loop['loop_step_s'] / bare_s:.2f}" if bare_s else "-"]
    if "loop_step_s" in peer:
        cells += [fmt_s(peer["loop_step_s"]), f"{loop['loop_step_s'] / peer['loop_step_s']:.2f}",
                  f"{_gb(loop['loop_peak_rss_mb'])} / {_gb(peer['peak_rss_mb'])}"]
    else:
        cells += [peer.get("error", "-"), "-", f"{_gb(loop['loop_peak_rss_mb'])} / -"]
    return [f"`t2i-train {' '.join(loop['flags'])}` as a user runs it ({loop['steps']} steps of batch 1; the median "
            f"step from its log, without the first {loop['warmup']}, the warm-up), against the bare train step above "
            "and a plain PyTorch diffusers loop with gradient checkpointing on the same folder:", "",
            "| t2i-train loop | bare step | loop / bare | PyTorch loop | loop / PyTorch loop | peak RSS t2i-train / "
            "PyTorch loop |", "|---|---|---|---|---|---|", "| " + " | ".join(cells) + " |"]


def write_results(results, name, table, started):
    results["load_end"] = loadavg()
    results["elapsed_s"] = time.time() - started
    (OUT / f"{name}.json").write_text(json.dumps(results, indent=2))
    (OUT / f"{name}.md").write_text(table(results) + "\n")
    print(table(results))
    log(f"wrote bench/{name}.json and bench/{name}.md in {results['elapsed_s'] / 60:.1f} min")
