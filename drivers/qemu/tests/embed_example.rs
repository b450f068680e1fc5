//! `cargo test` builds `examples/embed.rs`; this runs it on a real image
//! chain to show a program can embed the driver on its own.

use std::process::Command;

fn qemu_img(args: &[&str]) {
    let st = Command::new("qemu-img").args(args).status().expect("qemu-img");
    assert!(st.success(), "qemu-img {args:?}");
}

#[test]
fn embed_example_defines_and_probes() {
    let exe = std::env::current_exe().expect("test path");
    let example = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("examples").join("embed"))
        .expect("target dir");
    assert!(example.exists(), "cargo test builds the example at {}", example.display());

    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let base = d.join("base.qcow2");
    let top = d.join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().expect("utf8"), "8M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top.to_str().expect("utf8")]);
    let xml = format!(
        "<domain type='qemu'><name>embedded</name><memory>65536</memory><os><type>hvm</type></os>\
         <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
        top.display()
    );
    std::fs::write(d.join("dom.xml"), xml).expect("write");
    let out = Command::new(&example).arg(d.join("state")).arg(d.join("dom.xml")).output().expect("run example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("vda[1] {} (qcow2)", base.display())), "{stdout}");
    assert!(stdout.contains("domain embedded is shut off"), "{stdout}");
    assert!(d.join("state/domains/embedded/domain.xml").exists());
}
