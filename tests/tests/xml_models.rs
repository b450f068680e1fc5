//! The XML models on their own: every document Strata formats validates
//! against libvirt's schemas, and what Strata does not model is kept.

mod common;

use common::{make_chain, validate_xml, NVME_DISK, VHOSTUSER_DISK};
use strata_core::chain::{probe_chain, Backing, Slice, StorageSource};
use strata_core::xml::{chain_from_volume, volume_element, Domain, Element, SnapshotDef};

const SNAPSHOT: &str = r#"<domainsnapshot>
  <name>s1</name>
  <description>before upgrade</description>
  <state>disk-snapshot</state>
  <parent><name>s0</name></parent>
  <creationTime>1700000000</creationTime>
  <memory snapshot='no'/>
  <disks>
    <disk name='vda' snapshot='external' type='file'>
      <driver type='qcow2'/>
      <source file='/images/vda.s1.qcow2'/>
    </disk>
    <disk name='vdb' snapshot='no'/>
  </disks>
  <domain type='kvm'>
    <name>vm1</name>
    <uuid>d46bfc90-fe8d-41ad-955e-77c5e81b849e</uuid>
    <memory unit='KiB'>131072</memory>
    <os><type arch='x86_64'>hvm</type></os>
    <devices><graphics type='vnc' port='-1'/></devices>
  </domain>
</domainsnapshot>"#;

#[test]
fn snapshot_xml_round_trips_and_validates() {
    let def = SnapshotDef::parse(SNAPSHOT).expect("parse");
    assert_eq!(def.name.as_deref(), Some("s1"));
    assert_eq!(def.parent.as_deref(), Some("s0"));
    assert_eq!(def.creation_time, Some(1_700_000_000));
    assert_eq!(def.disks.len(), 2);
    assert_eq!(def.disks[0].snapshot.as_deref(), Some("external"));
    assert_eq!(def.disks[0].source, Some(StorageSource::File { path: "/images/vda.s1.qcow2".into() }));
    let out = def.to_xml();
    validate_xml(&out);
    assert!(out.contains("<graphics type='vnc' port='-1'/>"), "embedded domain kept:\n{out}");
    assert_eq!(SnapshotDef::parse(&out).expect("reparse"), def);

    let bad = SNAPSHOT.replace("snapshot='external'", "snapshot='sideways'");
    let err = SnapshotDef::parse(&bad).expect_err("bad mode");
    assert!(err.to_string().contains("sideways"), "{err}");
}

#[test]
fn volume_shows_the_whole_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let chain = make_chain(dir.path(), &["a.qcow2", "b.qcow2", "c.qcow2"]);
    let top = StorageSource::File { path: chain[2].clone() };
    let probed = probe_chain(&top, "qcow2").expect("probe");
    let vol = volume_element("c.qcow2", &probed, 64 << 20).expect("volume");
    let xml = vol.to_xml();
    validate_xml(&xml);
    assert_eq!(xml.matches("<backingStore>").count(), 2, "{xml}");
    let back = chain_from_volume(&Element::parse(&xml).expect("parse")).expect("chain");
    let paths: Vec<String> = back.main_line().iter().map(|l| l.source.to_string()).collect();
    let expected: Vec<String> = chain.iter().rev().map(|p| p.display().to_string()).collect();
    assert_eq!(paths, expected);
}

#[test]
fn every_disk_type_and_a_mirror_round_trip() {
    let xml = &format!(
        r#"<domain type='kvm'>
  <name>types</name>
  <memory>65536</memory>
  <os><type>hvm</type></os>
  <devices>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/sdz'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source protocol='gluster' name='vol1/img2'>
        <host name='red'/>
      </source>
      <backingStore type='network' index='1'>
        <format type='qcow2'/>
        <source protocol='nbd' name='exp'>
          <host transport='unix' socket='/run/nbd.sock'/>
        </source>
      </backingStore>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source pool='pool1' volume='img1'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/images/src.qcow2'/>
      <backingStore/>
      <mirror type='file' job='copy' ready='yes'>
        <format type='qcow2'/>
        <source file='/images/copy.qcow2'/>
        <backingStore/>
      </mirror>
      <target dev='vdd' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='dir' device='disk'>
      <driver name='qemu' type='fat'/>
      <source dir='/images/share'/>
      <backingStore/>
      <target dev='vde' bus='virtio'/>
    </disk>
{NVME_DISK}{VHOSTUSER_DISK}    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='https' name='folder/disk.img' query='a=1&amp;b=2'>
        <host name='example.com' port='443'/>
        <ssl verify='no'/>
        <cookies>
          <cookie name='session'>"abc"</cookie>
        </cookies>
        <readahead size='65536'/>
        <timeout seconds='20'/>
      </source>
      <backingStore type='network' index='1'>
        <format type='raw'/>
        <source protocol='rbd' name='pool/img'>
          <host name='mon1' port='6789'/>
          <host name='mon2'/>
          <snapshot name='snap'/>
          <config file='/etc/ceph/ceph.conf'/>
        </source>
        <backingStore type='file' index='2'>
          <format type='raw'/>
          <source file='/images/data.raw'>
            <slices>
              <slice type='storage' offset='512' size='1048064'/>
            </slices>
          </source>
          <backingStore/>
        </backingStore>
      </backingStore>
      <target dev='vdh' bus='virtio'/>
    </disk>
  </devices>
</domain>
"#
    );
    let dom = Domain::parse(xml).expect("parse");
    let disks = dom.disks().expect("disks");
    assert_eq!(disks.len(), 9);
    let vdb = disks[1].chain.as_ref().expect("network chain");
    assert_eq!(vdb.layers[1].source.type_name(), "network");
    assert_eq!(vdb.layers[1].backing, Backing::Unknown, "no terminator: unknown below");
    let mirror = disks[3].mirror.as_ref().expect("mirror");
    assert_eq!((mirror.job.as_deref(), mirror.ready.as_deref()), (Some("copy"), Some("yes")));
    assert!(disks[4].chain.is_none() && disks[4].readonly, "empty cdrom");
    let types: Vec<&str> = disks.iter().filter_map(|d| d.source()).map(StorageSource::type_name).collect();
    assert_eq!(types, ["block", "network", "volume", "file", "dir", "nvme", "vhostuser", "network"]);
    let vdh = disks[8].chain.as_ref().expect("network chain");
    assert_eq!(vdh.layers[2].slice, Some(Slice { offset: 512, size: Some(1_048_064) }));

    // Rewriting every chain keeps the document valid and otherwise equal.
    let mut rewritten = dom.clone();
    for d in &disks {
        if let Some(c) = &d.chain {
            rewritten.set_disk_chain(&d.target, c).expect("set chain");
        }
    }
    assert_eq!(rewritten.to_xml(), dom.to_xml());
    validate_xml(&rewritten.to_xml());
}
