//! Text out of documents: plain text and Markdown as they are, HTML without its markup
//! (scripts and styles dropped, blocks kept as paragraphs, headings as Markdown headings,
//! common entities decoded).

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
        "pdf" => Err(Error::Document(format!(
            "{}: PDF is not read yet; convert it to text first (for example `pdftotext`)",
            path.display()
        ))),
        other => Err(Error::Document(format!(
            "{}: `.{other}` files are not read; give text, Markdown or HTML",
            path.display()
        ))),
    }
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

    #[test]
    fn html_keeps_headings_and_paragraphs_and_drops_scripts() {
        let html = "<html><head><style>p{}</style><script>var x = '<p>';</script></head><body><h1>Office&nbsp;hours</h1><p>Opens at <b>09:00</b> &amp; closes at 18:00.</p><ul><li>Mon</li><li>Tue</li></ul></body></html>";
        assert_eq!(
            html_to_text(html),
            "# Office hours\n\nOpens at 09:00 & closes at 18:00.\n\n- Mon\n- Tue"
        );
    }
}
