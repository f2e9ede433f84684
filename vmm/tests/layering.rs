//! The host's module layering, checked from its sources: the graph of
//! top-level modules of `vmm/src` (who names whom through `crate::...`, or
//! through `super::` chains that climb to the crate root) has no cycle, and
//! only `cli.rs` itself and the binary's `main.rs` know the command line
//! (`cli`); everything below takes the `config` layer.
//!
//! The scan is a small lexer, not a grep: comments, string and character
//! literals are skipped; paths are found anywhere in code (`use` lines,
//! expressions, types, `use crate::{a, b::c}` groups); inline `mod x { .. }`
//! blocks are tracked so `super::` resolves to the right module. Its own
//! tests below run it on made-up sources.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Semi,
    Other,
}

/// Tokens of Rust source with comments and literals dropped.
fn lex(src: &str) -> Vec<Tok> {
    let c: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied();
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if ch == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if (ch == 'r' || ch == 'b')
            && raw_string_start(&c, i).is_some()
            && (i == 0 || !is_ident_char(c[i - 1]))
        {
            let (hashes, body) = raw_string_start(&c, i).unwrap_or((0, i));
            i = body;
            loop {
                if i >= c.len() {
                    break;
                }
                if c[i] == '"' && (0..hashes).all(|k| c.get(i + 1 + k) == Some(&'#')) {
                    i += 1 + hashes;
                    break;
                }
                i += 1;
            }
        } else if ch == '\'' {
            // A character literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if next == Some('\\') {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if c.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
                while i < c.len() && is_ident_char(c[i]) {
                    i += 1;
                }
            }
            out.push(Tok::Other);
        } else if ch == '$' {
            // `$crate` in a macro: not a path into another module.
            i += 1;
            while i < c.len() && is_ident_char(c[i]) {
                i += 1;
            }
            out.push(Tok::Other);
        } else if is_ident_char(ch) {
            let start = i;
            while i < c.len() && is_ident_char(c[i]) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let word = word.strip_prefix("r#").map(String::from).unwrap_or(word);
            out.push(Tok::Ident(word));
        } else {
            out.push(match ch {
                ':' if next == Some(':') => {
                    i += 1;
                    Tok::PathSep
                }
                '{' => Tok::Open,
                '}' => Tok::Close,
                ',' => Tok::Comma,
                ';' => Tok::Semi,
                _ => Tok::Other,
            });
            i += 1;
        }
    }
    out
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `r"`, `r#"`, `br"`, `br#"`: the number of hashes and where the body starts.
fn raw_string_start(c: &[char], i: usize) -> Option<(usize, usize)> {
    let mut j = i;
    if c.get(j) == Some(&'b') {
        j += 1;
    }
    if c.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let mut hashes = 0;
    while c.get(j) == Some(&'#') {
        hashes += 1;
        j += 1;
    }
    (c.get(j) == Some(&'"')).then_some((hashes, j + 1))
}

