//! The command line and start-up decisions, black-box (PROTOCOL §6 command line, §9 safe by
//! default): the real binary's arguments, exit statuses and messages. Every gateway that starts
//! listens on 127.0.0.1; the decisions that would need another address are checked without any
//! listener (an address this machine does not have, or the refusal itself) and, in full, by the
//! unit tests in `src/config.rs`.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::http::request;
use common::{Backend, Gateway, SOON};
use serde_json::json;

const EXIT_WITHIN: Duration = Duration::from_secs(10);

/// Runs the binary with `args` and an environment of `env` only, to completion.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("running sse-gateway")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("UTF-8 output")
}

/// Every variable the gateway reads: the `pub const ENV_*` values in `src/config.rs`, read from the
/// source so that a new one cannot be left out of `--help` or README.md.
fn variables() -> Vec<&'static str> {
    let names: Vec<&str> = include_str!("../src/config.rs")
        .lines()
        .filter_map(|l| l.strip_prefix("pub const ENV_"))
        .filter_map(|l| l.split('"').nth(1))
        .collect();
    assert!(names.len() >= 20, "{names:?}");
    names
}

#[test]
fn help_lists_every_variable_with_its_default_and_exits_0() {
    for flag in ["--help", "-h"] {
        let out = run(&[flag], &[]);
        assert_eq!(out.status.code(), Some(0), "{flag}");
        let help = text(&out.stdout);
        assert!(out.stderr.is_empty(), "{flag}: {}", text(&out.stderr));
        assert!(help.contains("sse-gateway demo"), "{help}");
        assert!(help.contains("--version"), "{help}");
        for var in variables() {
            assert!(
                help.contains(&format!("  {var} (default: ")),
                "{flag} does not list {var}:\n{help}"
            );
        }
        // A few defaults and meanings, as PROTOCOL §6 and §9 give them.
        for line in [
            "PORT (default: 3000)",
            "HOST (default: 0.0.0.0)",
            "CALLBACK_URL (default: unset)",
            "MAX_HEADER_BYTES (default: 16384)",
            "INTERNAL_INSECURE (default: 0)",
        ] {
            assert!(help.contains(line), "{line}");
        }
        assert!(help.contains("loopback"), "the safe default is explained");
    }
}

#[test]
fn readme_configuration_table_has_every_variable() {
    let readme = include_str!("../README.md");
    for var in variables() {
        assert!(
            readme
                .lines()
                .any(|l| l.starts_with(&format!("| `{var}` | "))),
            "README.md's configuration table has no row for {var}"
        );
    }
}

#[test]
fn version_prints_name_and_version_and_exits_0() {
    for flag in ["--version", "-V"] {
        let out = run(&[flag], &[]);
        assert_eq!(out.status.code(), Some(0), "{flag}");
        assert_eq!(
            text(&out.stdout),
            format!("sse-gateway {}\n", env!("CARGO_PKG_VERSION"))
        );
        assert!(out.stderr.is_empty());
    }
}

#[test]
fn an_unknown_argument_exits_2_naming_it() {
    for (args, named) in [
        (&["demoo"][..], "demoo"),
        (&["--port", "8080"], "--port"),
        (&["demo", "now"], "now"),
        (&["serve"], "serve"),
    ] {
        // A loopback HOST, so that only the argument can be the reason.
        let out = run(args, &[("HOST", "127.0.0.1"), ("PORT", "0")]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("\"{named}\"")),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains("--help"), "{stderr}");
        assert!(!stderr.contains("listener on"), "{stderr}");
        assert!(out.stdout.is_empty());
    }
    let stderr = text(&run(&["--port"], &[]).stderr);
    assert!(stderr.contains("PORT=<value> sse-gateway"), "{stderr}");
}

#[tokio::test]
async fn the_defaults_alone_refuse_to_serve_internal_routes_to_every_machine() {
    // HOST unset (0.0.0.0), and 0.0.0.0 said outright: refused before any listener exists.
    for host in [None, Some("0.0.0.0"), Some("::")] {
        let mut b = Gateway::builder().unset("HOST");
        if let Some(host) = host {
            b = b.env("HOST", host);
        }
        let (code, lines) = b.run_to_exit(EXIT_WITHIN).await;
        let all = lines.join("\n");
        assert_eq!(code, Some(2), "HOST={host:?}: {all}");
        for fix in [
            "INTERNAL_SECRET",
            "INTERNAL_PORT",
            "HOST=127.0.0.1",
            "INTERNAL_INSECURE=1",
        ] {
            assert!(all.contains(fix), "HOST={host:?}: {fix} not named in {all}");
        }
        assert!(!all.contains("listener on"), "{all}");
    }
    // INTERNAL_INSECURE=0 is the default said outright: still refused.
    let (code, _) = Gateway::builder()
        .unset("HOST")
        .env("INTERNAL_INSECURE", "0")
        .run_to_exit(EXIT_WITHIN)
        .await;
    assert_eq!(code, Some(2));
}

