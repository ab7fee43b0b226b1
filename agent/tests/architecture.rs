//! The crate boundaries of docs/architecture.md, checked: which crates may
//! depend on which, and no import circle between the agent's modules.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// The `[dependencies]` section of a crate's manifest (dev-dependencies excluded).
fn dependencies(krate: &str) -> String {
    let text = fs::read_to_string(workspace().join(krate).join("Cargo.toml")).unwrap();
    let deps = text.split("[dependencies]").nth(1).unwrap_or_default();
    deps.split("\n[").next().unwrap_or_default().to_owned()
}

#[test]
fn crates_depend_only_downwards() {
    for krate in ["control", "ctl", "model", "ebpf", "api", "tests", "cni"] {
        assert!(
            !dependencies(krate).contains("ferry-agent"),
            "{krate} must not depend on the agent"
        );
    }
    let model = dependencies("model");
    for forbidden in ["tokio", "aya", "ferry-ebpf", "hyper", "tonic"] {
        assert!(
            !model.contains(forbidden),
            "ferry-model must stay pure: it depends on {forbidden}"
        );
    }
    // ferry-cni runs once per sandbox operation, in the runtime's context:
    // the protocol from ferry-model, std sockets, no async runtime.
    let cni = dependencies("cni");
    for forbidden in ["tokio", "aya", "ferry-ebpf", "ferry-api", "ferry-control"] {
        assert!(
            !cni.contains(forbidden),
            "ferry-cni stays small: it depends on {forbidden}"
        );
    }
    assert!(
        !dependencies("ebpf").contains("ferry-"),
        "ferry-ebpf depends on no other Ferry crate"
    );
    assert!(
        !dependencies("api").contains("ferry-"),
        "ferry-api depends on no other Ferry crate"
    );
}

/// Top-level module -> the top-level modules its non-test code names.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    let mut dirs = vec![src.to_owned()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && p.file_name().unwrap() != "bin" {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap();
        let top = rel.components().next().unwrap().as_os_str().to_string_lossy();
        let top = top.trim_end_matches(".rs").to_owned();
        if top == "lib" {
            continue;
        }
        let text = fs::read_to_string(&f).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap();
        let entry = g.entry(top.clone()).or_default();
        // `crate::x` and `use crate::{x, y::z}`.
        let mut names: Vec<String> = code
            .match_indices("crate::")
            .map(|(i, _)| {
                code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect()
            })
            .collect();
        for (i, _) in code.match_indices("use crate::{") {
            let group = &code[i + 12..];
            let group = &group[..group.find("};").unwrap_or(group.len())];
            let mut depth = 0;
            let mut word = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    c if depth == 0 && (c.is_alphanumeric() || c == '_') => word.push(c),
                    _ => {
                        if !word.is_empty() && depth == 0 {
                            names.push(std::mem::take(&mut word));
                        }
                        word.clear();
                    }
                }
            }
            if !word.is_empty() {
                names.push(word);
            }
        }
        entry.extend(names.into_iter().filter(|n| !n.is_empty() && *n != top));
    }
    let tops: BTreeSet<String> = g.keys().cloned().collect();
    for deps in g.values_mut() {
        deps.retain(|d| tops.contains(d));
    }
    g
}

#[test]
fn agent_modules_form_no_circle() {
    let g = module_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(
        g["proxy"].contains("tunnel"),
        "the graph is read: proxy uses the tunnel"
    );
    for (m, deps) in &g {
        for d in deps {
            // Is `m` reachable back from `d`?
            let mut seen = BTreeSet::new();
            let mut stack = vec![d.clone()];
            while let Some(x) = stack.pop() {
                if &x == m {
                    panic!("import circle: {m} -> {d} -> ... -> {m}; graph: {g:#?}");
                }
                if seen.insert(x.clone()) {
                    stack.extend(g.get(&x).into_iter().flatten().cloned());
                }
            }
        }
    }
    // The transport and telemetry never reach up into the proxy.
    for low in ["tunnel", "telemetry", "sockets", "identity"] {
        assert!(!g[low].contains("proxy"), "{low} imports the proxy");
    }
    // The hand-over sits on top, beside the composition root: nothing else
    // reaches into it (the binary wires it).
    for (m, deps) in &g {
        assert!(!deps.contains("handover"), "{m} imports handover");
    }
}
