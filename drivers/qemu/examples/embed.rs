//! Embedding the QEMU driver in a program: no CLI, no registry, no daemon.
//!
//! ```text
//! cargo run -p strata-qemu --example embed -- STATE_DIR DOMAIN.xml
//! ```
//! Defines the domain in an embedded state root and prints each disk's
//! backing chain, as the driver probed it.

use std::path::PathBuf;

use strata_core::driver::{Connection, DefineFlags, DumpXmlFlags};
use strata_core::xml::Domain;
use strata_qemu::QemuConnection;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(root), Some(xml_file)) = (args.next(), args.next()) else {
        eprintln!("usage: embed STATE_DIR DOMAIN.xml");
        std::process::exit(2);
    };
    let root = std::path::absolute(PathBuf::from(root))?;
    let conn = QemuConnection::open_embedded(&root)?;
    let xml = std::fs::read_to_string(&xml_file)?;
    let outcome = conn.define_xml(&xml, DefineFlags::default()).await?;
    println!("defined {}", outcome.name);
    let dom = Domain::parse(&conn.dump_xml(&outcome.name, DumpXmlFlags::default()).await?)?;
    for disk in dom.disks()? {
        let Some(chain) = disk.chain else { continue };
        for layer in chain.main_line() {
            println!("{}[{}] {} ({})", disk.target, layer.index, layer.source, layer.format.as_deref().unwrap_or("?"));
        }
    }
    for d in conn.list_domains().await? {
        println!("domain {} is {}", d.name, d.state.as_virsh());
    }
    Ok(())
}
