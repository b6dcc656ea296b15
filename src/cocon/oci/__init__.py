"""Typed OCI data (image, runtime and distribution specs): parsing and validation, no side effects."""
