//! `sdk/include/strata_driver.h` is what cbindgen makes of this crate:
//! regenerated here and compared byte for byte, so the checked-in header
//! cannot drift from the Rust definitions. `STRATA_BLESS_HEADER=1`
//! rewrites it instead.

use std::path::Path;

#[test]
fn the_checked_in_header_is_the_generated_one() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml reads");
    let bindings =
        cbindgen::Builder::new().with_crate(crate_dir).with_config(config).generate().expect("the header generates");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let header = crate_dir.join("../include/strata_driver.h");
    if std::env::var_os("STRATA_BLESS_HEADER").is_some() {
        std::fs::write(&header, &generated).expect("the header is written");
    }
    let checked_in = std::fs::read(&header).expect("sdk/include/strata_driver.h reads");
    assert!(
        checked_in == generated,
        "sdk/include/strata_driver.h differs from what cbindgen generates from sdk/abi; run \
         STRATA_BLESS_HEADER=1 cargo test -p strata-plugin-abi --test header and commit it. Generated:\n{}",
        String::from_utf8_lossy(&generated)
    );
}
