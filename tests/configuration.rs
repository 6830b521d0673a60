//! The configuration surface, held against committed files:
//! - every command's environment variable names equal `tests/fixtures/env_names.txt` (names are
//!   an interface: deployments set them, so a rename or a lost variable fails here);
//! - `docs/configuration.md` is exactly what `model-service --help` and each command's `--help`
//!   print (regenerate with `UPDATE_REFERENCE=1 cargo test --release --test configuration`).

use std::collections::BTreeSet;
use std::path::PathBuf;

const COMMANDS: [&str; 6] = ["serve", "listen", "ingest", "backfill", "recommend", "check"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `model-service [COMMAND] --help` with no configuration in the environment (clap prints the
/// value of a variable that is set) and without a terminal (clap wraps at 100 columns).
fn help(command: Option<&str>) -> String {
    let mut cmd = testkit::bin();
    cmd.env_clear();
    for keep in ["PATH", "LD_LIBRARY_PATH"] {
        if let Some(v) = std::env::var_os(keep) {
            cmd.env(keep, v);
        }
    }
    cmd.args(command).arg("--help");
    let out = cmd.output().expect("running model-service --help");
    assert!(out.status.success(), "--help failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

/// The `[env: NAME=...]` names of one help text.
fn env_names(help: &str) -> BTreeSet<String> {
    help.match_indices("[env: ")
        .map(|(at, tag)| {
            // `[env: NAME=value]`, or `[env: NAME]` for a hidden value (hide_env_values)
            let rest = &help[at + tag.len()..];
            rest[..rest.find(['=', ']']).expect("[env: NAME")].to_string()
        })
        .collect()
}

/// The option blocks of a help text: each starts at a line indented by two to six spaces and a
/// dash, and runs to the next such line or the end of its section.
fn option_blocks(help: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in help.lines() {
        let trimmed = line.trim_start();
        let starts = trimmed.starts_with('-') && (2..=6).contains(&(line.len() - trimmed.len()));
        if starts || (!line.starts_with(' ') && !line.is_empty()) {
            blocks.extend(current.take());
        }
        if starts {
            current = Some(String::new());
        }
        if let Some(block) = current.as_mut() {
            block.push_str(line);
            block.push('\n');
        }
    }
    blocks.extend(current);
    blocks
}

/// A command's help without the option blocks the top-level help already shows.
fn own_part(command_help: &str, global_blocks: &BTreeSet<String>) -> String {
    let dropped: BTreeSet<String> =
        option_blocks(command_help).into_iter().filter(|b| global_blocks.contains(b)).collect();
    let mut out = command_help.to_string();
    for block in &dropped {
        out = out.replacen(block.as_str(), "", 1);
    }
    out
}

fn reference() -> String {
    let top = help(None);
    let globals: BTreeSet<String> = option_blocks(&top).into_iter().collect();
    let mut doc = String::from(
        "# Configuration reference\n\n\
         Generated from `model-service --help` and each command's `--help`; do not edit by hand.\n\
         Regenerate with `UPDATE_REFERENCE=1 cargo test --release --test configuration` (the test\n\
         fails while this file differs from the binary's help). Every option reads the environment\n\
         variable named in its `[env: ...]`; a command line flag wins over the variable.\n\n\
         ## Every command\n\n",
    );
    doc.push_str(&format!("```text\n{}```\n", top));
    for command in COMMANDS {
        doc.push_str(&format!(
            "\n## `{command}`\n\nIts own arguments; the options above apply as well.\n\n```text\n{}```\n",
            own_part(&help(Some(command)), &globals)
        ));
    }
    doc
}

#[test]
fn every_commands_environment_names_are_the_committed_ones() {
    let mut listed = String::new();
    for command in COMMANDS {
        let names = env_names(&help(Some(command)));
        assert!(names.len() > 50, "{command}: only {} environment names found", names.len());
        listed.push_str(&format!("[{command}]\n"));
        for name in names {
            listed.push_str(&name);
            listed.push('\n');
        }
    }
    let path = repo().join("tests/fixtures/env_names.txt");
    if std::env::var_os("UPDATE_REFERENCE").is_some() {
        std::fs::write(&path, &listed).unwrap();
    }
    let committed = std::fs::read_to_string(&path).expect("tests/fixtures/env_names.txt");
    let committed_lines: BTreeSet<&str> = committed.lines().collect();
    let now_lines: BTreeSet<&str> = listed.lines().collect();
    let lost: Vec<_> = committed_lines.difference(&now_lines).collect();
    let new: Vec<_> = now_lines.difference(&committed_lines).collect();
    assert!(
        committed == listed,
        "environment names changed: lost {lost:?}, new {new:?} (a rename breaks deployments; \
         a new variable is added to tests/fixtures/env_names.txt on purpose)"
    );
}

#[test]
fn the_configuration_reference_is_the_binarys_help() {
    let generated = reference();
    let path = repo().join("docs/configuration.md");
    if std::env::var_os("UPDATE_REFERENCE").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).expect("docs/configuration.md");
    if committed != generated {
        let first = committed.lines().zip(generated.lines()).position(|(a, b)| a != b);
        panic!(
            "docs/configuration.md differs from the binary's --help (first differing line: {:?}); \
             regenerate with UPDATE_REFERENCE=1 cargo test --release --test configuration",
            first.map(|i| i + 1)
        );
    }
}

#[test]
fn the_help_parser_finds_options_and_their_names() {
    let text = "Options:\n      --redis-url <REDIS_URL>\n          Full URL\n          \n          \
                [env: REDIS_URL=]\n\n      --api-token <API_TOKEN>\n          [env: API_TOKEN]\n\n  -h, --help\n\
                          Print help\n";
    let blocks = option_blocks(text);
    assert_eq!(blocks.len(), 3, "{blocks:?}");
    assert!(blocks[0].contains("[env: REDIS_URL=]"));
    assert_eq!(env_names(text).into_iter().collect::<Vec<_>>(), ["API_TOKEN", "REDIS_URL"]);
}

/// README's configuration table states each variable's default as the binary has it (README once
/// said LightGCN keeps 200 candidates while the default was 600).
#[test]
fn the_defaults_readme_states_are_the_binarys() {
    use clap::CommandFactory;
    let mut defaults = std::collections::BTreeMap::new();
    let cli = model_service::config::Cli::command();
    for command in std::iter::once(&cli).chain(cli.get_subcommands()) {
        for arg in command.get_arguments() {
            if let Some(env) = arg.get_env() {
                let value: Vec<String> =
                    arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
                defaults.insert(env.to_string_lossy().into_owned(), value.join(","));
            }
        }
    }
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = readme.split("\n## Configuration").nth(1).expect("README has a Configuration section");
    let section = section.split("\n## ").next().unwrap();
    let mut checked = 0;
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let names: Vec<&str> = cells[1].split('/').map(|n| n.trim().trim_matches('`')).collect();
        let mut stated: Vec<&str> = cells[2].split(" / ").map(|d| d.trim().trim_matches('`')).collect();
        if stated.len() == 1 {
            stated = vec![stated[0]; names.len()]; // one default for all: `A` / `B` | -
        }
        assert_eq!(names.len(), stated.len(), "README row {row:?}: names and defaults do not pair up");
        for (name, stated) in names.iter().zip(stated) {
            let actual =
                defaults.get(*name).unwrap_or_else(|| panic!("README names {name}, which the binary does not read"));
            assert!(same_default(stated, actual), "README says {name} defaults to {stated:?}; the binary: {actual:?}");
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} defaults found in README's table");
}

/// `-` is no default; numbers compare as numbers (`10` and `10.0`), `N GiB` as bytes.
fn same_default(stated: &str, actual: &str) -> bool {
    if stated == "-" {
        return actual.is_empty();
    }
    let number = |s: &str| -> Option<f64> {
        match s.strip_suffix(" GiB") {
            Some(n) => n.trim().parse::<f64>().ok().map(|g| g * f64::from(1u32 << 30)),
            None => s.parse().ok(),
        }
    };
    match (number(stated), number(actual)) {
        (Some(a), Some(b)) => a == b,
        _ => stated.trim_start_matches("./") == actual.trim_start_matches("./"),
    }
}
