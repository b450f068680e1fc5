//! A pool's volumes: what the files say (format, sizes, backing chain),
//! and creating, resizing and copying them with `qemu-img`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::VolumeRef;
use crate::chain::{probe_chain, StorageSource};
use crate::driver::{VolumeInfo, VolumeResizeFlags};
use crate::error::{Error, Result};
use crate::image::{self, ImageFormat};
use crate::tool::run_tool;
use crate::xml::{volume_element, Element};

/// libvirt's order of `<volume>` children.
const VOLUME_CHILD_ORDER: &[&str] =
    &["name", "key", "source", "capacity", "allocation", "physical", "target", "backingStore"];

/// A size with virsh's and libvirt's units: a number with an optional
/// suffix (`b`/`bytes`, `k`/`KiB`, `KB`, `M`/`MiB`, `MB`, … up to `E`),
/// binary unless it ends in `B` after the letter. `default_scale`
/// multiplies a number without one.
pub fn parse_scaled(text: &str, default_scale: u64) -> Result<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let bad = || {
        Error::invalid_arg(format!(
            "invalid size '{text}': expected a number with an optional unit such as 64M or 1GiB"
        ))
    };
    let number: u64 = digits.parse().map_err(|_| bad())?;
    let scale = match suffix {
        "" => default_scale,
        "b" | "B" | "byte" | "bytes" => 1,
        _ => {
            let mut chars = suffix.chars();
            let power = match chars.next().map(|c| c.to_ascii_lowercase()) {
                Some('k') => 1,
                Some('m') => 2,
                Some('g') => 3,
                Some('t') => 4,
                Some('p') => 5,
                Some('e') => 6,
                _ => return Err(bad()),
            };
            let base: u64 = match chars.as_str() {
                "" | "iB" | "ib" => 1024,
                "B" | "b" => 1000,
                _ => return Err(bad()),
            };
            base.pow(power)
        }
    };
    number.checked_mul(scale).ok_or_else(|| Error::invalid_arg(format!("size '{text}' is too large")))
}

/// A volume to create, from `<volume>` XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRequest {
    pub name: String,
    /// Bytes; `None` takes the backing image's size.
    pub capacity: Option<u64>,
    pub format: ImageFormat,
    /// The backing image and its format.
    pub backing: Option<(PathBuf, ImageFormat)>,
}

impl VolumeRequest {
    pub fn parse(xml: &str) -> Result<VolumeRequest> {
        let vol = Element::parse(xml)?;
        if vol.name != "volume" {
            return Err(Error::xml(format!("expected a <volume> document, found <{}>", vol.name)));
        }
        let name = vol.child_text("name").ok_or_else(|| Error::xml("the <volume> has no <name>"))?;
        crate::store::validate_name("volume", &name)?;
        let capacity = match vol.child("capacity") {
            None => None,
            Some(c) => Some(parse_scaled(&format!("{}{}", c.text().trim(), c.attr("unit").unwrap_or("")), 1)?),
        };
        let format_of = |el: Option<&Element>| {
            el.and_then(|e| e.child("format")).and_then(|f| f.attr("type")).map(str::parse::<ImageFormat>).transpose()
        };
        let format = format_of(vol.child("target"))?.unwrap_or(ImageFormat::Raw);
        let backing = match vol.child("backingStore") {
            None => None,
            Some(store) => {
                let path = PathBuf::from(
                    store
                        .child_text("path")
                        .ok_or_else(|| Error::xml("the volume <backingStore> has no <path>"))?
                        .trim(),
                );
                if !path.is_absolute() {
                    return Err(Error::invalid_arg(format!(
                        "backing store path '{}' of volume '{name}' is relative; give an absolute path",
                        path.display()
                    )));
                }
                let backing_format = match format_of(Some(store))? {
                    Some(f) => f,
                    None => image::detect_format(&path)?,
                };
                Some((path, backing_format))
            }
        };
        if backing.is_some() && !format.supports_backing() {
            return Err(Error::config_unsupported(format!(
                "volume '{name}' of format {format} cannot have a backing store (qcow2, qcow, qed and vmdk can)"
            )));
        }
        if capacity.is_none() && backing.is_none() {
            return Err(Error::xml(format!("volume '{name}' has no <capacity>")));
        }
        Ok(VolumeRequest { name, capacity, format, backing })
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| Error::invalid_arg(format!("path '{}' is not valid UTF-8", p.display())))
}

/// The format the file's header shows, and its virtual size.
fn format_and_capacity(path: &Path) -> Result<(ImageFormat, u64)> {
    let header = image::probe(path)?;
    Ok((header.format, header.virtual_size))
}

