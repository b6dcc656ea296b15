"""Images: references, manifests, import/export, layer application, builds, and base images."""
