//! The crate's layout holds itself: module imports point down the layers, every SQL statement
//! is in `src/store/`, and no source file grows past about 500 lines. Reads `src/` as text.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The library's top-level modules, lowest first. A module may refer to modules of a lower
/// rank only (and to its own): `event` → `store` → `repository` / `stats` → `relay`.
const LAYERS: &[(&str, u8)] = &[
    ("error", 0),
    ("backoff", 0),
    ("event", 1),
    ("store", 2),
    ("publisher", 2),
    ("stats", 3),
    ("telemetry", 4),
    ("repository", 5),
    ("inbox", 5),
    ("relay", 6),
    ("admin", 7),
];

const MAX_LINES: usize = 500;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .expect("readable src dir")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a library file belongs to; `None` for `lib.rs` and the binary.
fn module_of(path: &Path) -> Option<String> {
    let rel = path.strip_prefix(src()).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "bin" => None,
        f => Some(f.trim_end_matches(".rs").to_owned()),
    }
}

/// Code lines only: comments, doc comments included, say nothing about dependencies.
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_start()))
        .filter(|(_, l)| !l.starts_with("//"))
}

/// The names the crate root re-exports, mapped to the module they come from.
fn root_reexports() -> BTreeMap<String, String> {
    let lib = fs::read_to_string(src().join("lib.rs")).expect("lib.rs");
    let mut map = BTreeMap::new();
    for (_, line) in code_lines(&lib) {
        let Some(rest) = line.strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, names)) = rest.trim_end_matches(';').split_once("::") else {
            continue;
        };
        for name in names.trim_matches(|c| c == '{' || c == '}').split(',') {
            map.insert(name.trim().to_owned(), module.to_owned());
        }
    }
    map
}

/// Every top-level module `line` names through `crate::` or `$crate::`.
fn referenced(line: &str, reexports: &BTreeMap<String, String>) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let braced = after.starts_with('{');
        if braced {
            // `use crate::{a::X, b};`
            let inner = after[1..].split('}').next().unwrap_or("");
            for part in inner.split(',') {
                let head = part.trim().split("::").next().unwrap_or("").to_owned();
                found.push(reexports.get(&head).cloned().unwrap_or(head));
            }
        } else if !name.is_empty() {
            found.push(reexports.get(&name).cloned().unwrap_or(name));
        }
        rest = after;
    }
    found
}

#[test]
fn imports_point_down_the_layers() {
    let rank: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let reexports = root_reexports();
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut violations = Vec::new();
    let mut modules_seen = std::collections::BTreeSet::new();
    for path in &files {
        let Some(module) = module_of(path) else {
            continue;
        };
        modules_seen.insert(module.clone());
        let own = *rank
            .get(module.as_str())
            .unwrap_or_else(|| panic!("module `{module}` has no layer in LAYERS"));
        let text = fs::read_to_string(path).expect("source file");
        for (n, line) in code_lines(&text) {
            for target in referenced(line, &reexports) {
                if target == module {
                    continue;
                }
                match rank.get(target.as_str()) {
                    Some(&r) if r < own => {}
                    Some(_) => violations.push(format!(
                        "{}:{n}: `{module}` refers up or across to `{target}`: {line}",
                        path.display()
                    )),
                    None => {}
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports against the layers:\n{}",
        violations.join("\n")
    );
    let listed: std::collections::BTreeSet<String> =
        LAYERS.iter().map(|(m, _)| (*m).to_owned()).collect();
    assert_eq!(modules_seen, listed, "LAYERS must list every module");
}

#[test]
fn sql_text_lives_in_the_store_only() {
    const SQL: [&str; 6] = [
        "SELECT ",
        "INSERT INTO",
        "UPDATE outbox",
        "DELETE FROM",
        " WHERE ",
        "pg_advisory",
    ];
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let store = src().join("store");
    let mut found = Vec::new();
    for path in files.iter().filter(|p| !p.starts_with(&store)) {
        let text = fs::read_to_string(path).expect("source file");
        for (n, line) in code_lines(&text) {
            // Only inside string literals.
            let quoted = line.split('"').skip(1).step_by(2);
            if quoted
                .into_iter()
                .any(|s| SQL.iter().any(|k| s.contains(k)))
            {
                found.push(format!("{}:{n}: {line}", path.display()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "SQL outside src/store/:\n{}",
        found.join("\n")
    );
}

#[test]
fn no_source_file_is_over_the_limit() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|p| {
            let n = fs::read_to_string(p).expect("source file").lines().count();
            (n > MAX_LINES).then(|| format!("{}: {n} lines", p.display()))
        })
        .collect();
    assert!(
        long.is_empty(),
        "files over {MAX_LINES} lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_checks_see_what_they_look_for() {
    // A checker that finds nothing proves nothing: make sure each one would fire.
    let reexports = root_reexports();
    assert_eq!(
        reexports.get("Outbox").map(String::as_str),
        Some("repository")
    );
    assert_eq!(
        referenced("use crate::relay::store::Fate;", &reexports),
        ["relay"]
    );
    assert_eq!(
        referenced("use crate::{event::X, Outbox};", &reexports),
        ["event", "repository"]
    );
    assert_eq!(
        referenced("$crate::event::OutboxEvent {", &reexports),
        ["event"]
    );
    let store = fs::read_to_string(src().join("store/postgres.rs")).expect("postgres.rs");
    assert!(
        code_lines(&store).any(|(_, l)| l.contains("\"DELETE FROM outbox_leases")),
        "the SQL scan must recognise the store's own statements"
    );
}
