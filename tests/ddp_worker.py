"""Runs the classification example under torchrun / accelerate launch and saves each rank's adapter weights."""

import os
import sys

import torch
from transformers import TrainerCallback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from train_image_classification import main  # noqa: E402


class SaveRankWeights(TrainerCallback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, args, state, control, model=None, **kwargs):
        weights = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
        torch.save(weights, os.path.join(self.folder, f"rank{args.process_index}.pt"))


if __name__ == "__main__":
    weights_folder, *example_args = sys.argv[1:]
    main(example_args, callbacks=[SaveRankWeights(weights_folder)])
