"""Errors of the `images` layer. Each message says what is wrong and what to do about it."""


class ImageError(Exception):
    """Base of every error raised by cocon.images."""


class LayerError(ImageError):
    """A layer could not be read, created or applied (corrupt, truncated, wrong digest, I/O error).

    When `apply_layer` raises it, the destination directory is left as it was.
    """


class UnsafeLayer(LayerError):
    """A layer tried to leave its root: an absolute or `..` path, a write through a symlink, a hard
    link to outside the layer. The layer is hostile or broken; do not use the image it came from."""
