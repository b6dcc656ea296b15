"""One Driver protocol for instances, and its container, microvm and vm implementations."""
