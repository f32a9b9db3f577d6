"""`python -m bench`: the command line, and the order in which `make bench` runs the sections."""

import argparse
import time
from pathlib import Path

import bench
from bench import LOOP_RESOLUTION, OUT, PIPELINE_RESOLUTIONS, TINY_CONFIGS, WORK
from bench.inputs import prepare
from bench.loop import bench_loop
from bench.lora import bench_lora
from bench.machine import machine_facts
from bench.memory import bench_memory
from bench.peer import attach_peer, peer_main, peer_sd15_train
from bench.pipeline import bench_pipeline_ms
from bench.precompute import bench_precompute
from bench.report import markdown, markdown_sd15, write_results
from bench.sd15 import bench_sd15, sd15_worker
from bench.timing import loadavg, log
from bench.train_step import bench_train_step


def main_bench(args):
    from t2i.core import runtime

    WORK.mkdir(parents=True, exist_ok=True)
    runtime.setup("CPU")
    started = time.time()
    results = {"measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "load_start": loadavg(), "repeats": args.repeats,
               "machine": machine_facts()}
    log(f"machine: {results['machine']['nproc']} cores, MindSpore {results['machine']['mindspore']}")
    if args.sd15:
        log("SD-1.5 geometry (MindSpore)")
        results["repeats"] = args.sd15_repeats
        results["sd15"] = bench_sd15(args.sd15_repeats, WORK)
        attach_peer(results, OUT / "peer-sd15.json", args.sd15_repeats, True)
        write_results(results, "results-sd15", markdown_sd15, started)
        return
    model, data = prepare()
    results["precompute"], stores = [], {}
    for res in PIPELINE_RESOLUTIONS:
        log(f"precompute at {res} px")
        r, stores[res] = bench_precompute(model, data, res, args.precompute_repeats, WORK)
        r["load"] = loadavg()
        results["precompute"].append(r)
    results["train_step"] = []
    for res, batch in TINY_CONFIGS:
        log(f"train step at {res} px, batch {batch}")
        r = bench_train_step(model, stores[res], data, res, batch, args.repeats, WORK)
        r["load"] = loadavg()
        results["train_step"].append(r)
    log("pipeline call")
    results["pipeline"] = bench_pipeline_ms(model, args.repeats)
    log("peak RSS vs store size")
    results["memory"] = bench_memory(model, stores[32], WORK, args.rss_repeats)
    log("LoRA vs full UNet")
    results["lora"] = bench_lora(model, stores[32], WORK, args.rss_repeats)
    log("t2i-train end to end vs its bare step")
    results["loop"] = bench_loop(WORK, stores[LOOP_RESOLUTION], args.repeats)
    attach_peer(results, OUT / "peer.json", args.repeats, False)
    write_results(results, "results", markdown, started)


def cli(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=bench.__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (after one warm-up)")
    parser.add_argument("--precompute_repeats", type=int, default=3, help="precompute runs per resolution")
    parser.add_argument("--rss_repeats", type=int, default=2,
                        help="t2i-train runs per store in the memory section, and per variant in the LoRA one")
    parser.add_argument("--sd15", action="store_true",
                        help="instead, the SD-1.5 geometry (slow: see README); writes bench/results-sd15.*")
    parser.add_argument("--sd15_repeats", type=int, default=2,
                        help="timed runs per SD-1.5 figure (MindSpore train steps: 1)")
    parser.add_argument("--prepare", action="store_true", help="only build the tiny model the peer side loads")
    parser.add_argument("--peer", action="store_true", help="the PyTorch side; run with .venv-peer's python")
    parser.add_argument("--peer-out", default=None)
    parser.add_argument("--sd15-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sd15-variant", default="inference", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer and args.sd15 and args.sd15_variant != "inference":
        peer_sd15_train(args.sd15_variant, args.peer_out)
    elif args.peer:
        default_out = OUT / ("peer-sd15.json" if args.sd15 else "peer.json")
        peer_main(WORK, Path(args.peer_out or default_out), args.sd15_repeats if args.sd15 else args.repeats,
                  args.sd15)
    elif args.sd15_worker:
        sd15_worker(args.repeats, args.sd15_worker, args.sd15_variant)
    elif args.prepare:
        prepare()
    else:
        main_bench(args)


if __name__ == "__main__":
    cli()
