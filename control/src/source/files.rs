//! A directory of multi-document YAML (the same Kubernetes shapes, Pods
//! included), re-read when a file changes (inotify, with a slow poll as a
//! safety net). A file with errors keeps the
//! objects it last had that did not parse now: a typo never deletes a pod or
//! a policy. A removed file removes its objects.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use crate::{
    config_stream::Store,
    model::{parse_file, Cluster, Doc, Key, Located, Problem, Severity},
};

#[derive(Debug, Default)]
pub struct FileSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

#[derive(Debug)]
struct FileState {
    stamp: Option<(SystemTime, u64)>,
    docs: Vec<Doc>,
}

fn stamp(p: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The YAML files under `dir` (recursively), sorted.
pub fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

impl FileSource {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            files: BTreeMap::new(),
        }
    }

    /// Re-reads what changed. Returns whether anything did, and the problems
    /// found in the files read now.
    pub fn refresh(&mut self) -> (bool, Vec<Problem>) {
        let mut changed = false;
        let mut problems = Vec::new();
        let now = yaml_files(&self.dir);
        let before = self.files.len();
        self.files.retain(|p, _| now.contains(p));
        changed |= self.files.len() != before;
        for p in now {
            let st = stamp(&p);
            if self.files.get(&p).is_some_and(|f| f.stamp == st) {
                continue;
            }
            changed = true;
            let name = p.display().to_string();
            let (mut docs, found) = match std::fs::read_to_string(&p) {
                Ok(text) => parse_file(&name, &text),
                Err(e) => (
                    Vec::new(),
                    vec![Problem {
                        severity: Severity::Error,
                        file: name.clone(),
                        line: None,
                        object: String::new(),
                        field: String::new(),
                        reason: format!("cannot read: {e}"),
                    }],
                ),
            };
            if found.iter().any(|p| p.severity == Severity::Error) {
                if let Some(old) = self.files.get(&p) {
                    let kept: Vec<Doc> = old
                        .docs
                        .iter()
                        .filter(|d| !docs.iter().any(|n| n.key == d.key))
                        .cloned()
                        .collect();
                    if !kept.is_empty() {
                        tracing::warn!(file = %name, kept = kept.len(), "file has errors: keeping its last good objects");
                    }
                    docs.extend(kept);
                }
            }
            problems.extend(found);
            self.files.insert(p, FileState { stamp: st, docs });
        }
        (changed, problems)
    }

    /// Every object; a key defined in two files is an error, the first file wins.
    pub fn cluster(&self) -> (Cluster, Vec<Problem>) {
        merge(
            self.files
                .iter()
                .map(|(p, f)| (p.display().to_string(), f.docs.as_slice())),
        )
    }
}

/// Logs problems not logged before (each once while it lasts).
fn log_new(seen: &mut BTreeSet<String>, problems: &[Problem]) {
    let now: BTreeSet<String> = problems.iter().map(|p| p.to_string()).collect();
    for p in problems {
        let text = p.to_string();
        if !seen.contains(&text) {
            match p.severity {
                Severity::Error => tracing::error!(problem = %text, "cluster config problem"),
                Severity::Warning => tracing::warn!(problem = %text, "cluster config problem"),
                Severity::Info => tracing::debug!(problem = %text, "cluster config note"),
            }
        }
    }
    *seen = now;
}

/// Re-reads `dir` on every change and publishes the new view; `current`
/// holds the problems of the last read (for the admin endpoint).
pub async fn watch(dir: PathBuf, store: Arc<Store>, current: Arc<Mutex<Vec<Problem>>>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if ev.is_ok() {
            let _ = tx.send(());
        }
    })
    .and_then(|mut w| {
        use notify::Watcher;
        w.watch(&dir, notify::RecursiveMode::Recursive).map(|_| w)
    });
    let poll = match &watcher {
        Ok(_) => Duration::from_secs(2),
        Err(e) => {
            tracing::warn!(error = %e, "no file notifications; polling every 200 ms");
            Duration::from_millis(200)
        }
    };
    let mut src = FileSource::new(&dir);
    let mut seen = BTreeSet::new();
    let mut tick = tokio::time::interval(poll);
    loop {
        tokio::select! {
            Some(()) = rx.recv() => {
                // Read once the directory has been quiet for 10 ms (at most
                // 1 s): a writer that truncates then writes must not be
                // seen half way, as an empty file deleting its objects.
                let until = tokio::time::Instant::now() + Duration::from_secs(1);
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let mut more = false;
                    while rx.try_recv().is_ok() {
                        more = true;
                    }
                    if !more || tokio::time::Instant::now() > until {
                        break;
                    }
                }
            }
            _ = tick.tick() => {}
        }
        let t = std::time::Instant::now();
        let (changed, mut problems) = src.refresh();
        if !changed {
            continue;
        }
        let read_ms = t.elapsed().as_millis();
        let (cluster, dups) = src.cluster();
        let view = crate::compute::mesh_view(&cluster, true);
        let compute_ms = t.elapsed().as_millis() - read_ms;
        problems.extend(dups);
        problems.extend(crate::analyze::analyze_with(&cluster, &view));
        log_new(&mut seen, &problems);
        *current.lock().unwrap_or_else(|e| e.into_inner()) = problems;
        let analyze_ms = t.elapsed().as_millis() - read_ms - compute_ms;
        let (pods, services) = (view.workloads.len(), view.services.len());
        let pending_pods = view.pending.len();
        if let Some(v) = store.publish(view) {
            tracing::info!(
                version = v,
                pods,
                pending_pods,
                services,
                read_ms,
                compute_ms,
                analyze_ms,
                total_ms = t.elapsed().as_millis(),
                "cluster state changed"
            );
        }
    }
}

