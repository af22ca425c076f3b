"""Child process of the kill -9 tests: saves a model to a path over and over (or crashes mid-commit).

    python ckpt_child.py loop PATH     # print "ready" after the first save, then save forever
    python ckpt_child.py crash PATH    # no RENAME_EXCHANGE; die (os._exit) between the two renames
"""

import os
import sys

import torch
from torch import nn


def build(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)])


def main(mode: str, path: str) -> None:
    from brainsurgeon.export import checkpoint, folder

    torch.set_num_threads(1)
    model = build(1)
    if mode == "crash":
        real, calls = os.replace, []

        def replace(a, b):
            calls.append(a)
            if len(calls) == 2:
                os._exit(9)  # the old checkpoint is in .old-*, the new one complete in .tmp-*
            real(a, b)

        folder._exchange = lambda a, b: False
        folder.os.replace = replace
        checkpoint.save(model, path)
        return
    checkpoint.save(model, path)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    i = 0
    while True:
        i += 1
        with torch.no_grad():
            model[0].bias.fill_(i)
        checkpoint.save(model, path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
