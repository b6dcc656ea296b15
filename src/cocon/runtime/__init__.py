"""The Linux container runtime behind `cocon-runtime` (runtime-spec 1.x): see docs/runtime.md."""
