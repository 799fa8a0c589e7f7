"""Patch encoders and streaming feature extraction."""
