"""cocon.vmm: QEMU for cocon's VMs - guest assets, the QEMU/QMP driver, the KVM probe.

Modules: `assets` (kernel + initramfs from Debian packages, cached by digest), `qemu` (command lines
for the microvm and q35 machines, a QEMU process with a QMP socket), `kvm` (the bounded KVM probe),
`errors` (VmmError and its subclasses). `guest/` holds what runs inside the guest. Import the
submodules directly; this package imports nothing on its own.
"""
