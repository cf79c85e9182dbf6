//! The source layout ARCHITECTURE.md promises, checked: no source file over 700 lines, `lib.rs`
//! files that only declare and re-export, and no import circle between the modules of a crate:
//! a module's paths into other modules (`crate::`, `super::`, its own children) form a graph
//! without cycles. A module may use what encloses it (a parent holds what its parts share, such
//! as the trait its children implement), so paths to a module's own ancestors are left out, as
//! is test code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 700;

fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `.rs` file under `dir`, with its module path (`model::fused::layer`; the root is "").
fn modules(src: &Path) -> BTreeMap<String, String> {
    fn walk(dir: &Path, src: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, src, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(src).unwrap().with_extension("");
                let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
                if parts.last().is_some_and(|l| l == "mod" || l == "lib" || l == "main") {
                    parts.pop();
                }
                out.insert(parts.join("::"), std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(src, src, &mut out);
    out
}

/// The code of a file without its `#[cfg(test)]` module (by convention at the end).
fn non_test(text: &str) -> &str {
    text.find("#[cfg(test)]\nmod tests {").map_or(text, |i| &text[..i])
}

fn parent(m: &str) -> String {
    m.rsplit_once("::").map_or(String::new(), |(p, _)| p.to_string())
}

fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else {
        format!("{a}::{b}")
    }
}

/// The modules `text` (module `m`) names: the deepest known module of each `crate::`, `super::`
/// or `self::` path, and of each `use` of a child module by its bare name.
fn edges(m: &str, text: &str, mods: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut resolve = |mut base: String, rest: &str| {
        let mut best = None;
        let mut segs = rest.split("::").peekable();
        while segs.peek() == Some(&"super") {
            segs.next();
            base = parent(&base);
        }
        if mods.contains(&base) {
            best = Some(base.clone());
        }
        for s in segs {
            let s: String = s.chars().take_while(|&c| ident(c)).collect();
            if s.is_empty() {
                break;
            }
            base = join(&base, &s);
            if mods.contains(&base) {
                best = Some(base.clone());
            }
        }
        if let Some(b) = best {
            // Paths to an enclosing module (the crate root included) are not edges.
            let ancestor = b.is_empty() || m.starts_with(&format!("{b}::"));
            if b != m && !ancestor {
                out.insert(b);
            }
        }
    };
    for (prefix, base) in [("crate::", String::new()), ("super::", parent(m)), ("self::", m.to_string())] {
        let mut from = 0;
        while let Some(i) = text[from..].find(prefix) {
            let at = from + i;
            let before = text[..at].chars().next_back();
            if !before.is_some_and(|c| ident(c) || c == ':') {
                let rest_end = text[at + prefix.len()..].find(|c: char| !(ident(c) || c == ':')).map_or(text.len(), |e| at + prefix.len() + e);
                resolve(base.clone(), &text[at + prefix.len()..rest_end]);
            }
            from = at + prefix.len();
        }
    }
    for line in text.lines() {
        let l = line.trim_start();
        let Some(path) = ["use ", "pub use ", "pub(crate) use ", "pub(super) use "].iter().find_map(|p| l.strip_prefix(p)) else { continue };
        let first: String = path.chars().take_while(|&c| ident(c)).collect();
        if mods.contains(&join(m, &first)) {
            let end = path.find(|c: char| !(ident(c) || c == ':')).unwrap_or(path.len());
            resolve(m.to_string(), &path[..end]);
        }
    }
    out
}

/// A cycle in `graph`, as the list of modules on it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(n: &str, g: &BTreeMap<String, BTreeSet<String>>, state: &mut BTreeMap<String, u8>, stack: &mut Vec<String>) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for next in g.get(n).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => {
                    let i = stack.iter().position(|s| s == next).unwrap();
                    return Some(stack[i..].to_vec());
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(next, g, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if !state.contains_key(n.as_str()) {
            if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn crate_srcs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(crates_dir()).unwrap().map(|e| e.unwrap().path().join("src")).filter(|p| p.is_dir()).collect();
    v.sort();
    assert!(v.len() >= 3, "expected the workspace's crates beside {}", env!("CARGO_MANIFEST_DIR"));
    v
}

#[test]
fn source_files_are_short() {
    for src in crate_srcs() {
        for (m, text) in modules(&src) {
            let n = text.lines().count();
            assert!(n <= MAX_LINES, "{}: module `{m}` has {n} lines (at most {MAX_LINES})", src.display());
        }
    }
}

#[test]
fn lib_rs_only_declares_and_reexports() {
    for src in crate_srcs() {
        let lib = src.join("lib.rs");
        let Ok(text) = std::fs::read_to_string(&lib) else { continue };
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let ok = line.starts_with("//")
                || line.starts_with("#[")
                || line.starts_with("#![")
                || ["mod ", "pub mod ", "pub(crate) mod ", "pub use "].iter().any(|p| line.starts_with(p));
            assert!(ok, "{}: `{line}` is more than a declaration or a re-export", lib.display());
        }
    }
}

#[test]
fn no_import_circles() {
    for src in crate_srcs() {
        let files = modules(&src);
        let mods: BTreeSet<String> = files.keys().cloned().collect();
        let graph: BTreeMap<String, BTreeSet<String>> = files
            .iter()
            .filter(|(m, _)| !m.is_empty() && !m.ends_with("tests"))
            .map(|(m, text)| (m.clone(), edges(m, non_test(text), &mods)))
            .collect();
        if let Some(c) = find_cycle(&graph) {
            panic!("{}: import circle {}", src.display(), c.join(" -> "));
        }
    }
}

/// The checker finds a circle when there is one, so that the test above can fail.
#[test]
fn the_circle_check_sees_circles() {
    let mods: BTreeSet<String> = ["a", "b", "a::c"].iter().map(|s| s.to_string()).collect();
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), edges("a", "use crate::b::Thing;\nuse c::Other;", &mods));
    g.insert("b".to_string(), edges("b", "fn f() { super::a::g() }", &mods));
    g.insert("a::c".to_string(), edges("a::c", "use super::X;", &mods));
    assert_eq!(g["a"], ["a::c", "b"].iter().map(|s| s.to_string()).collect());
    assert!(find_cycle(&g).is_some(), "{g:?}");
    // A child using its parent is not an edge, so a parent may use its child.
    assert!(g["a::c"].is_empty());
    g.insert("b".to_string(), BTreeSet::new());
    assert!(find_cycle(&g).is_none());
    // Siblings that use each other are a circle, however deep.
    let mods: BTreeSet<String> = ["p", "p::x", "p::y"].iter().map(|s| s.to_string()).collect();
    let g: BTreeMap<String, BTreeSet<String>> =
        [("p::x", "use super::y::A;"), ("p::y", "fn f() { crate::p::x::g() }")].iter().map(|(m, t)| (m.to_string(), edges(m, t, &mods))).collect();
    assert!(find_cycle(&g).is_some(), "{g:?}");
}
