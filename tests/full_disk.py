"""train_grpo.py on a disk that fills up while checkpoint-000002 is written, failing as argv[1]
says: `torch` (torch.save's RuntimeError) or `safetensors` (the weights' SafetensorError)."""
import sys

import torch
import transformers.modeling_utils as hf
from safetensors import SafetensorError

import train_grpo as T

how = sys.argv.pop(1)
torch_save, safe_save_file = torch.save, hf.safe_save_file


def full_torch_save(obj, f, *args, **kwargs):
    if how == "torch" and "checkpoint-000002" in str(f):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4352 vs 4240")
    return torch_save(obj, f, *args, **kwargs)


def full_safe_save_file(tensors, filename, *args, **kwargs):
    if how == "safetensors" and "checkpoint-000002" in str(filename):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              'message: "No space left on device" })')
    return safe_save_file(tensors, filename, *args, **kwargs)


torch.save, hf.safe_save_file = full_torch_save, full_safe_save_file
T.main()
