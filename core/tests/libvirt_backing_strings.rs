//! Every backing string libvirt's own test (`tests/virstoragetest.c`,
//! "Backing store parse") covers, with the `<source>` libvirt records for
//! it, plus the forms of libvirt's parser that test leaves out (default
//! ports of each protocol, transports, the rbd and nbd colon syntaxes).
//! Where QEMU opens something other than what libvirt records, Strata
//! follows QEMU; those cases are listed apart with the reason.

use std::path::Path;

use strata_core::chain::{parse_backing_string, Chain};
use strata_core::xml::{layer_source_element, Element};

/// The image whose header holds the backing string.
const IMAGE: &str = "/images/top.qcow2";

/// `(backing string, the <source> recorded, or None when it is refused)`,
/// in libvirt's test's order and with its expected XML.
const LIBVIRT_CASES: &[(&str, Option<&str>)] = &[
    // libvirt records "path" as given and resolves it against the image's
    // directory when it builds the chain (virStorageSourceNewFromChild).
    ("path", Some("<source file='/images/path'/>")),
    ("fat:/somedir", Some("<source dir='/somedir'/>")),
    ("://", None),
    ("http://example.com", Some("<source protocol='http' name=''><host name='example.com' port='80'/></source>")),
    ("http://example.com/", Some("<source protocol='http' name=''><host name='example.com' port='80'/></source>")),
    ("http://example.com/file", Some("<source protocol='http' name='file'><host name='example.com' port='80'/></source>")),
    (
        "http://user:pass@example.com/file",
        Some("<source protocol='http' name='file'><host name='example.com' port='80'/></source>"),
    ),
    ("rbd:testshare:id=asdf:mon_host=example.com", Some("<source protocol='rbd' name='testshare'><host name='example.com'/></source>")),
    ("nbd:example.org:6000:exportname=blah", Some("<source protocol='nbd' name='blah'><host name='example.org' port='6000'/></source>")),
    ("nbd:example.org:6000:exportname=:", Some("<source protocol='nbd' name=':'><host name='example.org' port='6000'/></source>")),
    ("nbd:example.org:6000:exportname=:test", Some("<source protocol='nbd' name=':test'><host name='example.org' port='6000'/></source>")),
    ("nbd:[::1]:6000:exportname=:test", Some("<source protocol='nbd' name=':test'><host name='::1' port='6000'/></source>")),
    ("nbd:127.0.0.1:6000:exportname=:test", Some("<source protocol='nbd' name=':test'><host name='127.0.0.1' port='6000'/></source>")),
    ("nbd:unix:/tmp/sock:exportname=/", Some("<source protocol='nbd' name='/'><host transport='unix' socket='/tmp/sock'/></source>")),
    ("nbd:unix:/tmp/sock:", Some("<source protocol='nbd'><host transport='unix' socket='/tmp/sock:'/></source>")),
    ("nbd:unix:/tmp/sock::exportname=:", Some("<source protocol='nbd' name=':'><host transport='unix' socket='/tmp/sock:'/></source>")),
    ("nbd://example.org:1234", Some("<source protocol='nbd'><host name='example.org' port='1234'/></source>")),
    ("nbd://example.org:1234/", Some("<source protocol='nbd'><host name='example.org' port='1234'/></source>")),
    ("nbd://example.org:1234/exportname", Some("<source protocol='nbd' name='exportname'><host name='example.org' port='1234'/></source>")),
    ("nbd+unix://?socket=/tmp/sock", Some("<source protocol='nbd'><host transport='unix' socket='/tmp/sock'/></source>")),
    ("nbd+unix:///?socket=/tmp/sock", Some("<source protocol='nbd'><host transport='unix' socket='/tmp/sock'/></source>")),
    ("nbd+unix:////?socket=/tmp/sock", Some("<source protocol='nbd' name='/'><host transport='unix' socket='/tmp/sock'/></source>")),
    ("nbd+unix:///exp?socket=/tmp/sock", Some("<source protocol='nbd' name='exp'><host transport='unix' socket='/tmp/sock'/></source>")),
    ("nbd+unix:////exp?socket=/tmp/sock", Some("<source protocol='nbd' name='/exp'><host transport='unix' socket='/tmp/sock'/></source>")),
    (
        "iscsi://testuser:testpass@example.org:1234/exportname",
        Some("<source protocol='iscsi' name='exportname'><host name='example.org' port='1234'/></source>"),
    ),
    ("json:", None),
    ("json:asdgsdfg", None),
    ("json:{}", None),
    (r#"json: { "file.driver":"blah"}"#, None),
    (r#"json:{"file.driver":"file"}"#, None),
    (r#"json:{"file.driver":"file", "file.filename":"/path/to/file"}"#, Some("<source file='/path/to/file'/>")),
    (r#"json:{"file.driver":"file", "filename":"/path/to/file"}"#, None),
    (r#"json:{"file" : { "driver":"file","filename":"/path/to/file"}}"#, Some("<source file='/path/to/file'/>")),
    (r#"json:{"driver":"file","filename":"/path/to/file"}"#, Some("<source file='/path/to/file'/>")),
    (r#"json:{"file.driver":"host_device", "file.filename":"/path/to/dev"}"#, Some("<source dev='/path/to/dev'/>")),
    (r#"json:{"file.driver":"host_cdrom", "file.filename":"/path/to/cdrom"}"#, Some("<source dev='/path/to/cdrom'/>")),
    (
        r#"json:{"file.driver":"http", "file.url":"http://example.com/file"}"#,
        Some("<source protocol='http' name='file'><host name='example.com' port='80'/></source>"),
    ),
    (
        r#"json:{"file":{ "driver":"http","url":"http://example.com/file"}}"#,
        Some("<source protocol='http' name='file'><host name='example.com' port='80'/></source>"),
    ),
    (r#"json:{"file.driver":"ftp", "file.url":"http://example.com/file"}"#, None),
    (
        r#"json:{"file.driver":"gluster", "file.filename":"gluster://example.com/vol/file"}"#,
        Some("<source protocol='gluster' name='vol/file'><host name='example.com' port='24007'/></source>"),
    ),
    (
        r#"json:{"file":{"driver":"gluster","volume":"testvol","path":"img.qcow2","server":[ { "type":"tcp","host":"example.com","port":"1234"},{ "type":"unix","socket":"/path/socket"},{ "type":"tcp","host":"example.com"}]}}"#,
        Some(
            "<source protocol='gluster' name='testvol/img.qcow2'><host name='example.com' port='1234'/>\
             <host transport='unix' socket='/path/socket'/><host name='example.com' port='24007'/></source>",
        ),
    ),
    (
        r#"json:{"file.driver":"gluster","file.volume":"testvol","file.path":"img.qcow2","file.server":[ { "type":"tcp","host":"example.com","port":"1234"},{ "type":"unix","socket":"/path/socket"},{ "type":"inet","host":"example.com"}]}"#,
        Some(
            "<source protocol='gluster' name='testvol/img.qcow2'><host name='example.com' port='1234'/>\
             <host transport='unix' socket='/path/socket'/><host name='example.com' port='24007'/></source>",
        ),
    ),
    (
        r#"json:{"driver": "raw","file": {"server.0.host": "A.A.A.A","server.1.host": "B.B.B.B","server.2.host": "C.C.C.C","driver": "gluster","path": "raw","server.0.type": "tcp","server.1.type": "tcp","server.2.type": "tcp","server.0.port": "24007","server.1.port": "24007","server.2.port": "24007","volume": "vol1"}}"#,
        Some(
            "<source protocol='gluster' name='vol1/raw'><host name='A.A.A.A' port='24007'/>\
             <host name='B.B.B.B' port='24007'/><host name='C.C.C.C' port='24007'/></source>",
        ),
    ),
    (r#"json:{"file":{"driver":"nbd","path":"/path/to/socket"}}"#, Some("<source protocol='nbd'><host transport='unix' socket='/path/to/socket'/></source>")),
    (r#"json:{"driver":"nbd","path":"/path/to/socket"}"#, Some("<source protocol='nbd'><host transport='unix' socket='/path/to/socket'/></source>")),
    (r#"json:{"file.driver":"nbd","file.path":"/path/to/socket"}"#, Some("<source protocol='nbd'><host transport='unix' socket='/path/to/socket'/></source>")),
    (
        r#"json:{"file":{"driver":"nbd","export":"blah","host":"example.org","port":"6000"}}"#,
        Some("<source protocol='nbd' name='blah'><host name='example.org' port='6000'/></source>"),
    ),
    (
        r#"json:{"file.driver":"nbd","file.export":"blah","file.host":"example.org","file.port":"6000"}"#,
        Some("<source protocol='nbd' name='blah'><host name='example.org' port='6000'/></source>"),
    ),
    (
        r#"json:{"file":{"driver":"nbd","export":"blah","server": { "type":"inet","host":"example.org","port":"6000"}}}"#,
        Some("<source protocol='nbd' name='blah'><host name='example.org' port='6000'/></source>"),
    ),
    (
        r#"json:{"file":{"driver":"nbd","server": { "type":"unix","path":"/path/socket"}}}"#,
        Some("<source protocol='nbd'><host transport='unix' socket='/path/socket'/></source>"),
    ),
    (
        r#"json:{"file":{"driver":"ssh","host":"example.org","port":"6000","path":"blah","user":"user"}}"#,
        Some("<source protocol='ssh' name='blah'><host name='example.org' port='6000'/></source>"),
    ),
    (
        r#"json:{"file.driver":"ssh","file.host":"example.org","file.port":"6000","file.path":"blah","file.user":"user"}"#,
        Some("<source protocol='ssh' name='blah'><host name='example.org' port='6000'/></source>"),
    ),
    (
        r#"json:{"file":{"driver":"ssh","path":"blah","server":{ "host":"example.org","port":"6000"},"user":"user"}}"#,
        Some("<source protocol='ssh' name='blah'><host name='example.org' port='6000'/></source>"),
    ),
    (
        r#"json:{"file.driver":"rbd","file.filename":"rbd:testshare:id=asdf:mon_host=example.com"}"#,
        Some("<source protocol='rbd' name='testshare'><host name='example.com'/></source>"),
    ),
    (
        r#"json:{"file":{"driver":"rbd","image":"test","pool":"libvirt","conf":"/path/to/conf","snapshot":"snapshotname","server":[ {"host":"example.com","port":"1234"},{"host":"example2.com"}]}}"#,
        Some(
            "<source protocol='rbd' name='libvirt/test'><host name='example.com' port='1234'/>\
             <host name='example2.com'/><snapshot name='snapshotname'/><config file='/path/to/conf'/></source>",
        ),
    ),
    (r#"json:{ "file": { "driver": "raw","file": {"driver": "file","filename": "/path/to/file" } } }"#, Some("<source file='/path/to/file'/>")),
    (
        r#"json:{"file":{"driver":"iscsi","transport":"tcp","portal":"test.org","target":"iqn.2016-12.com.virttest:emulated-iscsi-noauth.target"}}"#,
        Some(
            "<source protocol='iscsi' name='iqn.2016-12.com.virttest:emulated-iscsi-noauth.target/0'>\
             <host name='test.org' port='3260'/></source>",
        ),
    ),
    (
        r#"json:{"file":{"driver":"iscsi","transport":"tcp","portal":"test.org","user":"testuser","target":"iqn.2016-12.com.virttest:emulated-iscsi-auth.target"}}"#,
        Some(
            "<source protocol='iscsi' name='iqn.2016-12.com.virttest:emulated-iscsi-auth.target/0'>\
             <host name='test.org' port='3260'/></source>",
        ),
    ),
    (
        r#"json:{"file":{"driver":"iscsi","transport":"tcp","portal":"test.org","password":"testpass","target":"iqn.2016-12.com.virttest:emulated-iscsi-auth.target"}}"#,
        Some(
            "<source protocol='iscsi' name='iqn.2016-12.com.virttest:emulated-iscsi-auth.target/0'>\
             <host name='test.org' port='3260'/></source>",
        ),
    ),
    (
        r#"json:{"file":{"driver":"iscsi","transport":"tcp","portal":"test.org:1234","target":"iqn.2016-12.com.virttest:emulated-iscsi-noauth.target","lun":"6"}}"#,
        Some(
            "<source protocol='iscsi' name='iqn.2016-12.com.virttest:emulated-iscsi-noauth.target/6'>\
             <host name='test.org' port='1234'/></source>",
        ),
    ),
    (
        r#"json:{"file":{"driver":"iscsi","transport":"tcp","portal":"[2001::0]:1234","target":"iqn.2016-12.com.virttest:emulated-iscsi-noauth.target","lun":6}}"#,
        Some(
            "<source protocol='iscsi' name='iqn.2016-12.com.virttest:emulated-iscsi-noauth.target/6'>\
             <host name='[2001::0]' port='1234'/></source>",
        ),
    ),
    (
        r#"json:{"file":{"driver":"iscsi","transport":"tcp","portal":"[2001::0]","target":"iqn.2016-12.com.virttest:emulated-iscsi-noauth.target","lun":6}}"#,
        Some(
            "<source protocol='iscsi' name='iqn.2016-12.com.virttest:emulated-iscsi-noauth.target/6'>\
             <host name='[2001::0]' port='3260'/></source>",
        ),
    ),
    (
        r#"json:{"file":{"driver":"sheepdog","vdi":"test","server":{ "type":"inet","host":"example.com","port":"321"}}}"#,
        Some("<source protocol='sheepdog' name='test'><host name='example.com' port='321'/></source>"),
    ),
    (
        r#"json:{"driver": "raw","file": {"server.host": "10.10.10.10","server.port": "7000","tag": "","driver": "sheepdog","server.type": "inet","vdi": "Alice"}}"#,
        Some("<source protocol='sheepdog' name='Alice'><host name='10.10.10.10' port='7000'/></source>"),
    ),
    (
        r#"json:{"file":{"driver":"vxhs","vdisk-id":"c6718f6b-0401-441d-a8c3-1f0064d75ee0","server": {  "host":"example.com","port":"9999"}}}"#,
        Some("<source protocol='vxhs' name='c6718f6b-0401-441d-a8c3-1f0064d75ee0'><host name='example.com' port='9999'/></source>"),
    ),
    (
        r#"json:{"file":{"driver":"nfs","user":2,"group":9,"path":"/foo/bar/baz","server": {  "host":"example.com","type":"inet"}}}"#,
        Some("<source protocol='nfs' name='/foo/bar/baz'><host name='example.com'/><identity user='+2' group='+9'/></source>"),
    ),
    (
        r#"json:{ "driver": "raw","offset": 10752,"size": 4063232,"file": { "driver": "file","filename": "/tmp/testfle"}}"#,
        Some("<source file='/tmp/testfle'><slices><slice type='storage' offset='10752' size='4063232'/></slices></source>"),
    ),
    (
        r#"json:{ "file.cookie": "vmware_soap_session=\"0c8db85112873a79b7ef74f294cb70ef7f\"","file.sslverify": false,"file.driver": "https","file.url": "https://host/folder/esx6.5-rhel7.7-x86%5f64/esx6.5-rhel7.7-x86%5f64-flat.vmdk?dcPath=data&dsName=esx6.5-matrix","file.timeout": 2000}"#,
        Some(
            "<source protocol='https' name='folder/esx6.5-rhel7.7-x86_64/esx6.5-rhel7.7-x86_64-flat.vmdk' \
             query='dcPath=data&amp;dsName=esx6.5-matrix'><host name='host' port='443'/><ssl verify='no'/>\
             <cookies><cookie name='vmware_soap_session'>&quot;0c8db85112873a79b7ef74f294cb70ef7f&quot;</cookie></cookies>\
             <timeout seconds='2000'/></source>",
        ),
    ),
    (
        r#"json:{ "file.cookie": "vmware_soap_session=\"0c8db85112873a79b7ef74f294cb70ef7f\"","file.sslverify": "off","file.driver": "https","file.url": "https://host/folder/esx6.5-rhel7.7-x86%5f64/esx6.5-rhel7.7-x86%5f64-flat.vmdk?dcPath=data&dsName=esx6.5-matrix","file.timeout": 2000}"#,
        Some(
            "<source protocol='https' name='folder/esx6.5-rhel7.7-x86_64/esx6.5-rhel7.7-x86_64-flat.vmdk' \
             query='dcPath=data&amp;dsName=esx6.5-matrix'><host name='host' port='443'/><ssl verify='no'/>\
             <cookies><cookie name='vmware_soap_session'>&quot;0c8db85112873a79b7ef74f294cb70ef7f&quot;</cookie></cookies>\
             <timeout seconds='2000'/></source>",
        ),
    ),
    (
        r#"json:{"file":{"driver": "nvme","device": "0000:01:00.0","namespace": 1}}"#,
        Some("<source type='pci' namespace='1'><address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source>"),
    ),
];

/// Forms libvirt's parser reads that its test leaves out, with what the
/// parser records for them: each protocol's default port
/// (`virStorageSourceNetworkDefaultPort`), transports, snapshots, escapes.
const PARSER_CASES: &[(&str, Option<&str>)] = &[
    ("https://example.com/a%20b.img", Some("<source protocol='https' name='a b.img'><host name='example.com' port='443'/></source>")),
    ("http://example.com/x.img?a=1&b=2", Some("<source protocol='http' name='x.img' query='a=1&amp;b=2'><host name='example.com' port='80'/></source>")),
    ("ftp://example.com/x.img", Some("<source protocol='ftp' name='x.img'><host name='example.com' port='21'/></source>")),
    ("ftps://example.com/x.img", Some("<source protocol='ftps' name='x.img'><host name='example.com' port='990'/></source>")),
    ("tftp://example.com/x.img", Some("<source protocol='tftp' name='x.img'><host name='example.com' port='69'/></source>")),
    ("nbd://example.org/exp", Some("<source protocol='nbd' name='exp'><host name='example.org' port='10809'/></source>")),
    ("nbd+tcp://[::1]/exp", Some("<source protocol='nbd' name='exp'><host name='::1' port='10809'/></source>")),
    ("gluster://example.org/vol/dir/img.qcow2", Some("<source protocol='gluster' name='vol/dir/img.qcow2'><host name='example.org' port='24007'/></source>")),
    ("gluster+tcp://example.org:1234/vol/img", Some("<source protocol='gluster' name='vol/img'><host name='example.org' port='1234'/></source>")),
    ("gluster+unix:///vol/img?socket=/run/glusterd.sock", Some("<source protocol='gluster' name='vol/img'><host transport='unix' socket='/run/glusterd.sock'/></source>")),
    ("gluster+rdma://example.org/vol/img", Some("<source protocol='gluster' name='vol/img'><host transport='rdma' name='example.org'/></source>")),
    ("gluster://example.org/vol", None),
    ("iscsi://example.org/iqn.2016-12.com.example:t/1", Some("<source protocol='iscsi' name='iqn.2016-12.com.example:t/1'><host name='example.org' port='3260'/></source>")),
    ("ssh://user@example.org/img.qcow2", Some("<source protocol='ssh' name='img.qcow2'><host name='example.org' port='22'/></source>")),
    ("sheepdog://example.org/vdi", Some("<source protocol='sheepdog' name='vdi'><host name='example.org' port='7000'/></source>")),
    ("vxhs://example.org/c6718f6b", Some("<source protocol='vxhs' name='c6718f6b'><host name='example.org' port='9999'/></source>")),
    ("nfs://example.org/export/img.qcow2", Some("<source protocol='nfs' name='export/img.qcow2'><host name='example.org'/></source>")),
    ("rbd://example.org/pool/img", Some("<source protocol='rbd' name='pool/img'><host name='example.org'/></source>")),
    (
        "rbd:pool/img@snap:conf=/etc/ceph/c.conf:mon_host=10.0.0.1\\:6789\\;[\\:\\:1]\\:6790\\,mon3",
        Some(
            "<source protocol='rbd' name='pool/img'><host name='10.0.0.1' port='6789'/><host name='::1' port='6790'/>\
             <host name='mon3'/><snapshot name='snap'/><config file='/etc/ceph/c.conf'/></source>",
        ),
    ),
    ("nbd:unix:", None),
    ("nbd::6000", None),
    ("nbd:example.org", None),
    ("nbd:example.org:port", None),
    ("weird://example.org/x", None),
    ("nbd+carrier-pigeon://example.org/x", None),
    ("nbd+unix:///exp", None),
    (
        r#"json:{"file":{"driver":"nbd","server":{"type":"inet","host":"example.org"}}}"#,
        Some("<source protocol='nbd'><host name='example.org' port='10809'/></source>"),
    ),
    (r#"json:{"file":{"driver":"iscsi","portal":"test.org","target":"t"}}"#, None),
    (r#"json:{"file":{"driver":"nfs","path":"/p","server":{"host":"h"}}}"#, None),
    (r#"json:{"file":{"driver":"nvme","device":"0000:01:00.0","namespace":0}}"#, None),
    (r#"json:{"driver":"raw","file":{"driver":"raw","file":{"driver":"file","filename":"/x"}}}"#, None),
];

/// Where QEMU opens something other than what libvirt records, Strata
/// records what QEMU opens, or refuses.
const QEMU_WINS: &[(&str, Option<&str>, &str)] = &[
    // libvirt: "invalid backing protocol 'file'"; QEMU opens /x/base.qcow2.
    ("file:/x/base.qcow2", Some("<source file='/x/base.qcow2'/>"), "QEMU's file: prefix"),
    // libvirt records 'rel.qcow2' relative; QEMU opens it from its working directory.
    (r#"json:{"driver":"file","filename":"rel.qcow2"}"#, None, "a relative json: filename"),
    // libvirt: no parser for driver 'qcow2'; QEMU opens /x/b.qcow2 as qcow2.
    (
        r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"/x/b.qcow2"}}"#,
        Some("<source file='/x/b.qcow2'/>"),
        "a json: format driver other than raw",
    ),
    // libvirt records dir 'floppy:/d'; QEMU opens a floppy-sized FAT of /d.
    ("fat:floppy:/d", None, "vvfat options"),
];

fn recorded(backing: &str) -> Option<String> {
    let parsed = parse_backing_string(backing, Path::new(IMAGE)).ok()?;
    let mut chain = Chain::single(parsed.source, parsed.format);
    chain.layers[0].slice = parsed.slice;
    Some(layer_source_element(&chain.layers[0]).to_xml())
}

fn check(cases: &[(&str, Option<&str>)]) {
    let mut wrong = Vec::new();
    for (backing, expected) in cases {
        let expected = expected.map(|xml| Element::parse(xml).unwrap_or_else(|e| panic!("{xml}: {e}")).to_xml());
        let got = recorded(backing);
        if got != expected {
            wrong.push(format!("{backing}\n  expected {expected:?}\n  got      {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{} of {} backing strings differ:\n{}", wrong.len(), cases.len(), wrong.join("\n"));
}

#[test]
fn every_backing_string_in_libvirts_test_records_libvirts_source() {
    check(LIBVIRT_CASES);
}

#[test]
fn the_forms_of_libvirts_parser_its_test_leaves_out_record_what_the_parser_records() {
    check(PARSER_CASES);
}

#[test]
fn where_qemu_and_libvirt_differ_strata_records_what_qemu_opens_or_refuses() {
    let cases: Vec<(&str, Option<&str>)> = QEMU_WINS.iter().map(|(b, x, _)| (*b, *x)).collect();
    check(&cases);
}

#[test]
fn a_backing_string_that_gives_the_format_records_it() {
    let format = |backing: &str| parse_backing_string(backing, Path::new(IMAGE)).expect(backing).format;
    assert_eq!(format("fat:/somedir").as_deref(), Some("fat"));
    assert_eq!(
        format(r#"json:{"driver":"raw","offset":512,"file":{"driver":"file","filename":"/x"}}"#).as_deref(),
        Some("raw")
    );
    assert_eq!(format(r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"/x"}}"#).as_deref(), Some("qcow2"));
    assert_eq!(format("/x/base.qcow2"), None);
}
