"""t2i: precompute -> train -> infer for Stable Diffusion on MindSpore."""

import os

# MindSpore logs every CPU kernel fallback at WARNING through glog; keep the console for t2i's own output.
os.environ.setdefault("GLOG_v", "3")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
