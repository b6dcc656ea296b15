"""Files that run inside cocon's guests. `init` is the initramfs' /init (a busybox sh script)."""
