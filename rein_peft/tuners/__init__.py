"""The adapters rein_peft adds to PEFT, one package per method as PEFT keeps its own tuners (`tuners/rein`)."""
