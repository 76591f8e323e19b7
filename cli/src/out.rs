//! Writing to standard output without panicking when the reader goes away
//! (`aob run get ID --json | head`): a closed pipe ends the process quietly, as SIGPIPE
//! would, with exit code 141.

use std::io::{ErrorKind, Write};

/// Writes `text` as is.
pub fn text(text: &str) {
    let mut out = std::io::stdout().lock();
    let res = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    if res.is_err_and(|e| e.kind() == ErrorKind::BrokenPipe) {
        std::process::exit(141);
    }
}

/// Writes `text` and a newline.
pub fn line(text: &str) {
    let mut s = String::with_capacity(text.len() + 1);
    s.push_str(text);
    s.push('\n');
    self::text(&s);
}

/// `println!` that survives a closed pipe.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::out::line(&format!($($arg)*))
    };
}