/// The crate-root names that the file (whose module path is `module`, e.g.
/// `["jail", "gate"]`; empty for the crate root) refers to.
fn root_names(src: &str, module: &[String]) -> BTreeSet<String> {
    let toks = lex(src);
    let mut names = BTreeSet::new();
    // Inline modules: (name, brace depth inside it).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let ident = |k: usize| match toks.get(k) {
        Some(Tok::Ident(s)) => Some(s.as_str()),
        _ => None,
    };
    let mut k = 0;
    while k < toks.len() {
        match &toks[k] {
            Tok::Open => depth += 1,
            Tok::Close => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Tok::Ident(w) if w == "mod" => {
                if let (Some(name), Some(Tok::Open)) = (ident(k + 1), toks.get(k + 2)) {
                    inline.push((name.to_string(), depth + 1));
                }
            }
            Tok::Ident(w)
                if (w == "crate" || w == "super")
                    && toks.get(k + 1) == Some(&Tok::PathSep)
                    // Not the tail of a longer path (`a::super::x`).
                    && !(k > 0 && toks[k - 1] == Tok::PathSep) =>
            {
                // Resolve the path's prefix to a module; collect the names
                // taken from the crate root.
                let mut at = k;
                let at_root = if w == "crate" {
                    at += 2;
                    true
                } else {
                    let mut here = module.len() + inline.len();
                    while ident(at) == Some("super") && toks.get(at + 1) == Some(&Tok::PathSep) {
                        here = here.checked_sub(1).unwrap_or_else(|| {
                            panic!("`super` above the crate root in module {module:?}")
                        });
                        at += 2;
                    }
                    here == 0
                };
                if at_root {
                    match toks.get(at) {
                        Some(Tok::Ident(n)) => {
                            names.insert(n.clone());
                        }
                        Some(Tok::Open) => {
                            // `crate::{a, b::c, d::{e, f}}`: the first name
                            // of each top-level member.
                            let mut d = 0;
                            let mut expect = true;
                            let mut j = at;
                            while j < toks.len() {
                                match &toks[j] {
                                    Tok::Open => {
                                        d += 1;
                                        if d == 1 {
                                            expect = true;
                                        }
                                    }
                                    Tok::Close => {
                                        d -= 1;
                                        if d == 0 {
                                            break;
                                        }
                                    }
                                    Tok::Comma if d == 1 => expect = true,
                                    Tok::Ident(n) if d == 1 && expect => {
                                        names.insert(n.clone());
                                        expect = false;
                                    }
                                    _ => {}
                                }
                                j += 1;
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        k += 1;
    }
    names
}

/// The module path of a source file relative to `src/`.
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.strip_suffix(".rs").unwrap_or(&last).to_string();
    if stem != "mod" && stem != "lib" && stem != "main" {
        parts.push(stem);
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
    {
        let p = e.expect("directory entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Top-level modules declared by `lib.rs`.
fn top_level_modules(lib: &str) -> BTreeSet<String> {
    let toks = lex(lib);
    let mut mods = BTreeSet::new();
    for w in toks.windows(3) {
        if let [Tok::Ident(m), Tok::Ident(name), Tok::Semi] = w {
            if m == "mod" {
                mods.insert(name.clone());
            }
        }
    }
    mods
}

/// The library's module graph: top-level module → top-level modules it
/// names, and which files name each one.
struct Graph {
    edges: BTreeMap<String, BTreeSet<String>>,
    users: BTreeMap<String, BTreeSet<String>>,
}

fn graph(src_dir: &Path) -> Graph {
    let lib = std::fs::read_to_string(src_dir.join("lib.rs")).expect("lib.rs");
    let mods = top_level_modules(&lib);
    let mut files = Vec::new();
    rust_files(src_dir, &mut files);
    files.sort();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut users: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src_dir).expect("under src").to_path_buf();
        let rel_s = rel.to_string_lossy().into_owned();
        if rel_s == "main.rs" || rel_s == "lib.rs" {
            // The binary crate and the crate root are not modules of the
            // graph (main.rs is checked on its own).
            continue;
        }
        let module = module_of(&rel);
        let top = module[0].clone();
        let src = std::fs::read_to_string(&f).expect("source");
        for name in root_names(&src, &module) {
            if mods.contains(&name) {
                users.entry(name.clone()).or_default().insert(rel_s.clone());
                if name != top {
                    edges.entry(top.clone()).or_default().insert(name);
                }
            }
        }
        edges.entry(top).or_default();
    }
    Graph { edges, users }
}

/// A cycle of the graph, if it has one.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                0 => {
                    if let Some(c) = visit(m, edges, state, stack) {
                        return Some(c);
                    }
                }
                1 => {
                    let from = stack.iter().position(|s| s == m).unwrap_or(0);
                    let mut c = stack[from..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, edges, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn top_level_modules_form_a_dag() {
    let g = graph(&src_dir());
    // The scan sees the edges that must exist (so an empty or broken scan
    // cannot pass).
    for (from, to) in [
        ("runtime", "jail"),
        ("runtime", "config"),
        ("runtime", "vm"),
        ("runtime", "control"),
        ("control", "vm"),
        ("jail", "config"),
        ("jail", "launch"),
        ("net", "config"),
        ("cli", "config"),
    ] {
        assert!(
            g.edges.get(from).is_some_and(|s| s.contains(to)),
            "expected {from} -> {to} in {:?}",
            g.edges
        );
    }
    if let Some(c) = find_cycle(&g.edges) {
        panic!("module cycle: {} (graph: {:?})", c.join(" -> "), g.edges);
    }
}

/// `vmm ctl` is a client: it talks to a vmm through `vmm_client` and
/// knows nothing of the runtime (its tests read `stats`'s report type).
#[test]
fn ctl_is_a_client_of_the_control_socket_only() {
    let g = graph(&src_dir());
    let ctl = g.edges.get("ctl").expect("the ctl module is scanned");
    let allowed: BTreeSet<String> = ["stats".to_string()].into_iter().collect();
    assert!(
        ctl.is_subset(&allowed),
        "ctl may use vmm_client and stats only, uses {ctl:?}"
    );
    assert!(
        g.edges.get("ctl").is_some_and(|s| s.contains("stats")),
        "the scan sees ctl -> stats: {:?}",
        g.edges
    );
    for (from, to) in &g.edges {
        assert!(!to.contains("ctl"), "module {from} depends on ctl");
    }
}

#[test]
fn only_main_and_cli_know_the_command_line() {
    let g = graph(&src_dir());
    let users: Vec<&String> = g
        .users
        .get("cli")
        .into_iter()
        .flatten()
        .filter(|f| f.as_str() != "cli.rs")
        .collect();
    assert!(
        users.is_empty(),
        "these files use `cli` (take `config` types instead): {users:?}"
    );
    for (from, to) in &g.edges {
        assert!(
            !to.contains("cli"),
            "module {from} depends on cli: {:?}",
            g.edges
        );
    }
    // The binary does use it (and so the check above is meaningful).
    let main = std::fs::read_to_string(src_dir().join("main.rs")).expect("main.rs");
    assert!(lex(&main).windows(3).any(|w| w
        == [
            Tok::Ident("vmm".into()),
            Tok::PathSep,
            Tok::Ident("cli".into())
        ]));
}

#[test]
fn scanner_finds_paths_in_code_and_resolves_super() {
    let m = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let src = r##"
        // use crate::commented;
        /* use crate::blocked; /* nested crate::deep */ */
        use crate::{a, b::c, d::{e, f}};
        use super::sibling;
        const S: &str = "crate::in_string";
        const R: &str = r#"crate::in_raw "string""#;
        const C: char = '"';
        fn f<'x>(v: &'x u8) -> crate::g::T { crate::h(v); $crate::macro_path; x::super::y }
        mod tests {
            use super::super::up_one;
            mod deeper { use super::super::super::top_again; }
        }
        fn after() { super::from_root_again(); }
    "##;
    let names = root_names(src, &m(&["net"]));
    let want: BTreeSet<String> = [
        "a",
        "b",
        "d",
        "g",
        "h",
        "sibling",
        "up_one",
        "top_again",
        "from_root_again",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(names, want);
    // One level deeper, a single `super` stays inside the module.
    let names = root_names("use super::x; use super::super::y;", &m(&["jail", "gate"]));
    assert_eq!(names.into_iter().collect::<Vec<_>>(), vec!["y".to_string()]);
    // Groups with `self` and a trailing comma.
    let names = root_names("use crate::{self as k, z,};", &m(&["cli"]));
    assert!(names.contains("z"));
}

#[test]
fn cycles_are_found() {
    let mut e: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut add = |a: &str, b: &str| {
        e.entry(a.into()).or_default().insert(b.into());
        e.entry(b.into()).or_default();
    };
    add("runtime", "jail");
    add("jail", "config");
    assert_eq!(find_cycle(&e), None);
    e.entry("config".into())
        .or_default()
        .insert("runtime".into());
    let c = find_cycle(&e).expect("a cycle");
    assert_eq!(c.first(), c.last());
    assert_eq!(c.len(), 4, "{c:?}");
}

#[test]
fn module_paths_of_files() {
    assert_eq!(module_of(Path::new("jail/mod.rs")), vec!["jail"]);
    assert_eq!(module_of(Path::new("jail/gate.rs")), vec!["jail", "gate"]);
    assert_eq!(
        module_of(Path::new("runtime/vcpu/exits.rs")),
        vec!["runtime", "vcpu", "exits"]
    );
    assert_eq!(module_of(Path::new("cli.rs")), vec!["cli"]);
}
