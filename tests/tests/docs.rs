//! The design notes in `docs/` are what the code and the generated kernels cite, as
//! `docs/<file>.md#<anchor>`, and what the Markdown files link to. A renamed heading or a moved file
//! would leave those citations pointing nowhere, so every one must name an existing file and heading.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the repository").to_path_buf()
}

/// Files that may cite the docs: sources, templates, scripts and the Markdown files themselves.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" && name != "snapshots" {
                files(&path, out);
            }
        } else if [".rs", ".cuh", ".tera", ".py", ".sh", ".md"].iter().any(|ext| name.ends_with(ext)) {
            out.push(path);
        }
    }
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown file's headings (outside code blocks).
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut out = BTreeSet::new();
    for line in markdown.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

/// Every `docs/<name>.md#<anchor>` in `text`, as (path relative to the root, anchor).
fn code_citations(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("docs/") {
        let tail = &rest[at..];
        let path_len = tail.find(|c: char| !(c.is_ascii_alphanumeric() || "/._-".contains(c))).unwrap_or(tail.len());
        let path = &tail[..path_len];
        if path.ends_with(".md") && tail[path_len..].starts_with('#') {
            let anchor_tail = &tail[path_len + 1..];
            let len = anchor_tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).unwrap_or(anchor_tail.len());
            out.push((path.to_string(), anchor_tail[..len].to_string()));
        }
        rest = &tail[path_len.max(1)..];
    }
    out
}

/// Every relative Markdown link `](target)` in `text`.
fn markdown_links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        let tail = &rest[at + 2..];
        let Some(end) = tail.find(')') else { break };
        let target = &tail[..end];
        if !target.contains("://") && !target.contains(' ') {
            out.push(target.to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// Why `path#anchor` (resolved) does not point at a heading, or `None` when it does.
fn broken(path: &Path, anchor: &str) -> Option<String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return Some(format!("`{}`: {e}", path.display())),
    };
    if anchor.is_empty() || anchors(&text).contains(anchor) {
        None
    } else {
        Some(format!("`{}` has no heading for `#{anchor}`", path.display()))
    }
}

#[test]
fn every_citation_of_the_docs_names_an_existing_heading() {
    let root = repo_root();
    let mut all = Vec::new();
    files(&root, &mut all);
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in &all {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        let shown = file.strip_prefix(&root).unwrap_or(file).display().to_string();
        for (path, anchor) in code_citations(&text) {
            checked += 1;
            if let Some(why) = broken(&root.join(&path), &anchor) {
                problems.push(format!("{shown}: {path}#{anchor}: {why}"));
            }
        }
        if file.extension().is_some_and(|e| e == "md") {
            for link in markdown_links(&text) {
                let (target, anchor) = link.split_once('#').unwrap_or((&link, ""));
                let resolved =
                    if target.is_empty() { file.clone() } else { file.parent().unwrap_or(&root).join(target) };
                if target.is_empty() || target.ends_with(".md") {
                    checked += 1;
                    if let Some(why) = broken(&resolved, anchor) {
                        problems.push(format!("{shown}: ({link}): {why}"));
                    }
                } else if !resolved.exists() {
                    problems.push(format!("{shown}: ({link}): no such file"));
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} citations found: is the repository root right?");
    assert!(problems.is_empty(), "broken citations of the docs:\n{}", problems.join("\n"));
}

#[test]
fn headings_become_github_anchors() {
    assert_eq!(slug(" Forward, blocked"), "forward-blocked");
    assert_eq!(slug(" GPU check"), "gpu-check");
    assert_eq!(code_citations("see (docs/math.md#early-exit)."), vec![("docs/math.md".into(), "early-exit".into())]);
    assert!(code_citations("docs/ alone, docs/math.md without an anchor").is_empty());
}
