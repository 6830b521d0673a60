//! Pointers into the documentation hold: every README section named (README, a quote, its title)
//! in the code, scripts and guides is a heading of README.md, and every relative link in README.md
//! and docs/ names a file that exists.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" && name != "swagger-ui" {
                files(&path, out);
            }
        } else if ["rs", "py", "sh", "md", "lua", "yml", "yaml"].iter().any(|e| name.ends_with(&format!(".{e}"))) {
            out.push(path);
        }
    }
}

fn headings(markdown: &str) -> Vec<String> {
    markdown.lines().filter_map(|l| l.strip_prefix('#')).map(|h| h.trim_start_matches('#').trim().to_string()).collect()
}

#[test]
fn every_readme_section_named_elsewhere_exists() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let sections = headings(&readme);
    let mut all = Vec::new();
    for dir in ["src", "tests", "testkit", "scripts", "bench", "docs", "deploy"] {
        files(&repo().join(dir), &mut all);
    }
    all.push(repo().join("README.md"));
    let mut named = 0;
    let mut missing = Vec::new();
    for file in all {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for (at, _) in text.match_indices("README") {
            let rest = &text[at + "README".len()..];
            let rest = rest.strip_prefix("'s").unwrap_or(rest);
            let Some(quoted) = rest.strip_prefix(" \"") else { continue };
            let Some(end) = quoted.find('"') else { continue };
            let title = &quoted[..end];
            named += 1;
            if !sections.iter().any(|s| s == title) {
                missing.push(format!("{}: README \"{title}\"", file.strip_prefix(repo()).unwrap().display()));
            }
        }
    }
    assert!(missing.is_empty(), "sections named but not in README.md: {missing:#?}");
    assert!(named >= 3, "only {named} references found: the scan is broken");
}

#[test]
fn relative_links_in_readme_and_docs_name_files_that_exist() {
    let mut docs = vec![repo().join("README.md"), repo().join("model_output/README.md")];
    files(&repo().join("docs"), &mut docs);
    let mut broken = Vec::new();
    for doc in docs {
        let text = std::fs::read_to_string(&doc).unwrap();
        for (at, _) in text.match_indices("](") {
            let target = &text[at + 2..];
            let target = &target[..target.find(')').unwrap_or(0)];
            let path = target.split('#').next().unwrap();
            if path.is_empty() || path.contains("://") || path.starts_with("mailto:") {
                continue;
            }
            if !doc.parent().unwrap().join(path).exists() {
                broken.push(format!("{}: {target}", doc.strip_prefix(repo()).unwrap().display()));
            }
        }
    }
    assert!(broken.is_empty(), "links to files that do not exist: {broken:#?}");
}
