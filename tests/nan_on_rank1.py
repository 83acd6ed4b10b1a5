"""train_grpo.py with a NaN loss on rank 1 at step 1: every rank must skip that update together."""
import math
import os

import train_grpo as T

original = T.grpo_loss
calls = {"n": 0}


def poisoned(*args, **kwargs):
    loss, stats = original(*args, **kwargs)
    calls["n"] += 1
    if os.environ.get("RANK") == "1" and calls["n"] == 1:
        loss = loss * math.nan
    return loss, stats


T.grpo_loss = poisoned
T.main()
