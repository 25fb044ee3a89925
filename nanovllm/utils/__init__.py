"""Helpers that are not part of the engine proper (file formats, default model)."""
