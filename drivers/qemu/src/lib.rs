//! strata-qemu
