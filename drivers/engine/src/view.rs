//! An engine viewed over a driver it borrows: the driver hands out its
//! public traits (`SnapshotOps`, `BlockJobOps`) as the engine over itself,
//! without keeping an engine beside it.

/// An engine type that is a `repr(transparent)` wrapper of its one field,
/// of type `Inner`.
///
/// # Safety
/// The implementing type must be `#[repr(transparent)]` with exactly one
/// field, of type `Inner`, so that a reference to an `Inner` is a valid
/// reference to it.
pub unsafe trait TransparentOver {
    type Inner;
}

/// The engine over a value borrowed for as long as the view.
pub fn over<E: TransparentOver>(inner: &E::Inner) -> &E {
    let engine = (inner as *const E::Inner).cast::<E>();
    // SAFETY: TransparentOver promises that E is repr(transparent) over its
    // one field of type E::Inner, so it has that type's layout and validity;
    // the returned reference keeps the borrow's lifetime.
    unsafe { &*engine }
}
