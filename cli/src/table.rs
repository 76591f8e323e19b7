//! Plain text tables: left-aligned columns two spaces apart.

/// Renders rows under a header; the last column is not padded.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let cols = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(cols) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate().take(cols) {
            if i + 1 < cols {
                text.push_str(cell);
                text.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
            } else {
                text.push_str(cell);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let t = render(
            &["ID", "STATUS", "NOTE"],
            &[
                vec!["a".into(), "COMPLETED".into(), "".into()],
                vec!["long_id".into(), "FAILED".into(), "boom".into()],
            ],
        );
        assert_eq!(
            t,
            "ID       STATUS     NOTE\na        COMPLETED\nlong_id  FAILED     boom\n"
        );
    }
}
