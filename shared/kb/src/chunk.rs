//! Splitting a document into chunks that keep paragraphs and sections whole.
//!
//! A document is read as blocks (paragraphs, list items, code fences: text between blank
//! lines) under Markdown headings. A chunk gathers whole blocks up to `size` characters and
//! never crosses a heading, so each chunk belongs to one section and carries its heading
//! path. A block longer than `size` is cut at sentence ends, then at spaces. The next chunk
//! starts with up to `overlap` characters from the end of the previous one (whole sentences
//! when they fit), so a fact on a boundary is found from either side.

use serde::{Deserialize, Serialize};

/// How documents are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkOptions {
    /// Most characters in a chunk (before the overlap).
    pub size: usize,
    /// Characters repeated from the end of the previous chunk of the same section.
    pub overlap: usize,
}

impl Default for ChunkOptions {
    fn default() -> Self {
        ChunkOptions {
            size: 800,
            overlap: 100,
        }
    }
}

/// One chunk of a document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Its position in the document (0, 1, 2, ...).
    pub position: u32,
    /// The heading path it sits under (`Setup > Linux`), empty before the first heading.
    pub heading: String,
    /// Its text (with the overlap first).
    pub text: String,
}

/// A Markdown heading line: its level and title.
fn heading(line: &str) -> Option<(usize, &str)> {
    let t = line.trim_start();
    let level = t.chars().take_while(|c| *c == '#').count();
    if (1..=6).contains(&level) && t[level..].starts_with(' ') {
        Some((level, t[level..].trim()))
    } else {
        None
    }
}

/// Cuts `text` into pieces of at most `size` characters, at sentence ends where it can,
/// else at spaces, else anywhere.
fn split_long(text: &str, size: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while rest.chars().count() > size {
        let limit = rest.char_indices().nth(size).map_or(rest.len(), |(i, _)| i);
        let window = &rest[..limit];
        let cut = window
            .rfind(['.', '!', '?', '\n'])
            .map(|i| i + 1)
            .filter(|i| *i > limit / 3)
            .or_else(|| window.rfind(char::is_whitespace).filter(|i| *i > 0))
            .unwrap_or(limit);
        out.push(rest[..cut].trim().to_string());
        rest = rest[cut..].trim_start();
    }
    if !rest.is_empty() {
        out.push(rest.to_string());
    }
    out
}

/// The tail of `text` repeated at the start of the next chunk: whole sentences or words
/// within `overlap` characters.
fn tail(text: &str, overlap: usize) -> &str {
    if overlap == 0 {
        return "";
    }
    let n = text.chars().count();
    if n <= overlap {
        return text;
    }
    let start = text.char_indices().nth(n - overlap).map_or(0, |(i, _)| i);
    let window = &text[start..];
    // Begin after a sentence end if there is one, else after a space.
    let from = window
        .find(['.', '!', '?'])
        .map(|i| i + 1)
        .filter(|i| *i < window.len())
        .or_else(|| window.find(char::is_whitespace))
        .unwrap_or(0);
    window[from..].trim_start()
}

