"""train_grpo.py under `torchrun --max-restarts 1` where rank 1 dies by SIGKILL (nothing can be
saved) in step 4 of the first attempt only, after checkpoint-000002 was saved and rank 0 logged
step 3: torchrun relaunches the same command line, which must continue from checkpoint-000002."""
import os
import signal

import train_grpo as T

original = T.grpo_loss
calls = {"n": 0}


def killed(*args, **kwargs):
    calls["n"] += 1
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
    if os.environ.get("RANK") == "1" and first_attempt and calls["n"] == 7:  # step 4's first micro-step
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)


T.grpo_loss = killed
T.main()
