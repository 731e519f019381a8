def convert_official_checkpoint(*a, **k): raise NotImplementedError
