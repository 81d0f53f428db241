//! Failing to start, as a user meets it: the real binary against a throwaway cluster, each failure named once
//! with the server's message, its SQLSTATE and the fix, and never a password. `check-config` refuses what
//! `run` refuses, and `check-config --connect` finds what `run` would run into. Logs carry no colour codes
//! when they go to a pipe.

use std::process::Command;

use crate::support::*;
use walhook::cluster::{Auth, ClusterOptions, WalLevel};

const SUPERUSER_PASSWORD: &str = "s3cret-superuser";
const WRONG_PASSWORD: &str = "wr0ng-guess";
const LACKING_PASSWORD: &str = "lacking-pw-9";

/// Runs the real binary to completion with `env` (plus `RUST_LOG=warn`): (success, stdout, stderr).
fn walhook(args: &[&str], env: &[(String, String)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_walhook"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
        .output()
        .expect("run walhook");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `pg.env()` with `url` as the database and `more` on top.
fn env_for(pg: &Pg, url: &str, more: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = pg.env();
    env.retain(|(k, _)| k != "WALHOOK_DATABASE_URL" && !more.iter().any(|(m, _)| m == k));
    env.push(("WALHOOK_DATABASE_URL".into(), url.into()));
    env.extend(more.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

#[track_caller]
fn assert_once(text: &str, needle: &str) {
    assert_eq!(
        text.matches(needle).count(),
        1,
        "{needle:?} must appear exactly once in:\n{text}"
    );
}

#[track_caller]
fn assert_no_secret(text: &str) {
    for secret in [SUPERUSER_PASSWORD, WRONG_PASSWORD, LACKING_PASSWORD] {
        assert!(!text.contains(secret), "a password leaked:\n{text}");
    }
}

/// Every command that starts by connecting.
const COMMANDS: &[&[&str]] = &[
    &["run"],
    &["migrate"],
    &["status"],
    &["recover-slot"],
    &["check-config", "--connect"],
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_to_connect_name_the_servers_message_and_the_fix_once() {
    let pg = Pg::start_with(ClusterOptions {
        auth: Auth::Scram(SUPERUSER_PASSWORD.into()),
        ..Default::default()
    })
    .await;
    let port = pg.cluster.port();
    let cases = [
        (
            format!("postgres://postgres:{WRONG_PASSWORD}@127.0.0.1:{port}/app"),
            vec![
                "password authentication failed for user \"postgres\"",
                "SQLSTATE 28P01",
                "check the user and password in database_url",
            ],
        ),
        (
            // the server needs a password and the URL has none
            format!("postgres://postgres@127.0.0.1:{port}/app"),
            vec![
                "password missing",
                "the server asks for a password but database_url has none",
            ],
        ),
        (
            format!("postgres://postgres:{SUPERUSER_PASSWORD}@127.0.0.1:{port}/nowhere"),
            vec![
                "database \"nowhere\" does not exist",
                "SQLSTATE 3D000",
                "CREATE DATABASE nowhere",
            ],
        ),
    ];
    for (url, needles) in &cases {
        for args in COMMANDS {
            let env = env_for(&pg, url, &[]);
            let (ok, out, err) = tokio::task::block_in_place(|| walhook(args, &env));
            assert!(!ok, "{args:?} must fail:\n{out}{err}");
            for needle in needles {
                assert_once(&err, needle);
            }
            assert_once(
                &err,
                &format!("cannot connect to postgres at 127.0.0.1:{port}"),
            );
            assert!(!err.contains("db error"), "{err}");
            assert_no_secret(&format!("{out}{err}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_lacking_privileges_is_told_which_role_to_grant() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    client
        .batch_execute(&format!(
            "create role lacking login password '{LACKING_PASSWORD}'"
        ))
        .await
        .unwrap();
    let url = pg
        .url
        .replacen("postgres@", &format!("lacking:{LACKING_PASSWORD}@"), 1);
    let env = env_for(&pg, &url, &[]);

    let (ok, _, err) = tokio::task::block_in_place(|| walhook(&["run"], &env));
    assert!(!ok);
    assert_once(&err, "permission denied for schema walhook");
    assert_once(&err, "SQLSTATE 42501");
    assert_once(&err, "GRANT walhook_daemon TO lacking (README, \"Roles\")");

    let (ok, _, err) = tokio::task::block_in_place(|| walhook(&["status"], &env));
    assert!(!ok);
    assert_once(&err, "permission denied for schema walhook");
    assert_once(&err, "SQLSTATE 42501");
    assert_once(&err, "GRANT walhook_reader TO lacking (README, \"Roles\")");

    // the schema exists already: migrate may not use it
    let (ok, _, err) = tokio::task::block_in_place(|| walhook(&["migrate"], &env));
    assert!(!ok);
    assert_once(&err, "permission denied for schema walhook");
    assert_once(&err, "SQLSTATE 42501");
    assert_once(
        &err,
        "run `walhook migrate` as a role that may create the walhook schema",
    );

    // check-config --connect finds it too, and that the role may not replicate
    let (ok, _, err) =
        tokio::task::block_in_place(|| walhook(&["check-config", "--connect"], &env));
    assert!(!ok);
    assert_once(&err, "permission denied for schema walhook");
    assert_once(&err, "GRANT walhook_daemon TO lacking (README, \"Roles\")");
    assert_once(&err, "ALTER ROLE lacking REPLICATION");
    assert_no_secret(&err);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_http_listen_port_is_named_once_by_run_and_check_config() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let env = env_for(&pg, &pg.url, &[("WALHOOK_HTTP__LISTEN", addr.as_str())]);
    for args in [
        &["run"][..],
        &["check-config"],
        &["check-config", "--connect"],
    ] {
        let (ok, _, err) = tokio::task::block_in_place(|| walhook(args, &env));
        assert!(!ok, "{args:?}");
        assert_once(&err, &format!("cannot listen on http.listen {addr}"));
        assert_once(&err, "Address already in use");
        assert_once(&err, "set http.listen to a free address or \"off\"");
    }
    // run failed before creating anything in the database
    assert_eq!(
        count(&client, "select count(*) from pg_replication_slots").await,
        0
    );
    drop(taken);
}

#[test]
fn check_config_refuses_what_run_refuses_before_connecting() {
    let check = |env: &[(&str, &str)]| {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain([("WALHOOK_HTTP__LISTEN".into(), "off".into())])
            .collect();
        walhook(&["check-config"], &env)
    };
    // without database_url, libpq's defaults apply (as for psql), and check-config says so
    let (ok, out, err) = check(&[]);
    assert!(ok, "{err}");
    assert!(out.contains("(default: the local socket)"), "{out}");
    assert!(
        out.contains("(default: the operating-system user)"),
        "{out}"
    );
    let url = ("WALHOOK_DATABASE_URL", "postgres://u@127.0.0.1:1/db");
    let (ok, out, err) = check(&[url]);
    assert!(ok, "{err}");
    assert!(out.starts_with("configuration is valid\n"), "{out}");
    assert!(out.contains("127.0.0.1  (database_url)"), "{out}");
    // what run builds before connecting: the delivery client with its CA file
    let (ok, _, err) = check(&[url, ("WALHOOK_DELIVERY__CA_FILE", "/nonexistent/ca.pem")]);
    assert!(!ok);
    assert_once(&err, "delivery.ca_file /nonexistent/ca.pem");
    let (ok, _, err) = check(&[url, ("WALHOOK_DELIVERY__RETRY_SCHEDULE", "5s,40days")]);
    assert!(!ok);
    assert_once(
        &err,
        "delivery.retry_schedule: entry 2 is longer than 30 days",
    );
    // the repeated text of old: each layer adds its context once
    let (ok, _, err) = check(&[url, ("WALHOOK_DELIVERY__TIMEOUT", "soon")]);
    assert!(!ok);
    assert_once(&err, "delivery.timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_connect_finds_what_run_would_and_passes_once_fixed() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    client
        .batch_execute(
            "create role app_daemon login;
             grant usage on schema walhook to app_daemon;
             grant all on all tables in schema walhook to app_daemon;
             grant execute on all functions in schema walhook to app_daemon;",
        )
        .await
        .unwrap();
    let url = pg.url.replacen("postgres@", "app_daemon@", 1);
    // a publication of its own (migrate created "walhook", as superuser)
    let env = env_for(
        &pg,
        &url,
        &[("WALHOOK_REPLICATION__PUBLICATION", "app_pub")],
    );
    let (ok, out, err) =
        tokio::task::block_in_place(|| walhook(&["check-config", "--connect"], &env));
    assert!(!ok, "{out}");
    assert_once(&err, "ALTER ROLE app_daemon REPLICATION");
    let create = "create publication app_pub for table walhook.outbox with (publish = 'insert')";
    assert_once(&err, create);
    assert_once(&err, "these 2 problems would stop `walhook run`");

    // do what the messages say, as the superuser and the table's owner
    client
        .batch_execute(&format!("alter role app_daemon replication; {create}"))
        .await
        .unwrap();
    let (ok, out, err) =
        tokio::task::block_in_place(|| walhook(&["check-config", "--connect"], &env));
    assert!(ok, "{err}");
    assert!(
        out.starts_with("configuration is valid; connected to postgres at 127.0.0.1:"),
        "{out}"
    );
    // and run starts
    let config = pg.config_with(|f| {
        f.merge(("database_url", url.as_str()))
            .merge(("replication.publication", "app_pub"))
    });
    let daemon = Daemon::start(config);
    wait_streaming(&client).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_connect_knows_the_source() {
    let pg = Pg::start_with(ClusterOptions {
        wal_level: WalLevel::Replica,
        ..Default::default()
    })
    .await;
    let env = env_for(&pg, &pg.url, &[]);
    let (ok, _, err) =
        tokio::task::block_in_place(|| walhook(&["check-config", "--connect"], &env));
    assert!(!ok);
    assert_once(&err, "set wal_level = logical");
    assert_once(&err, "or use source = \"notify\"");
    let env = env_for(&pg, &pg.url, &[("WALHOOK_SOURCE", "notify")]);
    let (ok, out, err) =
        tokio::task::block_in_place(|| walhook(&["check-config", "--connect"], &env));
    assert!(ok, "{err}");
    assert!(out.contains("source notify"), "{out}");
}

/// The statements the notify source prints for the outbox's owner run as printed, one `psql -c` each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notify_ddl_for_the_table_owner_runs_as_printed() {
    let pg = Pg::start_for(Source::Notify).await;
    let client = pg.client().await;
    client
        .batch_execute(
            "create role app_daemon login;
             grant usage on schema walhook to app_daemon;
             grant all on all tables in schema walhook to app_daemon;
             grant execute on all functions in schema walhook to app_daemon;",
        )
        .await
        .unwrap();
    let url = pg.url.replacen("postgres@", "app_daemon@", 1);
    let env = env_for(&pg, &url, &[("WALHOOK_SOURCE", "notify")]);
    let (ok, _, err) = tokio::task::block_in_place(|| walhook(&["run"], &env));
    assert!(!ok);
    assert_once(&err, "must be owner of table outbox");
    assert_once(&err, "SQLSTATE 42501");
    assert_once(&err, "one psql -c per statement");
    let (ok, _, check) =
        tokio::task::block_in_place(|| walhook(&["check-config", "--connect"], &env));
    assert!(!ok);
    assert_once(&check, "one psql -c per statement");

    let statements: Vec<&str> = err
        .lines()
        .skip_while(|l| !l.contains("one psql -c per statement"))
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(statements.len(), 3, "{err}");
    for statement in &statements {
        assert!(statement.ends_with(';'), "{statement}");
        let out = Command::new("psql")
            .args([pg.url.as_str(), "-v", "ON_ERROR_STOP=1", "-c", statement])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "{statement}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (ok, _, err) =
        tokio::task::block_in_place(|| walhook(&["check-config", "--connect"], &env));
    assert!(ok, "{err}");
    let daemon = Daemon::start(
        pg.config_for_with(Source::Notify, |f| f.merge(("database_url", url.as_str()))),
    );
    wait_listening(&client, 1).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_written_to_a_pipe_carry_no_colour_codes() {
    let pg = Pg::start().await;
    let env = env_for(&pg, &pg.url, &[]);
    // recover-slot on a fresh database creates the slot and says so at info
    let out = tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_walhook"))
            .arg("recover-slot")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .output()
            .expect("run walhook")
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("INFO"), "{err}");
    assert!(err.contains("created replication slot"), "{err}");
    assert!(
        !err.contains('\x1b'),
        "ANSI escape codes in piped logs:\n{err:?}"
    );
}
