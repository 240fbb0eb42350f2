"""Tiny, offline, seeded builder of the qwen_image pipeline. Being written."""
