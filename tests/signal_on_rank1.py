"""train_grpo.py where SIGTERM reaches rank 1 alone ($SIGNAL_RANK when set), during step 2 (as
when a scheduler signals one node): every rank must stop after step 2, save it, and link no
`final` model."""
import os
import signal

import train_grpo as T

original = T.grpo_loss
calls = {"n": 0}


def signalled(*args, **kwargs):
    calls["n"] += 1
    if os.environ.get("RANK") == os.environ.get("SIGNAL_RANK", "1") and calls["n"] == 3:  # step 2's first micro-step
        os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)


T.grpo_loss = signalled
T.main()