/// Cuts a document's text into chunks.
pub fn chunk(text: &str, opts: ChunkOptions) -> Vec<Chunk> {
    let size = opts.size.max(50);
    let overlap = opts.overlap.min(size / 2);
    // Sections: a heading path and the blocks under it.
    let mut sections: Vec<(String, Vec<String>)> = vec![(String::new(), Vec::new())];
    let mut path: Vec<(usize, String)> = Vec::new();
    let mut block = String::new();
    let flush = |block: &mut String, sections: &mut Vec<(String, Vec<String>)>| {
        let b = block.trim();
        if !b.is_empty()
            && let Some(last) = sections.last_mut()
        {
            last.1.push(b.to_string());
        }
        block.clear();
    };
    let mut in_fence = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
        }
        if !in_fence && let Some((level, title)) = heading(line) {
            flush(&mut block, &mut sections);
            path.retain(|(l, _)| *l < level);
            path.push((level, title.to_string()));
            let joined = path
                .iter()
                .map(|(_, t)| t.as_str())
                .collect::<Vec<_>>()
                .join(" > ");
            sections.push((joined, Vec::new()));
            continue;
        }
        if !in_fence && line.trim().is_empty() {
            flush(&mut block, &mut sections);
        } else {
            if !block.is_empty() {
                block.push('\n');
            }
            block.push_str(line);
        }
    }
    flush(&mut block, &mut sections);

    let mut out = Vec::new();
    for (heading, blocks) in sections {
        let mut pieces = Vec::new();
        for b in blocks {
            if b.chars().count() > size {
                pieces.extend(split_long(&b, size));
            } else {
                pieces.push(b);
            }
        }
        let mut current = String::new();
        let mut carried = 0usize;
        let emit = |current: &mut String, carried: &mut usize, out: &mut Vec<Chunk>| {
            if current.chars().count() > *carried {
                out.push(Chunk {
                    position: out.len() as u32,
                    heading: heading.clone(),
                    text: current.trim().to_string(),
                });
                let t = tail(current, overlap).to_string();
                *carried = t.chars().count();
                *current = t;
            }
        };
        for p in pieces {
            let len = current.chars().count();
            if len > carried && len + 2 + p.chars().count() > size + carried {
                emit(&mut current, &mut carried, &mut out);
            }
            if !current.is_empty() {
                current.push_str("\n\n");
            }
            current.push_str(&p);
        }
        emit(&mut current, &mut carried, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "# Office hours\n\nThe Tokyo office opens at 09:00 and closes at 18:00 local time.\n\nOn Saturdays it is closed.\n\n## Holidays\n\nIt closes for Golden Week.\n\n# Billing\n\nInvoices go out on the first of each month.\n";

    #[test]
    fn chunks_follow_sections_and_carry_their_heading() {
        let c = chunk(
            DOC,
            ChunkOptions {
                size: 200,
                overlap: 0,
            },
        );
        let got: Vec<(&str, &str)> = c
            .iter()
            .map(|c| (c.heading.as_str(), c.text.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "Office hours",
                    "The Tokyo office opens at 09:00 and closes at 18:00 local time.\n\nOn Saturdays it is closed."
                ),
                ("Office hours > Holidays", "It closes for Golden Week."),
                ("Billing", "Invoices go out on the first of each month."),
            ]
        );
        assert_eq!(
            c.iter().map(|c| c.position).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn paragraphs_stay_whole_and_long_ones_break_at_sentences_with_overlap() {
        let para = |n: usize| format!("Paragraph {n} says one thing. It says a second thing too.");
        let text = (0..6).map(para).collect::<Vec<_>>().join("\n\n");
        let c = chunk(
            &text,
            ChunkOptions {
                size: 130,
                overlap: 40,
            },
        );
        assert!(c.len() >= 3, "{c:#?}");
        for (i, ch) in c.iter().enumerate() {
            assert!(ch.text.chars().count() <= 130 + 40, "{ch:?}");
            if i > 0 {
                // The overlap: the start of each chunk ends the previous one.
                let prev = &c[i - 1].text;
                let first = ch.text.split("\n\n").next().unwrap();
                assert!(prev.ends_with(first), "{prev:?} / {first:?}");
            }
        }
        let long = "One sentence here. ".repeat(30);
        let c = chunk(
            &long,
            ChunkOptions {
                size: 100,
                overlap: 0,
            },
        );
        assert!(c.iter().all(|c| c.text.ends_with('.')), "{c:#?}");
        assert!(c.iter().all(|c| c.text.chars().count() <= 100));
    }

    #[test]
    fn code_fences_keep_their_hash_lines() {
        let text = "# Setup\n\n```sh\n# not a heading\nmake\n```\n";
        let c = chunk(text, ChunkOptions::default());
        assert_eq!(c.len(), 1);
        assert!(c[0].text.contains("# not a heading"));
        assert_eq!(c[0].heading, "Setup");
    }
}
