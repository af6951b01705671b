# The devices of Vessel's QEMU build (configs/devices/x86_64-softmmu/vessel.mak
# in the QEMU tree; see scripts/build-qemu.sh): the microvm machine and the
# virtio-mmio devices a container VM uses, nothing else.
CONFIG_MICROVM=y
CONFIG_VIRTIO_BLK=y
CONFIG_VIRTIO_NET=y
CONFIG_VIRTIO_SERIAL=y
CONFIG_VIRTIO_RNG=y
CONFIG_VIRTIO_9P=y
