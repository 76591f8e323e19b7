//! Text out of documents: plain text and Markdown as they are, HTML without its markup
//! (scripts and styles dropped, blocks kept as paragraphs, headings as Markdown headings,
//! common entities decoded), PDF through `pdf-extract` (lines joined into paragraphs).

use std::path::Path;

use crate::{Error, Result};

/// The text of a document, by its file extension.
pub fn text_of(path: &Path, bytes: &[u8]) -> Result<String> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let text = || {
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::Document(format!("{}: not UTF-8 text", path.display())))
    };
    match ext.as_str() {
        "txt" | "md" | "markdown" | "text" | "" => text(),
        "html" | "htm" => Ok(html_to_text(&text()?)),
        "pdf" => pdf_extract::extract_text_from_mem(bytes)
            .map(|t| tidy_pdf(&t))
            .map_err(|e| {
                Error::Document(format!(
                    "{}: its text cannot be read ({e}); a scanned PDF needs OCR first",
                    path.display()
                ))
            }),
        other => Err(Error::Document(format!(
            "{}: `.{other}` files are not read; give text, Markdown or HTML",
            path.display()
        ))),
    }
}

/// PDF text as paragraphs: lines joined, blank lines kept as paragraph breaks.
fn tidy_pdf(text: &str) -> String {
    let mut out = String::new();
    let mut blank = false;
    for line in text.lines().map(str::trim) {
        if line.is_empty() {
            blank = !out.is_empty();
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank { "\n\n" } else { " " });
        }
        blank = false;
        out.push_str(line);
    }
    out
}

/// HTML to text with paragraphs and Markdown headings.
pub fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len() / 2);
    let mut rest = html;
    let mut skip_until: Option<&'static str> = None;
    while let Some(lt) = rest.find('<') {
        if skip_until.is_none() {
            out.push_str(&decode_entities(&rest[..lt]));
        }
        let Some(gt) = rest[lt..].find('>') else {
            break;
        };
        let tag = rest[lt + 1..lt + gt].trim().to_ascii_lowercase();
        rest = &rest[lt + gt + 1..];
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        let closing = tag.starts_with('/');
        if let Some(end) = skip_until {
            if closing && name == end {
                skip_until = None;
            }
            continue;
        }
        match name.as_str() {
            "script" if !closing => skip_until = Some("script"),
            "style" if !closing => skip_until = Some("style"),
            "h1" | "h2" | "h3" | "h4" | "h5" | "h6" if !closing => {
                let level = name[1..].parse::<usize>().unwrap_or(1);
                out.push_str("\n\n");
                out.push_str(&"#".repeat(level));
                out.push(' ');
            }
            "p" | "div" | "section" | "article" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6"
            | "ul" | "ol" | "table" | "tr" | "pre" | "blockquote" => out.push_str("\n\n"),
            "li" if !closing => out.push_str("\n- "),
            "br" => out.push('\n'),
            "td" | "th" => out.push(' '),
            _ => {}
        }
    }
    if skip_until.is_none() {
        out.push_str(&decode_entities(rest));
    }
    // Tidy: trim lines and collapse runs of blank lines.
    let mut tidy = String::new();
    let mut blank = 0;
    for line in out.lines() {
        let l = line.split_whitespace().collect::<Vec<_>>().join(" ");
        if l.is_empty() {
            blank += 1;
            continue;
        }
        if !tidy.is_empty() {
            tidy.push_str(if blank > 0 { "\n\n" } else { "\n" });
        }
        blank = 0;
        tidy.push_str(&l);
    }
    tidy
}

fn decode_entities(s: &str) -> String {
    s.replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-page PDF with two lines of text in Helvetica, offsets computed.
    fn pdf(lines: &[&str]) -> Vec<u8> {
        let mut content = String::from("BT /F1 12 Tf 72 720 Td 14 TL\n");
        for l in lines {
            content.push_str(&format!("({l}) Tj T*\n"));
        }
        content.push_str("ET");
        let objects = [
            "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
            "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_string(),
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>".to_string(),
            format!("<< /Length {} >>\nstream\n{content}\nendstream", content.len()),
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>".to_string(),
        ];
        let mut out = b"%PDF-1.4\n".to_vec();
        let mut offsets = Vec::new();
        for (i, o) in objects.iter().enumerate() {
            offsets.push(out.len());
            out.extend_from_slice(format!("{} 0 obj\n{o}\nendobj\n", i + 1).as_bytes());
        }
        let xref = out.len();
        out.extend_from_slice(
            format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
        );
        for off in offsets {
            out.extend_from_slice(format!("{off:010} 00000 n \n").as_bytes());
        }
        out.extend_from_slice(
            format!(
                "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
                objects.len() + 1
            )
            .as_bytes(),
        );
        out
    }

    #[test]
    fn pdf_text_is_read() {
        let bytes = pdf(&["The Tokyo office opens at 09:00.", "It closes at 18:00."]);
        let text = text_of(Path::new("hours.pdf"), &bytes).unwrap();
        assert!(
            text.contains("The Tokyo office opens at 09:00."),
            "{text:?}"
        );
        assert!(text.contains("It closes at 18:00."), "{text:?}");
        let err = text_of(Path::new("broken.pdf"), b"%PDF-1.4 nothing").unwrap_err();
        assert!(err.to_string().contains("broken.pdf"), "{err}");
    }

    #[test]
    fn html_keeps_headings_and_paragraphs_and_drops_scripts() {
        let html = "<html><head><style>p{}</style><script>var x = '<p>';</script></head><body><h1>Office&nbsp;hours</h1><p>Opens at <b>09:00</b> &amp; closes at 18:00.</p><ul><li>Mon</li><li>Tue</li></ul></body></html>";
        assert_eq!(
            html_to_text(html),
            "# Office hours\n\nOpens at 09:00 & closes at 18:00.\n\n- Mon\n- Tue"
        );
    }
}