/// One YAML text as a whole cluster (tests, tools): every problem, parse or
/// duplicate, is returned with it.
pub fn parse_cluster(file: &str, text: &str) -> (Cluster, Vec<Problem>) {
    let (docs, mut problems) = parse_file(file, text);
    let (cluster, dups) = merge(std::iter::once((file.to_owned(), docs.as_slice())));
    problems.extend(dups);
    (cluster, problems)
}

/// Objects of several files as one cluster; duplicates reported.
pub fn merge<'a>(files: impl Iterator<Item = (String, &'a [Doc])>) -> (Cluster, Vec<Problem>) {
    let mut objects: BTreeMap<Key, Located> = BTreeMap::new();
    let mut problems = Vec::new();
    for (file, docs) in files {
        for d in docs {
            if let Some(first) = objects.get(&d.key) {
                problems.push(Problem {
                    severity: Severity::Error,
                    file: file.clone(),
                    line: Some(d.line),
                    object: d.key.to_string(),
                    field: String::new(),
                    reason: format!(
                        "already defined in {}:{} (that one is used)",
                        first.file,
                        first.line.unwrap_or(0)
                    ),
                });
                continue;
            }
            objects.insert(
                d.key.clone(),
                Located {
                    object: d.object.clone(),
                    file: file.clone(),
                    line: Some(d.line),
                },
            );
        }
    }
    (Cluster { objects }, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: NAME, uid: NAME}\nspec: {nodeName: n1, containers: [{name: c}]}\nstatus: {podIP: ADDR}\n";

    fn pod(name: &str, ip: &str) -> String {
        POD.replace("NAME", name).replace("ADDR", ip)
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_objects() {
        let dir = std::env::temp_dir().join(format!("ferry-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("pods.yaml");
        std::fs::write(&f, format!("{}---\n{}", pod("a", "10.0.0.1"), pod("b", "10.0.0.2"))).unwrap();
        std::fs::write(dir.join("other.yml"), pod("c", "10.0.0.3")).unwrap();
        let mut src = FileSource::new(&dir);
        assert!(src.refresh().0);
        assert_eq!(src.cluster().0.pods().count(), 3);
        assert!(!src.refresh().0, "unchanged");

        // b becomes garbage: a changes, b is kept as it was.
        std::fs::write(&f, format!("{}---\nkind: [\n", pod("a", "10.0.0.9"))).unwrap();
        let (changed, problems) = src.refresh();
        assert!(changed && problems.len() == 1, "{problems:?}");
        let c = src.cluster().0;
        let ips: Vec<_> = c
            .pods()
            .map(|p| p.status.as_ref().unwrap().pod_ip.clone().unwrap())
            .collect();
        assert_eq!(ips, ["10.0.0.9", "10.0.0.2", "10.0.0.3"]);

        // Fixed file without b: b is gone. Duplicate across files: reported, first kept.
        std::fs::write(&f, pod("a", "10.0.0.9")).unwrap();
        std::fs::write(dir.join("dup.yaml"), pod("c", "10.0.0.4")).unwrap();
        src.refresh();
        let (c, problems) = src.cluster();
        assert_eq!(c.pods().count(), 2);
        assert!(
            problems[0].to_string().contains("Pod default/c: already defined in"),
            "{problems:?}"
        );
        std::fs::remove_file(dir.join("other.yml")).unwrap();
        assert!(src.refresh().0);
        assert_eq!(src.cluster().0.pods().count(), 2, "c now from dup.yaml");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
