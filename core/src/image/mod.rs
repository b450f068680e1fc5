//! Image header probing (native Rust, no qemu-img at run time).
//!
//! OWNED BY THE IMAGE-PROBING HELPER: see the API contract below.
