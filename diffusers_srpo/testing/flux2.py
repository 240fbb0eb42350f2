"""Tiny, offline, seeded builder of the flux2 pipeline. Being written."""
