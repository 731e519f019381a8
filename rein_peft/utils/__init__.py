"""Helpers the integrations and the official system share: optional extras (`extras`), PEFT's deprecation warnings
(`compat`), and the old spellings of renamed functions (`deprecation`)."""
