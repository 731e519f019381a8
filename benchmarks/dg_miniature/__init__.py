"""Domain generalization in miniature (`benchmarks/domain_generalization.py` is its command line), one part a module:

- `world`: street scenes whose layouts can be drawn in any visual style (the source, six unseen targets, random ones);
- `foundations`: the backbone pretrained without labels (VICReg across styles), cached by a hash of its recipe;
- `task`: what is trained on and measured (the miniature's splits, or the user's datasets);
- `methods`: the compared methods, the segmenters they train in and the training loop;
- `evaluation`: mIoU, the feature similarity behind Rein's premise, the premise's gate, mean and spread over seeds;
- `benchmark`: the run (the premise first, then every method and seed);
- `report`: the tables, the chart, the pictures and the JSON.
"""
