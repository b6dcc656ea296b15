"""The node engine: composes images, snapshots, isolation and runtime (instances, volumes, builds)."""
