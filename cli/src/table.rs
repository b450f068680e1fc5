//! virsh's table layout: a header, a rule of dashes, and rows whose cells
//! start with a space and are padded to the column width plus two.

/// Formats `rows` under `header` as virsh does; `quiet` drops header and rule.
pub fn format_table(header: &[&str], rows: &[Vec<String>], quiet: bool) -> String {
    let columns = header.len();
    let mut widths: Vec<usize> = vec![0; columns];
    let mut measure = |cells: &[String]| {
        for (i, c) in cells.iter().enumerate().take(columns) {
            widths[i] = widths[i].max(c.chars().count());
        }
    };
    let header_cells: Vec<String> = header.iter().map(|s| s.to_string()).collect();
    if !quiet {
        measure(&header_cells);
    }
    for r in rows {
        measure(r);
    }
    let mut out = String::new();
    let row_line = |cells: &[String], out: &mut String| {
        for (i, c) in cells.iter().enumerate().take(columns) {
            out.push(' ');
            out.push_str(c);
            if i + 1 < columns {
                let pad = widths[i] - c.chars().count() + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
    };
    if !quiet {
        row_line(&header_cells, &mut out);
        let dashes: usize = widths.iter().map(|w| w + 3).sum();
        out.extend(std::iter::repeat_n('-', dashes));
        out.push('\n');
    }
    for r in rows {
        row_line(r, &mut out);
    }
    out
}

/// virsh's "Key:  value" listing (`dominfo`, `snapshot-info`): keys padded
/// to 16 columns, then a blank line.
pub fn format_fields(rows: &[(&str, String)]) -> String {
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{:<16}{v}\n", format!("{k}:")));
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_virsh_domblklist_layout() {
        let rows = vec![
            vec!["vda".to_string(), "./img/top.qcow2".to_string()],
            vec!["vdb".to_string(), "./img/data.raw".to_string()],
        ];
        let out = format_table(&["Target", "Source"], &rows, false);
        assert_eq!(
            out,
            " Target   Source\n---------------------------\n vda      ./img/top.qcow2\n vdb      ./img/data.raw\n"
        );
    }
}
