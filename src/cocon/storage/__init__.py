"""Storage for instances: named volumes (directories), later qcow2 disks for VMs. See docs/volumes.md."""
