"""Synchronous SDXL backends, one file each, plus model resolution and the tiny-model builder."""
