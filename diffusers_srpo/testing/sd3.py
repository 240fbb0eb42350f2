"""Tiny, offline, seeded builder of the sd3 pipeline. Being written."""
