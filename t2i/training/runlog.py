"""The training log: a JSON-lines record of every step (what resume is checked against) and TensorBoard scalars."""

import json

import numpy as np


class Logger:
    """JSON-lines log of every step (the record resume is checked against) plus optional TensorBoard scalars."""

    def __init__(self, config, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        config.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = config.log_dir / "train_log.jsonl"
        kept = []
        if self.path.is_file():
            # Steps after the resume point were never checkpointed: they will be redone, so their lines go.
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        if config.report_to == "tensorboard":
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(config.log_dir))

    def log(self, step, **values):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if value is not None and np.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()
