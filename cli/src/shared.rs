//! What the command modules (`commands`, `blockjobs`, `snapshots`,
//! `pools`) share. It sits below all of them and uses none, so that every
//! module dependency in this crate points one way: from the clap root and
//! dispatch (`commands`) down to the subcommand modules, and from them down
//! to here.

use anyhow::{Context, Result};

/// A command that failed with a virsh-style message of its own, after
/// printing `output` (a partial report) on stdout. An empty message is a
/// failure virsh reports by its status alone.
#[derive(Debug)]
pub struct CommandFailure {
    pub message: String,
    pub output: String,
}

impl CommandFailure {
    pub fn new(message: String) -> CommandFailure {
        CommandFailure { message, output: String::new() }
    }
}

impl std::fmt::Display for CommandFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CommandFailure {}

/// An XML file a command reads (`define FILE`, `snapshot-create FILE`,
/// `blockcopy --xml FILE`), within the limits on XML documents.
pub(crate) fn read_document(file: &str) -> Result<String> {
    strata_core::xml::read_document(std::path::Path::new(file)).with_context(|| format!("Failed to open file '{file}'"))
}

/// `2026-11-23 17:50:22.877+0000`, as virsh prints event times (UTC).
pub(crate) fn format_timestamp(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let millis = us.rem_euclid(1_000_000) / 1000;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{millis:03}+0000", rem / 3600, (rem % 3600) / 60, rem % 60)
}

/// `bytes` in the largest binary unit that keeps the value at 1 or more,
/// as virsh scales sizes (`vshPrettyCapacity`).
pub(crate) fn binary_units(bytes: u64) -> (f64, &'static str) {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    (value, UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::format_timestamp;

    #[test]
    fn event_timestamps_read_like_virsh() {
        assert_eq!(format_timestamp(1_795_456_222_877_000), "2026-11-23 17:50:22.877+0000");
        assert_eq!(format_timestamp(0), "1970-01-01 00:00:00.000+0000");
        assert_eq!(format_timestamp(951_782_400_000_000), "2000-02-29 00:00:00.000+0000");
    }
}
