"""Each artefact on disk as a read/write pair that owns its names and validates what it reads."""
