//! Command line (PROTOCOL §6): `sse-gateway [demo | --help | --version]`.
//!
//! Owns the arguments and the usage text only. Settings are environment variables, never flags:
//! the usage text renders [`crate::config::VARIABLES`], so `--help` cannot drift from what
//! [`crate::Config`] reads. `main` prints and exits; nothing here touches the process.

use std::ffi::OsString;
use std::fmt;

use crate::config::{
    ENV_HOST, ENV_INTERNAL_INSECURE, ENV_INTERNAL_PORT, ENV_INTERNAL_SECRET, VARIABLES,
};

/// What the command line asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// No argument: the gateway, configured by the environment.
    Serve,
    /// `demo`: the gateway with a built-in backend and a page at `/_demo/`.
    Demo,
    /// `--help` or `-h`, anywhere on the line.
    Help,
    /// `--version` or `-V`.
    Version,
}

/// An argument the gateway does not take (exit status 2).
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError {
    pub argument: String,
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown argument {:?}", self.argument)?;
        // `--port 8080` or `--PORT=8080`: say how settings are given instead.
        let name = self
            .argument
            .trim_start_matches('-')
            .split('=')
            .next()
            .unwrap_or_default()
            .replace('-', "_")
            .to_ascii_uppercase();
        if let Some(var) = VARIABLES.iter().find(|v| v.name == name) {
            write!(
                f,
                "; settings are environment variables: {}=<value> sse-gateway",
                var.name
            )?;
        }
        write!(f, "; see sse-gateway --help")
    }
}

impl std::error::Error for UsageError {}

/// Reads the arguments after the program name. `--help` wins over anything else on the line, then
/// `--version`; otherwise the line is empty or exactly `demo`, and the first other argument is the
/// error.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, UsageError> {
    let args: Vec<String> = args
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        return Ok(Command::Help);
    }
    if args.iter().any(|a| a == "--version" || a == "-V") {
        return Ok(Command::Version);
    }
    match args.as_slice() {
        [] => Ok(Command::Serve),
        [demo] if demo == "demo" => Ok(Command::Demo),
        [demo, extra, ..] if demo == "demo" => Err(UsageError {
            argument: extra.clone(),
        }),
        [other, ..] => Err(UsageError {
            argument: other.clone(),
        }),
    }
}

/// `sse-gateway <version>`.
pub fn version() -> String {
    format!("sse-gateway {}", env!("CARGO_PKG_VERSION"))
}

/// The `--help` text: commands, every variable with its default and meaning, exit statuses.
pub fn usage() -> String {
    let mut text = format!(
        "{}: a Server-Sent Events gateway sidecar for a stateless backend\n\
         \n\
         Usage:\n  \
         sse-gateway            serve; every setting comes from the environment variables below\n  \
         sse-gateway demo       serve with a built-in backend and a page at /_demo/\n                         \
         (demo defaults: HOST=127.0.0.1 PORT=3000 CALLBACK_URL=<the built-in backend>)\n  \
         sse-gateway --help     print this text (-h)\n  \
         sse-gateway --version  print the version (-V)\n\
         \n\
         Environment variables (a malformed value stops start-up with exit status 2):\n",
        version()
    );
    for v in VARIABLES {
        text.push_str(&format!(
            "  {} (default: {})\n      {}\n",
            v.name, v.default, v.meaning
        ));
    }
    text.push_str(&format!(
        "\n\
         Safe by default: with neither {ENV_INTERNAL_SECRET} nor {ENV_INTERNAL_PORT} set, /internal/* is\n\
         served on the public listener only when {ENV_HOST} is a loopback address or {ENV_INTERNAL_INSECURE}=1;\n\
         otherwise start-up stops with exit status 2.\n\
         \n\
         Exit status: 0 after a clean shutdown (SIGTERM/SIGINT) or --help/--version; 1 when a listener\n\
         cannot be bound; 2 on an unknown argument or a refused setting.\n"
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_strs(args: &[&str]) -> Result<Command, UsageError> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn commands() {
        assert_eq!(parse_strs(&[]), Ok(Command::Serve));
        assert_eq!(parse_strs(&["demo"]), Ok(Command::Demo));
        for help in [&["--help"][..], &["-h"], &["demo", "--help"], &["x", "-h"]] {
            assert_eq!(parse_strs(help), Ok(Command::Help), "{help:?}");
        }
        for version in [&["--version"][..], &["-V"], &["demo", "-V"]] {
            assert_eq!(parse_strs(version), Ok(Command::Version), "{version:?}");
        }
    }

    #[test]
    fn anything_else_is_named() {
        for (args, named) in [
            (&["demoo"][..], "demoo"),
            (&["--port", "8080"], "--port"),
            (&["demo", "extra"], "extra"),
            (&["-v"], "-v"),
            (&[""], ""),
        ] {
            let err = parse_strs(args).unwrap_err();
            assert_eq!(err.argument, named);
            let message = err.to_string();
            assert!(message.contains(&format!("{named:?}")), "{message}");
            assert!(message.contains("--help"), "{message}");
        }
    }

    #[test]
    fn a_flag_that_is_a_setting_points_at_its_variable() {
        for flag in ["--port", "--PORT=1", "--callback-url"] {
            let message = parse_strs(&[flag]).unwrap_err().to_string();
            assert!(message.contains("environment variables"), "{message}");
        }
        assert!(parse_strs(&["--port"])
            .unwrap_err()
            .to_string()
            .contains("PORT=<value> sse-gateway"));
        assert!(!parse_strs(&["demoo"])
            .unwrap_err()
            .to_string()
            .contains("environment variables"));
    }

    #[test]
    fn usage_lists_every_variable_with_its_default() {
        let text = usage();
        assert!(text.starts_with(&version()));
        for v in VARIABLES {
            assert!(
                text.contains(&format!("  {} (default: {})\n", v.name, v.default)),
                "{}",
                v.name
            );
            assert!(text.contains(v.meaning), "{}", v.name);
        }
    }
}
