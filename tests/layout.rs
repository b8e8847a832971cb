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
    ("clock", 2),
    ("wire", 2),
    ("store", 3),
    ("publisher", 3),
    ("stats", 4),
    ("telemetry", 5),
    ("repository", 6),
    ("inbox", 6),
    ("broker", 7),
    ("relay", 7),
    ("dead_letter", 8),
    ("testing", 9),
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
        let mut hidden = false;
        for (n, line) in code_lines(&text) {
            // An old public path kept for compatibility (`#[doc(hidden)] pub use …`) points
            // wherever the type moved; it is a name, not a dependency.
            let compat = hidden && line.starts_with("pub use ");
            hidden = line == "#[doc(hidden)]" || (hidden && line.starts_with("#["));
            if compat {
                continue;
            }
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

/// A library file's module path: `src/inbox/process.rs` is `inbox::process`, `src/inbox/mod.rs`
/// is `inbox`, `lib.rs` is the root.
fn module_path(path: &Path) -> Vec<String> {
    let rel = path.strip_prefix(src()).expect("under src");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let file = parts.pop().unwrap_or_default();
    match file.as_str() {
        "mod.rs" | "lib.rs" => {}
        f => parts.push(f.trim_end_matches(".rs").to_owned()),
    }
    parts
}

/// Every path `line` names through `crate::`, `super::` or `self::`, made absolute from
/// `own` (the file's module path; `dir` is the folder a `mod.rs` stands for).
fn paths_named(line: &str, own: &[String], is_mod_rs: bool) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    // `self` of a plain file is the file; its `super` the folder. For `mod.rs`, `self` is the
    // folder and `super` its parent.
    let base_self: Vec<String> = own.to_vec();
    let base_super: Vec<String> = own[..own.len().saturating_sub(1)].to_vec();
    let _ = is_mod_rs;
    for (prefix, base) in [
        ("crate::", Vec::new()),
        ("super::", base_super),
        ("self::", base_self),
    ] {
        let mut rest = line;
        while let Some(at) = rest.find(prefix) {
            // `$crate::` and `crate::` alike; skip `foo_crate::`-like identifiers.
            let before = rest[..at].chars().last();
            let after = &rest[at + prefix.len()..];
            rest = after;
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let (head, braced) =
                match after.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')) {
                    Some(i) if after[i..].starts_with('{') => (&after[..i], Some(&after[i + 1..])),
                    Some(i) => (&after[..i], None),
                    None => (after, None),
                };
            let segments: Vec<String> = head
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            let mut stem = base.clone();
            stem.extend(segments);
            match braced {
                Some(inner) => {
                    for part in inner.split('}').next().unwrap_or("").split(',') {
                        let mut p = stem.clone();
                        p.extend(
                            part.trim()
                                .split("::")
                                .filter(|s| !s.is_empty() && *s != "self")
                                .map(|s| s.split(' ').next().unwrap_or("").to_owned()),
                        );
                        found.push(p);
                    }
                }
                None => found.push(stem),
            }
        }
    }
    found
}

#[test]
fn no_file_imports_form_a_circle() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let files: Vec<PathBuf> = files
        .into_iter()
        .filter(|p| !p.strip_prefix(src()).is_ok_and(|r| r.starts_with("bin")))
        .collect();
    let by_module: BTreeMap<Vec<String>, usize> = files
        .iter()
        .enumerate()
        .map(|(i, p)| (module_path(p), i))
        .collect();
    // What each module file re-exports from its children: `pub use self::child::{A, B}`.
    let mut reexported: BTreeMap<(usize, String), usize> = BTreeMap::new();
    for (i, path) in files.iter().enumerate() {
        let own = module_path(path);
        let text = fs::read_to_string(path).expect("source file");
        for (_, line) in code_lines(&text) {
            let Some(rest) = line
                .strip_prefix("pub use self::")
                .or_else(|| line.strip_prefix("pub(crate) use self::"))
            else {
                continue;
            };
            let (child, names) = rest.split_once("::").unwrap_or((rest, ""));
            let mut target = own.clone();
            target.push(child.to_owned());
            if let Some(&c) = by_module.get(&target) {
                for name in names
                    .trim_end_matches(';')
                    .trim_matches(|c| c == '{' || c == '}')
                    .split(',')
                {
                    reexported.insert((i, name.trim().to_owned()), c);
                }
            }
        }
    }
    // Edges: the file each named path lands in (the longest module prefix, then through
    // that module's re-exports). `pub use` re-exports and `mod` lines are names, not uses.
    let mut edges: Vec<std::collections::BTreeSet<usize>> = vec![Default::default(); files.len()];
    for (i, path) in files.iter().enumerate() {
        let own = module_path(path);
        let is_mod = path
            .file_name()
            .is_some_and(|f| f == "mod.rs" || f == "lib.rs");
        let text = fs::read_to_string(path).expect("source file");
        for (_, line) in code_lines(&text) {
            if line.starts_with("mod tests") {
                break; // `super::` inside a test module means the file itself
            }
            if line.starts_with("pub use ")
                || line.starts_with("pub(crate) use ")
                || line.starts_with("mod ")
                || line.starts_with("pub mod ")
            {
                continue;
            }
            for named in paths_named(line, &own, is_mod) {
                let Some(len) = (0..=named.len())
                    .rev()
                    .find(|n| by_module.contains_key(&named[..*n]))
                else {
                    continue;
                };
                let mut target = by_module[&named[..len]];
                if let Some(next) = named.get(len)
                    && let Some(&c) = reexported.get(&(target, next.clone()))
                {
                    target = c;
                }
                if target != i {
                    edges[i].insert(target);
                }
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit(
        n: usize,
        edges: &[std::collections::BTreeSet<usize>],
        state: &mut [u8],
        stack: &mut Vec<usize>,
        cycles: &mut Vec<Vec<usize>>,
    ) {
        state[n] = 1;
        stack.push(n);
        for &m in &edges[n] {
            match state[m] {
                0 => visit(m, edges, state, stack, cycles),
                1 => {
                    let from = stack.iter().position(|&x| x == m).unwrap_or(0);
                    cycles.push(stack[from..].to_vec());
                }
                _ => {}
            }
        }
        stack.pop();
        state[n] = 2;
    }
    let mut state = vec![0u8; files.len()];
    let mut cycles = Vec::new();
    for n in 0..files.len() {
        if state[n] == 0 {
            visit(n, &edges, &mut state, &mut Vec::new(), &mut cycles);
        }
    }
    let show = |c: &Vec<usize>| {
        c.iter()
            .chain(c.first())
            .map(|&i| {
                files[i]
                    .strip_prefix(src())
                    .unwrap_or(&files[i])
                    .display()
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join(" → ")
    };
    assert!(
        cycles.is_empty(),
        "file imports in a circle:\n{}",
        cycles.iter().map(show).collect::<Vec<_>>().join("\n")
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
    let own = vec!["inbox".to_owned(), "process".to_owned()];
    assert_eq!(
        paths_named("use super::consumer::{Counters, Delivery};", &own, false),
        [
            vec!["inbox", "consumer", "Counters"],
            vec!["inbox", "consumer", "Delivery"]
        ]
    );
    assert_eq!(
        paths_named("let x = crate::store::inbox::check_len(a);", &own, false),
        [vec!["store", "inbox", "check_len"]]
    );
    let store = fs::read_to_string(src().join("store/postgres.rs")).expect("postgres.rs");
    assert!(
        code_lines(&store).any(|(_, l)| l.contains("\"DELETE FROM outbox_leases")),
        "the SQL scan must recognise the store's own statements"
    );
}
