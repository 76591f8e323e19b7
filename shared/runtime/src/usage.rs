//! `--help` and `--version` for the binaries, which take no arguments otherwise: they are
//! configured by the environment. Answered before anything connects anywhere.

/// What a binary prints for `--help`.
#[derive(Debug, Clone, Copy)]
pub struct Usage<'a> {
    /// Binary name (`aob-engine`).
    pub name: &'a str,
    /// One paragraph on what it does.
    pub about: &'a str,
    /// Environment variables it reads: name and meaning (with default).
    pub vars: &'a [(&'a str, &'a str)],
}

/// The variables every component reads.
pub const COMMON_VARS: [(&str, &str); 7] = [
    (
        "NATS_URL",
        "NATS server URL (default nats://127.0.0.1:4222; tls://host:port for TLS; user:password@ for a user)",
    ),
    (
        "AOB_NATS_CA",
        "a PEM file of the CA that signed the NATS server's certificate (default: the system's roots)",
    ),
    (
        "AOB_NATS_CERT",
        "a PEM file of this client's certificate, for a server that verifies clients (with AOB_NATS_KEY)",
    ),
    (
        "AOB_NATS_KEY",
        "the PEM file of that certificate's private key",
    ),
    (
        "AOB_PAYLOAD_URL",
        "object store for large payloads: file:///dir, s3://bucket/prefix, ... (default file://<cwd>/.aob/payloads)",
    ),
    (
        "AOB_OFFLOAD_THRESHOLD",
        "values larger than this many bytes travel by reference (default 262144)",
    ),
    ("RUST_LOG", "log filter (default info)"),
];

/// What the arguments ask for.
#[derive(Debug, PartialEq, Eq)]
pub enum Asked {
    /// Run the component.
    Run,
    /// Print this text and exit successfully.
    Print(String),
    /// Print this error and exit with status 2.
    Refuse(String),
}

impl Usage<'_> {
    /// The `--help` text.
    pub fn text(&self) -> String {
        let mut vars: Vec<(&str, &str)> = self.vars.to_vec();
        vars.extend(COMMON_VARS);
        let width = vars.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
        let mut out = format!(
            "{}\n\nUsage: {} [--help | --version]\n\nConfigured by the environment:\n",
            self.about, self.name
        );
        for (name, meaning) in vars {
            out.push_str(&format!("  {name:<width$}  {meaning}\n"));
        }
        out
    }

    /// What `args` (without the program name) ask for.
    pub fn asked(&self, args: &[String]) -> Asked {
        match args {
            [] => Asked::Run,
            [a] if a == "--help" || a == "-h" => Asked::Print(self.text()),
            [a] if a == "--version" || a == "-V" => {
                Asked::Print(format!("{} {}\n", self.name, env!("CARGO_PKG_VERSION")))
            }
            other => Asked::Refuse(format!(
                "{}: unexpected argument `{}`; it is configured by the environment (see `{} --help`)",
                self.name,
                other.join(" "),
                self.name
            )),
        }
    }

    /// Answers `--help` and `--version` from the process's arguments and exits; returns
    /// only when the component should run.
    pub fn handle_args(&self) {
        let args: Vec<String> = std::env::args().skip(1).collect();
        match self.asked(&args) {
            Asked::Run => {}
            Asked::Print(text) => {
                print!("{text}");
                std::process::exit(0);
            }
            Asked::Refuse(e) => {
                eprintln!("{e}");
                std::process::exit(2);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: Usage<'static> = Usage {
        name: "aob-x",
        about: "Does x.",
        vars: &[("AOB_X", "how much x (default 1)")],
    };

    #[test]
    fn help_lists_every_variable_and_arguments_are_refused() {
        let Asked::Print(help) = U.asked(&["--help".into()]) else {
            panic!("no help")
        };
        assert!(
            help.contains("AOB_X") && help.contains("NATS_URL"),
            "{help}"
        );
        assert_eq!(U.asked(&[]), Asked::Run);
        assert!(matches!(U.asked(&["--nats".into()]), Asked::Refuse(e) if e.contains("--nats")));
        assert!(matches!(U.asked(&["-V".into()]), Asked::Print(v) if v.starts_with("aob-x ")));
    }
}