pub fn info(vol: &VolumeRef) -> Result<VolumeInfo> {
    let meta = std::fs::metadata(&vol.path).map_err(|e| Error::io("open", &vol.path, e))?;
    let (format, capacity) = format_and_capacity(&vol.path)?;
    Ok(VolumeInfo {
        name: vol.name.clone(),
        pool: vol.pool.clone(),
        path: vol.path.display().to_string(),
        volume_type: "file".to_string(),
        format: format.to_string(),
        capacity,
        allocation: meta.blocks().saturating_mul(512),
    })
}

/// `<volume>` with sizes and the whole chain below it.
pub fn xml(vol: &VolumeRef) -> Result<String> {
    let info = info(vol)?;
    let chain = probe_chain(&StorageSource::File { path: vol.path.clone() }, &info.format)
        .map_err(|e| e.context(format!("volume '{}'", vol.name)))?;
    let mut el = volume_element(&vol.name, &chain, info.capacity)?;
    el.insert_ordered(
        Element::new("allocation").with_attr("unit", "bytes").with_text(info.allocation.to_string()),
        VOLUME_CHILD_ORDER,
    );
    Ok(el.to_xml())
}

pub fn create(request: &VolumeRequest, path: &Path) -> Result<()> {
    let path_text = path_str(path)?;
    let mut args = vec!["create", "-q", "-f", request.format.as_str()];
    if let Some((backing, backing_format)) = &request.backing {
        args.extend(["-b", path_str(backing)?, "-F", backing_format.as_str()]);
    }
    args.push(path_text);
    let size = request.capacity.map(|c| c.to_string());
    if let Some(size) = &size {
        args.push(size);
    }
    run_tool("qemu-img", &args).map(|_| ())
}

pub fn resize(vol: &VolumeRef, bytes: u64, flags: VolumeResizeFlags) -> Result<u64> {
    let (format, current) = format_and_capacity(&vol.path)?;
    let wanted = if flags.delta {
        current.checked_add(bytes).ok_or_else(|| Error::invalid_arg("the new capacity is too large"))?
    } else {
        bytes
    };
    if wanted < current && !flags.shrink {
        return Err(Error::invalid_arg(format!(
            "can't shrink capacity of volume '{}' below its current capacity ({current} bytes) unless --shrink is given",
            vol.name
        )));
    }
    let size = wanted.to_string();
    let mut args = vec!["resize", "-q", "-f", format.as_str()];
    if wanted < current {
        args.push("--shrink");
    }
    args.extend([path_str(&vol.path)?, size.as_str()]);
    run_tool("qemu-img", &args)?;
    Ok(wanted)
}

/// Copies the volume's data (read through its backing chain) into a new
/// standalone image of the same format.
pub fn clone(vol: &VolumeRef, new_path: &Path) -> Result<()> {
    let (format, _) = format_and_capacity(&vol.path)?;
    let f = format.as_str();
    run_tool("qemu-img", &["convert", "-q", "-f", f, "-O", f, path_str(&vol.path)?, path_str(new_path)?]).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_virsh_reads_them() {
        assert_eq!(parse_scaled("512", 1).expect("plain"), 512);
        assert_eq!(parse_scaled("64M", 1).expect("M"), 64 << 20);
        assert_eq!(parse_scaled("1GiB", 1).expect("GiB"), 1 << 30);
        assert_eq!(parse_scaled("2KB", 1).expect("KB"), 2000);
        assert_eq!(parse_scaled("3bytes", 1).expect("bytes"), 3);
        assert_eq!(parse_scaled("2", 1024).expect("default"), 2048);
        for bad in ["", "G", "1X", "1GiBs", "-1", "99999999999E"] {
            assert!(parse_scaled(bad, 1).is_err(), "{bad}");
        }
    }

    #[test]
    fn volume_requests_name_what_is_wrong() {
        let ok = VolumeRequest::parse(
            "<volume><name>v</name><capacity unit='M'>8</capacity><target><format type='qcow2'/></target>\
             <backingStore><path>/b.raw</path><format type='raw'/></backingStore></volume>",
        )
        .expect("parse");
        assert_eq!(ok.capacity, Some(8 << 20));
        assert_eq!(ok.backing, Some((PathBuf::from("/b.raw"), ImageFormat::Raw)));
        let cases = [
            ("<volume><name>v</name></volume>", "no <capacity>"),
            ("<volume><name>a/b</name><capacity>1</capacity></volume>", "'a/b'"),
            ("<volume><name>v</name><capacity>1</capacity><target><format type='zip'/></target></volume>", "'zip'"),
            (
                "<volume><name>v</name><capacity>1</capacity><backingStore><path>/b</path><format type='raw'/>\
                 </backingStore></volume>",
                "format raw cannot have a backing store",
            ),
            (
                "<volume><name>v</name><target><format type='qcow2'/></target><backingStore><path>b</path>\
                 </backingStore></volume>",
                "relative",
            ),
        ];
        for (xml, words) in cases {
            let err = VolumeRequest::parse(xml).expect_err(xml);
            assert!(err.to_string().contains(words), "{xml}: {err}");
        }
    }
}