#[tokio::test]
async fn internal_insecure_or_a_secret_or_an_internal_port_let_a_public_host_through() {
    // 203.0.113.1 (TEST-NET-3) is no address of this machine: once the configuration is accepted,
    // the bind fails (exit 1, naming the address), so nothing ever listens beyond loopback. Without
    // one of the three, the configuration itself is refused (exit 2).
    let public = "203.0.113.1";
    let (code, lines) = Gateway::builder()
        .env("HOST", public)
        .run_to_exit(EXIT_WITHIN)
        .await;
    assert_eq!(code, Some(2), "{lines:?}");
    for (var, value) in [
        ("INTERNAL_INSECURE", "1"),
        ("INTERNAL_SECRET", "s3cret"),
        ("INTERNAL_PORT", "0"),
    ] {
        let (code, lines) = Gateway::builder()
            .env("HOST", public)
            .env(var, value)
            .run_to_exit(EXIT_WITHIN)
            .await;
        let all = lines.join("\n");
        assert_eq!(code, Some(1), "{var}={value}: {all}");
        assert!(
            all.contains(&format!("cannot listen on {public}:0 (HOST, PORT)")),
            "{var}={value}: {all}"
        );
    }
}

#[tokio::test]
async fn a_loopback_host_serves_internal_routes_without_a_secret() {
    for host in ["127.0.0.1", "127.0.0.2"] {
        let gw = Gateway::builder().env("HOST", host).spawn().await;
        assert_eq!(gw.addr.ip().to_string(), host);
        request(
            gw.addr,
            "POST",
            "/internal/send",
            &[],
            Some(br#"{"token":"nobody"}"#),
        )
        .await
        .assert_json(404, json!({"error": "Token not found"}));
    }
}

#[tokio::test]
async fn a_port_in_use_names_the_address_and_its_variables() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();

    let (code, lines) = Gateway::builder()
        .env("PORT", &port)
        .run_to_exit(EXIT_WITHIN)
        .await;
    let all = lines.join("\n");
    assert_eq!(code, Some(1), "{all}");
    assert!(
        all.contains(&format!(
            "cannot listen on 127.0.0.1:{port} (HOST, PORT): Address already in use"
        )),
        "{all}"
    );

    let (code, lines) = Gateway::builder()
        .env("INTERNAL_PORT", &port)
        .run_to_exit(EXIT_WITHIN)
        .await;
    let all = lines.join("\n");
    assert_eq!(code, Some(1), "{all}");
    assert!(
        all.contains(&format!(
            "cannot listen on 127.0.0.1:{port} (INTERNAL_HOST, INTERNAL_PORT): Address already in use"
        )),
        "{all}"
    );
    drop(taken);
}

#[tokio::test]
async fn an_https_callback_url_is_refused_saying_what_to_do() {
    let (code, lines) = Gateway::builder()
        .env("CALLBACK_URL", "https://backend.example/sse-callback")
        .run_to_exit(EXIT_WITHIN)
        .await;
    let all = lines.join("\n");
    assert_eq!(code, Some(2), "{all}");
    for needed in [
        "CALLBACK_URL",
        "https:// is not supported",
        "http://",
        "TLS-terminating proxy",
    ] {
        assert!(all.contains(needed), "{needed} in {all}");
    }
    assert!(!all.contains("listener on"), "{all}");
}

#[tokio::test]
async fn without_callback_url_a_warning_says_streams_get_503() {
    let gw = Gateway::builder().spawn().await;
    let warning = gw
        .logs
        .wait_for(|l| l.contains("[WARN]") && l.contains("CALLBACK_URL"), SOON)
        .await
        .expect("a start-up warning about CALLBACK_URL");
    assert!(warning.contains("503"), "{warning}");
    // The wire body stays exactly the spec's.
    common::http::open_stream(gw.addr, "/x")
        .await
        .err()
        .expect("no stream")
        .assert_json(503, json!({"error": "Service not configured"}));

    let backend = Backend::start().await;
    let gw = Gateway::start(&backend).await;
    gw.logs.wait_for(|l| l.contains("settings:"), SOON).await;
    assert!(
        !gw.logs.lines().iter().any(|l| l.contains("[WARN]")),
        "{:?}",
        gw.logs.lines()
    );
}

#[tokio::test]
async fn the_bearer_scheme_is_matched_in_any_case() {
    let mut backend = Backend::start().await;
    let gw = Gateway::builder()
        .callback(&backend)
        .env("INTERNAL_SECRET", "s3cret")
        .spawn()
        .await;
    let (mut stream, token) = gw.open(&mut backend, "/bearer").await;
    for (n, auth) in ["Bearer s3cret", "bearer s3cret", "BEARER s3cret"]
        .into_iter()
        .enumerate()
    {
        let body =
            serde_json::to_vec(&json!({"token": token, "event": {"data": n.to_string()}})).unwrap();
        request(
            gw.addr,
            "POST",
            "/internal/send",
            &[("Authorization", auth.as_bytes())],
            Some(&body),
        )
        .await
        .assert_json(200, json!({"status": "ok"}));
        assert_eq!(stream.next_event(SOON).await.data, n.to_string(), "{auth}");
    }
    // The secret itself is compared exactly.
    request(
        gw.addr,
        "POST",
        "/internal/send",
        &[("Authorization", b"bearer S3CRET")],
        Some(br#"{"token":"x"}"#),
    )
    .await
    .assert_json(401, json!({"error": "Unauthorized"}));
}
