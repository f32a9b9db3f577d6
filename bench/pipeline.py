"""Section 4, MindSpore side: the DDIM pipeline call the PyTorch side (peer.py) is compared with."""

from bench import DDIM_STEPS, PIPELINE_RESOLUTIONS, PROMPT
from bench.timing import interleaved, paired_ratio, summary, timed


def bench_pipeline_ms(model, repeats):
    """The pipeline call op by op (PyNative), and with t2i-infer --jit's compiled UNet (compile time apart)."""
    from mindone import diffusers

    from t2i.interop import models

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(model))
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for res in PIPELINE_RESOLUTIONS:
        def call(_):
            pipe(PROMPT, num_inference_steps=DDIM_STEPS, height=res, width=res, output_type="np")

        def call_jit(_):
            with models.compiled(pipe.unet):
                call(_)

        compile_s = timed(lambda: call_jit(0)) - timed(lambda: call_jit(0))
        runs = interleaved({"pipeline": call, "pipeline_jit": call_jit}, repeats)
        out.append({"resolution": res, "ddim_steps": DDIM_STEPS, "times": summary(runs),
                    "jit_compile_s": compile_s,
                    "ratio pipeline / pipeline_jit": paired_ratio(runs["pipeline"], runs["pipeline_jit"])})
    return out
