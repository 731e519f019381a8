"""What ties Rein to the rest of the stack, apart from the method itself (`rein_peft.tuners.rein`):

- `rollback`: PEFT's and transformers' adapter entry points leave the model as it was when a Rein load fails (only
  Rein's: every other method goes straight to PEFT);
- `auto_loading`: transformers' Auto classes, `pipeline` and PEFT's `AutoPeftModel*` build a Rein folder's base with
  the head's saved labels;
- `hub`: the model card of a Rein adapter (`save_pretrained`, `push_to_hub`, `Trainer.save_model`);
- `training`: the official optimizer recipes (`create_rein_optimizer`, SoMA's `create_soma_optimizer` and
  `PolyLRCosineWeightDecay`), for `Trainer` and plain loops;
- `sharding`: the adapter's full state dict from FSDP2 shards (accelerate, torchrun);
- `quantization`: torchao's filter for the frozen backbone's linear layers;
- `export`: `torch.export` and ONNX of a merged model.
"""
